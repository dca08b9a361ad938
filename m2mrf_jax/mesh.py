"""The device mesh: one 'data' axis over every device of every process, and batches laid out on it."""
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh() -> Mesh:
  """A 1-D 'data' mesh of this process's devices (evaluation: each process scores its own images)."""
  return Mesh(np.array(jax.local_devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  """Parameters, BN statistics and optimizer state: a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """A global batch: its leading axis split over the 'data' axis of `mesh`."""
  return NamedSharding(mesh, P('data'))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """This process's NumPy rows {'image', 'label'} -> global arrays sharded over 'data'."""
  rows = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(rows, np.asarray(v))
          for k, v in local_batch.items()}
