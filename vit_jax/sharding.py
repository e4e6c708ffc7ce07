"""The device mesh, shardings of parameters and batches, and host-local -> global arrays.

One mesh axis, 'data', spans every device of every process. Batches are split along it;
parameters (and the optimizer state, which has their shapes) are either replicated or, with
FSDP, split along it too: each parameter on its largest dimension that divides evenly (never a
scanned encoder's layer axis).
"""

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
# The name of a scanned encoder's one block (models_vit): its arrays' leading axis is the layer
# axis, which FSDP never splits (each step of the scan takes one layer).
SCANNED_BLOCK = 'encoderblock'


def make_mesh(devices=None) -> Mesh:
  """The mesh over `devices` (default: every device of every process). Its devices decide the
  program compiled under it: real ones, simulated CPU devices or a TPU topology's."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, size: int, first_dim: int = 0) -> P:
  for dim in sorted(range(first_dim, len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state, strategy: str):
  """Shardings for a pytree of arrays (or ShapeDtypeStructs): 'replicate' or 'fsdp'."""
  size = mesh.shape[DATA_AXIS]

  def sharding(path, leaf):
    if strategy == 'fsdp' and leaf.ndim > 0 and size > 1:
      # A scanned encoder's layer axis stays whole: each step of the scan takes one layer.
      scanned = any(getattr(k, 'key', None) == SCANNED_BLOCK for k in path)
      return NamedSharding(mesh, _fsdp_spec(leaf.shape, size, first_dim=int(scanned)))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_sharded(x):
  """x, split along its batch over every device when traced under a mesh (train.py's steps):
  XLA then gathers an FSDP-sharded weight where it is used instead of gathering the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  # Only the mesh's automatic axes: under jax.pmap or shard_map the batch axis is manual, and
  # each device already holds its own examples.
  axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind == jax.sharding.AxisType.Auto) if not mesh.empty else ()
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def under_mesh(fn, mesh: Mesh):
  """fn, traced with `mesh` as the abstract mesh: the model then pins its activations to the
  batch split (batch_sharded), and the model takes the code paths of the mesh's devices
  (cpu_tuning.over_tokens)."""
  @functools.wraps(fn)  # Its name names the compiled program (and its cache entry).
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


def to_global(batch, mesh: Mesh):
  """This process' numpy batch -> global jax.Arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def gather(tree, mesh: Mesh):
  """Every process gets the whole of each (possibly FSDP-sharded) array, as numpy."""
  return jax.device_get(jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree))
