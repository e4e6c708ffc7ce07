"""Optimizers and learning-rate schedules of the paper's recipes, built from optax."""

import flax
import jax.numpy as jnp
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


def make_optimizer(config) -> optax.GradientTransformation:
  schedule = make_schedule(config)
  clip = optax.clip_by_global_norm(config.grad_norm_clip)
  # optim_dtype: Adam's first moment / SGD's momentum (bfloat16 halves its memory, as in the
  # paper's fine-tuning and big_vision); Adam's second moment stays float32.
  dtype = jnp.dtype(config.optim_dtype)
  if config.optimizer == 'adam':
    return optax.chain(clip, optax.adamw(schedule, b1=config.b1, b2=config.b2, mu_dtype=dtype,
                                         weight_decay=config.weight_decay, mask=kernels_only))
  decay = optax.add_decayed_weights(config.weight_decay, mask=kernels_only)
  return optax.chain(clip, decay, optax.sgd(schedule, momentum=config.momentum,
                                            accumulator_dtype=dtype))
