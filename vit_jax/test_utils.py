"""The official repository's `vit_jax.test_utils`: a checkpoint of an untrained model, for tests
that need a pretrained_path (or pretrained_dir) without downloading one."""

import jax
import jax.numpy as jnp

from vit_jax import checkpoint, models_vit


def create_checkpoint(model_config, path: str, *, num_classes: int = 1, image_size: int = 16):
  """Writes the randomly initialised parameters of VisionTransformer(**model_config) (a head of
  `num_classes`, position embeddings for `image_size` pixels square) as an official .npz."""
  model = models_vit.VisionTransformer(num_classes=num_classes, **model_config)
  images = jnp.ones((1, image_size, image_size, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images, train=False)['params']
  checkpoint.save(params, path)
