"""m2mrf_jax's CPU runtime settings: importing the package makes repeated calls reuse their memory
(no page faults once warm) and dispatch inline; $M2MRF_JAX_CPU_RUNTIME=0 leaves JAX's defaults."""
import os
import subprocess
import sys

import pytest

from m2mrf_jax import cpu_runtime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
MIB = 64

# Calls of a program whose result is a fresh 64 MiB array each call, the first checked against NumPy:
# the fewest minor page faults (resource.getrusage) of four calls in a row over five such windows, and
# JAX's dispatch setting. The fewest, because glibc (2.36) serves XLA's aligned 64 MiB request only from
# a free chunk with room for the alignment: a freed result has that room only once it has merged with
# the slack beside it, and when a small allocation lands in that slack first, the heap grows by one
# result: one call's 16384 faults in 8 of 40 runs of four calls, three processes at a time, and never
# more than two such calls in 30 runs of eight. JAX's default maps and unmaps each result, so every
# window faults.
FAULTS = f"""
import resource, sys
if sys.argv[1] == 'package':
  import m2mrf_jax
import jax, jax.numpy as jnp, numpy as np
x = jnp.arange({MIB} * 2**18, dtype=jnp.float32)
double = jax.jit(lambda x: x * 2)
np.testing.assert_array_equal(np.asarray(double(x))[-3:], np.arange({MIB} * 2**18)[-3:] * 2.0)
windows = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(4):
    y = double(x)
    y.block_until_ready()
    del y
  windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(windows), jax.config.values['jax_cpu_enable_async_dispatch'])
"""


def _run(script, *args, **env):
  """stdout of `script` in a fresh CPU process (no XLA_FLAGS) with `args` and extra `env`."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **env}
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  return out.stdout


def _faults(mode, **env):
  faults, asynchronous = _run(FAULTS, mode, **env).split()
  return int(faults), asynchronous == 'True'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc settings")
def test_importing_the_package_removes_the_page_faults_of_repeated_calls():
  pages = 4 * MIB * 2**20 // os.sysconf('SC_PAGE_SIZE')  # four fresh 64 MiB results
  plain, plain_async = _faults('jax')
  assert plain >= 0.5 * pages and plain_async  # JAX's default: each result faulted in afresh
  ours, ours_async = _faults('package')
  assert ours < 0.05 * pages and not ours_async
  opted_out, opted_out_async = _faults('package', **{cpu_runtime.OPT_OUT: '0'})
  assert opted_out >= 0.5 * pages and opted_out_async


# Two allocations of 2.25 GiB from NumPy (the process's malloc, as XLA's buffers), each written whole:
# the page faults of each (huge pages count one fault each). Above 2 GiB, mallopt's largest positive
# trim threshold no longer keeps the freed heap (the W48 forward at 956x1440 peaks at 3.1 GiB).
LARGE = """
import ctypes, resource, sys
import m2mrf_jax
if len(sys.argv) > 1:  # a trim threshold set after the package's
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt(m2mrf_jax.cpu_runtime.M_TRIM_THRESHOLD, int(sys.argv[1]))
import numpy as np
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.ones(9 * 2**26, np.float32)
  assert a[::4096].sum() == 9 * 2**14
  del a
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc settings")
def test_freed_heap_is_kept_beyond_2_gib():
  faults = lambda *threshold: [int(v) for v in _run(LARGE, *threshold).split()]
  first, again = faults()
  assert first > 0 and again < 0.05 * first  # the second allocation reuses the first's pages
  first, again = faults(str(2**31 - 1))  # the largest positive threshold: trimmed, faulted in again
  assert again >= 0.5 * first


def test_applies_unless_the_environment_opts_out():
  assert cpu_runtime.applies({})
  assert cpu_runtime.applies({cpu_runtime.OPT_OUT: '1'})
  assert not cpu_runtime.applies({cpu_runtime.OPT_OUT: '0'})
  assert cpu_runtime.describe({}) == 'cpu_runtime on'
  assert cpu_runtime.describe({cpu_runtime.OPT_OUT: '0'}) == 'cpu_runtime off'
