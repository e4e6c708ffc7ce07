"""Optimizers and learning-rate schedules of the paper's recipes, built from optax."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_schedule(config) -> optax.Schedule:
  return schedule(config.total_steps, config.base_lr, config.decay_type, config.warmup_steps)


def schedule(total_steps: int, base_lr: float, decay_type: str, warmup_steps: int,
             linear_end: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to base_lr, then cosine decay to 0 or linear decay to `linear_end`
  at total_steps."""
  if decay_type not in ('linear', 'cosine'):
    raise ValueError(f"Unknown decay_type {decay_type!r}; expected 'linear' or 'cosine'.")
  if decay_type == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup_steps),
       optax.linear_schedule(base_lr, linear_end, total_steps - warmup_steps)],
      boundaries=[warmup_steps])


def kernels_only(params):
  """Weight decay mask: True for the weight matrices (`kernel`), False for biases, LayerNorm
  scales, position embeddings and the class token."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def layer_depth(key: tuple, num_layers: int):
  """A parameter's depth in the network: 0 for the patch embedding, the tokens and position
  embeddings (and a hybrid's ResNet stem), i + 1 for encoder block i (a scanned encoder's
  stacked blocks: an array of depths along their leading layer axis), num_layers + 1 for
  the rest (final norm, head, decoder)."""
  if key[0] in ('embedding', 'cls', 'dist', 'registers', 'mask_token', 'conv_root', 'gn_root') \
      or key[0].startswith('block') or key[:2] == ('Transformer', 'posembed_input'):
    return 0
  if key[0] == 'Transformer' and key[1].startswith('encoderblock_'):
    return int(key[1].split('_')[-1]) + 1
  if key[:2] == ('Transformer', 'encoderblock'):
    return np.arange(1, num_layers + 1)
  return num_layers + 1


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
  """Layer-wise learning-rate decay (BEiT, ViTDet, Segmenter's fine-tuning): the update of a
  parameter at depth d scaled by decay ** (num_layers + 1 - d)."""
  def factors(updates):
    flat = flax.traverse_util.flatten_dict(updates)
    out = {}
    for key, update in flat.items():
      factor = np.asarray(decay, np.float32) ** (num_layers + 1 - layer_depth(key, num_layers))
      out[key] = factor.reshape(factor.shape + (1,) * (update.ndim - factor.ndim))
    return flax.traverse_util.unflatten_dict(out)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f.astype(u.dtype), updates, factors(updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformation:
  schedule = make_schedule(config)
  clip = optax.clip_by_global_norm(config.grad_norm_clip)
  # optim_dtype: Adam's first moment / SGD's momentum (bfloat16 halves its memory, as in the
  # paper's fine-tuning and big_vision); Adam's second moment stays float32.
  dtype = jnp.dtype(config.optim_dtype)
  if config.optimizer == 'adam':
    steps = [clip, optax.adamw(schedule, b1=config.b1, b2=config.b2, mu_dtype=dtype,
                               weight_decay=config.weight_decay, mask=kernels_only)]
  else:
    steps = [clip, optax.add_decayed_weights(config.weight_decay, mask=kernels_only),
             optax.sgd(schedule, momentum=config.momentum, accumulator_dtype=dtype)]
  if config.layer_decay != 1.0:
    steps.append(scale_by_layer_decay(config.layer_decay, config.model.transformer.num_layers))
  return optax.chain(*steps)
