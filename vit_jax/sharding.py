"""The device mesh, shardings of parameters and batches, and host-local -> global arrays.

One mesh axis, 'data', spans every device of every process. Batches are split along it;
parameters (and the optimizer state, which has their shapes) are either replicated or, with
FSDP, split along it too: each parameter on its largest dimension that divides evenly.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, size: int) -> P:
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state, strategy: str):
  """Shardings for a pytree of arrays (or ShapeDtypeStructs): 'replicate' or 'fsdp'."""
  size = mesh.shape[DATA_AXIS]

  def sharding(leaf):
    if strategy == 'fsdp' and leaf.ndim > 0 and size > 1:
      return NamedSharding(mesh, _fsdp_spec(leaf.shape, size))
    return replicated(mesh)

  return jax.tree.map(sharding, abstract_state)


def to_global(batch, mesh: Mesh):
  """This process' numpy batch -> global jax.Arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
