"""Joining a multi-process job, and which rows of the global batch this process feeds.

`initialize` wraps `jax.distributed.initialize` with checks that fail fast naming the setting: JAX's
own client aborts the process (a C++ check failure) after its timeout when the coordinator cannot be
reached, and says nothing of which flag was wrong. With no settings, JAX discovers TPU pods, SLURM
and Open MPI jobs itself.
"""
import socket
import time

from absl import logging
import jax

# Where each setting comes from, for messages: flag / environment variable.
SETTINGS = {
    'coordinator_address': '--coordinator_address / $JAX_COORDINATOR_ADDRESS',
    'num_processes': '--num_processes / $M2MRF_NUM_PROCESSES',
    'process_id': '--process_id / $M2MRF_PROCESS_ID',
}


def _split_address(address):
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'coordinator address {address!r} ({SETTINGS["coordinator_address"]}) is not '
                     'HOST:PORT, e.g. 10.0.0.1:12345')
  return host.strip('[]'), int(port)


def _resolve(host, port):
  try:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ValueError(f'coordinator host {host!r} ({SETTINGS["coordinator_address"]}) does not '
                     f'resolve: {e}') from None


def _check_bindable(address):
  """Process 0 runs the coordinator: its address must be one of this host's, with the port free."""
  host, port = _split_address(address)
  for family, kind, proto, _, sockaddr in _resolve(host, port):
    with socket.socket(family, kind, proto) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(sockaddr)
        return
      except OSError as e:
        error = e
  raise ValueError(f'process 0 runs the coordinator, but cannot listen on {address} '
                   f'({SETTINGS["coordinator_address"]}): {error}. Give process 0\'s own address and '
                   'a free port.')


def _wait_reachable(address, timeout):
  """Waits until a TCP connection to the coordinator succeeds; raises after `timeout` seconds."""
  host, port = _split_address(address)
  _resolve(host, port)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, max(timeout, 0.1))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise TimeoutError(
            f'cannot reach the coordinator at {address} ({SETTINGS["coordinator_address"]}) within '
            f'{timeout:g} s ({e}): is process 0 running, and is that its address and port? '
            '(--initialization_timeout sets the wait)') from None
      time.sleep(0.5)


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               initialization_timeout=300):
  """`jax.distributed.initialize` after checking the settings; call before anything uses a device.

  Args:
    coordinator_address: HOST:PORT of process 0 (None: JAX's $JAX_COORDINATOR_ADDRESS or the cluster's).
    num_processes: the number of processes (None: from the cluster environment).
    process_id: this process, 0 .. num_processes - 1 (None: from the cluster environment).
    initialization_timeout: seconds to wait for the coordinator and for every process to join.

  Raises:
    ValueError: a setting is malformed or out of range, or process 0 cannot listen on the address.
    TimeoutError: the coordinator cannot be reached within `initialization_timeout`.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'num_processes={num_processes} ({SETTINGS["num_processes"]}) must be >= 1')
  if process_id is not None and process_id < 0:
    raise ValueError(f'process_id={process_id} ({SETTINGS["process_id"]}) must be >= 0')
  if None not in (num_processes, process_id) and process_id >= num_processes:
    raise ValueError(f'process_id={process_id} ({SETTINGS["process_id"]}) is out of range for '
                     f'num_processes={num_processes} ({SETTINGS["num_processes"]}): use 0 .. '
                     f'{num_processes - 1}')
  if coordinator_address is not None and process_id is not None:
    if process_id == 0:
      _check_bindable(coordinator_address)
    else:
      _wait_reachable(coordinator_address, initialization_timeout)
  logging.info('joining the job: coordinator %s, %s processes, process id %s (None: from the '
               'cluster environment); waiting up to %d s', coordinator_address, num_processes,
               process_id, initialization_timeout)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)
  except ValueError as e:  # JAX found neither the setting nor a cluster environment
    raise ValueError(f'{e} Set {", ".join(SETTINGS.values())}, or run under a TPU pod, SLURM or '
                     'Open MPI.') from None


def process_rows(sharding, batch_size):
  """The sorted rows of a (batch_size, ...) global batch that `sharding` puts on this process's devices.

  These are the rows `jax.make_array_from_process_local_data(sharding, local)` takes `local` to be, in
  order.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return tuple(sorted(rows))
