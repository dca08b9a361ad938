"""The device mesh: one 'data' axis over every device of every process, and batches laid out on it."""
import collections
import itertools

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


def prefetch(batches, put, size=2):
  """Yields put(b) for each b of `batches`; when put(b_k) is yielded, put(b_k+1) .. put(b_k+size) are.

  `put` starts the host-to-device copies (`global_batch`; transfers are asynchronous), so while step k
  runs the next `size` inputs are already on their way: the device never waits for one. This is
  flax's old `jax_utils.prefetch_to_device`, for any sharding and multi-process. `batches` is read
  `size` items ahead of what was yielded; what was read ahead and not yielded is dropped (training
  batches are a function of the step: resuming reads them again).
  """
  batches = iter(batches)
  queue = collections.deque(put(b) for b in itertools.islice(batches, size))
  while True:
    queue.extend(put(b) for b in itertools.islice(batches, 1))
    if not queue:
      return
    yield queue.popleft()
