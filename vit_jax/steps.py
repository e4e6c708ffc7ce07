"""The model, its train state and the two jitted steps (train, eval) over a device mesh.

Everything here is built from abstract shapes first (jax.eval_shape), so that the same functions
serve the trainer (train.py), the planner (plan.py: compile-only TPU devices) and the notebook:
parameters and optimizer state are created directly in their shardings; the train step takes
the global batch, sharded over the mesh's data axis, and donates the state. JAX, Flax and optax
only: no TensorFlow.
"""

import jax
import jax.numpy as jnp
import optax

from vit_jax import models, sharding
from vit_jax.models_vit import VisionTransformer


# --------------------------------------------------------------------------------------- model

def create_model(config, num_outputs: int) -> VisionTransformer:
  return models.build(config.model, num_outputs, dtype=jnp.dtype(config.dtype))


def state_initializer(config, model, tx, image_size, objective):
  """rng -> the train state {params, opt_state, step, rng}; jax.eval_shape of it is free."""
  def init(rng):
    init_rng, dropout_rng = jax.random.split(rng)
    images = jnp.zeros((1,) + image_size + (3,))
    extra = objective.init_inputs(init_rng, config.model, image_size)
    params = model.init(init_rng, images, train=False, **extra)['params']
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0),
            'rng': dropout_rng}

  return init


def sharded(init, mesh, strategy: str, rng):
  """What init(rng) gives, without computing it: (ShapeDtypeStructs with their shardings, a
  function that creates it directly in those shardings). Restoring needs only the first."""
  shapes = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(mesh, shapes, strategy)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, lambda: jax.jit(init, out_shardings=shardings)(rng)


def abstract_state(config, model, tx, mesh, image_size, objective):
  init = state_initializer(config, model, tx, image_size, objective)
  return sharded(init, mesh, config.sharding, jax.random.PRNGKey(config.seed))


def init_state(config, model, tx, mesh, image_size, objective):
  """The train state, created directly in its shardings, and the shardings."""
  abstract, create = abstract_state(config, model, tx, mesh, image_size, objective)
  return create(), shardings_of(abstract)


def shardings_of(abstract):
  return jax.tree.map(lambda x: x.sharding, abstract)


# --------------------------------------------------------------------------------------- steps

def accumulate_gradient(grad_fn, params, images, labels, rng, accum_steps: int):
  """grad_fn(params, images, labels, rng) -> (loss, grads), averaged over `accum_steps`
  micro-batches of the batch, computed one after the other to save memory (0 or 1: at once)."""
  if accum_steps <= 1:
    return grad_fn(params, images, labels, rng)
  # Micro-batch i takes examples i, i + accum, ...: every device keeps its own examples.
  micro = lambda tree: jax.tree.map(
      lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), tree)

  def add_micro_batch(carry, xs):
    images, labels, i = xs
    loss, grads = grad_fn(params, images, labels, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  xs = (micro(images), micro(labels), jnp.arange(accum_steps))
  total, _ = jax.lax.scan(add_micro_batch, zero, xs)
  return jax.tree.map(lambda x: x / accum_steps, total)


def make_train_step(config, model, tx, schedule, shardings, mesh, objective):
  def loss_fn(params, images, labels, rng):
    return objective.loss(model, params, {'image': images, 'labels': labels}, rng)

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state, batch):
    params, rng = state['params'], jax.random.fold_in(state['rng'], state['step'])
    loss, grads = accumulate_gradient(grad_fn, params, batch['image'], batch['labels'], rng,
                                      config.accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    # A non-finite loss, gradient or update (whatever made it: the optimizer's state, its
    # hyper-parameters) leaves the state as it was; the loop then stops the run.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {'params': keep_finite(optax.apply_updates(params, updates), params),
                 'opt_state': keep_finite(opt_state, state['opt_state']),
                 'step': state['step'] + 1, 'rng': state['rng']}
    metrics = {'train_loss': loss, 'lr': schedule(state['step']), 'grad_norm': grad_norm,
               'update_norm': update_norm}
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(sharding.under_mesh(train_step, mesh), in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def abstract_params(config, model, mesh, image_size, objective):
  """The parameters alone (no optimizer state): see `sharded`."""
  def init(rng):
    extra = objective.init_inputs(rng, config.model, image_size)
    return model.init(rng, jnp.zeros((1,) + image_size + (3,)), train=False, **extra)['params']
  return sharded(init, mesh, config.sharding, jax.random.PRNGKey(config.seed))


def make_eval_step(objective, model, params_shardings, mesh):
  def eval_step(params, batch):
    return objective.eval_sums(model, params, batch)

  return jax.jit(sharding.under_mesh(eval_step, mesh),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
