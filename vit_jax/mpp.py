"""Masked patch prediction, the paper's self-supervised objective (Sec. 4.6, App. B.1.2).

Half of the patch embeddings are corrupted: 80% of those are replaced by a learned [mask]
embedding, 10% by the embedding of another patch of the same image, 10% kept. From its output
token the model predicts each corrupted patch's mean colour, quantised to 3 bits per channel
(512 classes). The model is a VisionTransformer with classifier='unpooled' and 512 classes; its
checkpoint fine-tunes like any other (load_pretrained drops `mask_token` and the 512-way head).
"""

import jax
import jax.numpy as jnp
import optax

NUM_COLOURS = 512  # 8 levels for each of R, G, B.
CORRUPT_FRACTION, MASK_FRACTION, REPLACE_FRACTION = 0.5, 0.8, 0.1


def colour_targets(images, patch_size) -> jnp.ndarray:
  """(batch, patches): each patch's mean colour as r * 64 + g * 8 + b, each in 0..7."""
  batch, height, width, channels = images.shape
  patch_h, patch_w = patch_size
  patches = images.reshape(batch, height // patch_h, patch_h, width // patch_w, patch_w, channels)
  mean = ((patches.mean(axis=(2, 4)) + 1) / 2).reshape(batch, -1, channels)  # In [0, 1].
  levels = jnp.clip(jnp.floor(mean * 8), 0, 7).astype(jnp.int32)
  return levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]


def sample_corruption(rng, batch: int, num_patches: int) -> dict:
  """Which patches to corrupt and how: {'corrupted', 'masked', 'replaced': (batch, patches) bool,
  'source': (batch, patches) index of the patch whose embedding replaces it}."""
  order_rng, kind_rng, source_rng = jax.random.split(rng, 3)
  scores = jax.random.uniform(order_rng, (batch, num_patches))
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  corrupted = ranks < int(round(CORRUPT_FRACTION * num_patches))
  kind = jax.random.uniform(kind_rng, (batch, num_patches))
  masked = corrupted & (kind < MASK_FRACTION)
  replaced = corrupted & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + REPLACE_FRACTION)
  # Another patch: a random nonzero offset, so that a replacement never equals the original.
  offset = jax.random.randint(source_rng, (batch, num_patches), 1, num_patches)
  source = (jnp.arange(num_patches)[None] + offset) % num_patches
  return {'corrupted': corrupted, 'masked': masked, 'replaced': replaced, 'source': source}


def loss_and_accuracy(model, params, images, rng, *, train: bool, dropout_rng=None):
  """Per image, over its corrupted patches: mean cross-entropy, top-1 and top-5 colour accuracy,
  each (batch,)."""
  patch_size = tuple(model.patches.size)
  targets = colour_targets(images, patch_size)
  corruption = sample_corruption(rng, images.shape[0], targets.shape[1])
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
  logits = model.apply({'params': params}, images, train=train, patch_corruption=corruption,
                       rngs=rngs).astype(jnp.float32)
  weight = corruption['corrupted'].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  _, top5 = jax.lax.top_k(logits, 5)
  hits = (top5 == targets[..., None]).astype(jnp.float32)
  count = weight.sum(axis=1)
  per_image = lambda values: (values * weight).sum(axis=1) / count
  return per_image(losses), per_image(hits[..., 0]), per_image(hits.max(axis=-1))
