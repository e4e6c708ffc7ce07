"""The official repository's `vit_jax.utils`, for its notebook (vit_jax.ipynb): the learning-rate
schedule under its official name. Its other helpers live here as steps.accumulate_gradient and
train.make_update_fn."""

import optax

from vit_jax import optim


def create_learning_rate_schedule(total_steps: int, base: float, decay_type: str,
                                  warmup_steps: int, linear_end: float = 1e-5) -> optax.Schedule:
  """Linear warm-up to `base`, then cosine decay to 0 or linear decay to `linear_end`."""
  return optim.schedule(total_steps, base, decay_type, warmup_steps, linear_end)
