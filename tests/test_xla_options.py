"""m2mrf_jax's XLA option (set by importing the package, reaching XLA:CPU, a user's own choice kept)
and the persistent compilation cache of the command-line tools."""
import os
import subprocess
import sys

import numpy as np
import pytest

from m2mrf_jax import xla_options

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

# A shared callee (jax.nn.relu, lowered as one function called twice) between two elementwise ops:
# fused into one loop when XLA inlines before fusing, kept apart (several fusions) when it inlines after.
COUNT_FUSIONS = """
text = jax.jit(lambda x: jax.nn.relu(x * 3) + jax.nn.relu(x - 1)).lower(jnp.ones((8, 8))).compile().as_text()
fusions = len(re.findall(r' fusion\\(', text))
"""
FUSIONS = """
import re
import m2mrf_jax
import jax, jax.numpy as jnp
""" + COUNT_FUSIONS + "print(fusions)\n"


def _run(script, *args, xla_flags=None):
  """stdout of `script` in a fresh CPU process with `args` and XLA_FLAGS `xla_flags` (None: unset)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  env.pop('XLA_FLAGS', None)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  out = subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  return out.stdout


def _fusions(xla_flags):
  return int(_run(FUSIONS, xla_flags=xla_flags).split()[-1])


def test_with_option_appends_once_and_keeps_a_users_extra_options():
  assert xla_options.with_option(None) == xla_options.OPTION
  assert xla_options.with_option(' --xla_force_host_platform_device_count=8 ') == (
      '--xla_force_host_platform_device_count=8 ' + xla_options.OPTION)
  once = xla_options.with_option('')
  assert xla_options.with_option(once) == once
  users = '--xla_backend_extra_options=xla_cpu_disable_platform_dependent_math'
  assert xla_options.with_option(users) == users
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  xla_options.apply(env)
  assert env == {'XLA_FLAGS': '--xla_dump_to=/tmp/x ' + xla_options.OPTION}


def test_importing_the_package_sets_the_option_for_xla():
  # A user's own extra options (another one) are kept: XLA inlines first, one fusion.
  assert _fusions('--xla_backend_extra_options=xla_cpu_disable_platform_dependent_math') == 1
  # Importing m2mrf_jax, with no XLA_FLAGS or with others: the option reaches XLA:CPU.
  assert _fusions(None) > 1
  assert _fusions('--xla_force_host_platform_device_count=2') > 1


# Importing the package after a JAX computation: the warnings it raises, and the fusions XLA then makes
# (one: the option did not reach it), as against importing it first.
LATE = """
import re, sys, warnings
import jax, jax.numpy as jnp
if sys.argv[1] == 'late':
  jnp.ones(3).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  import m2mrf_jax
""" + COUNT_FUSIONS + """
print(sum('imported after JAX started its backend' in str(w.message) for w in caught), fusions)
"""


@pytest.mark.parametrize('order', ['first', 'late'])
def test_importing_the_package_after_a_jax_computation_warns_that_its_settings_are_lost(order):
  warned, fusions = _run(LATE, order).split()
  if order == 'late':
    assert int(warned) == 1 and int(fusions) == 1
  else:
    assert int(warned) == 0 and int(fusions) > 1


# One compile in a fresh process: what use_compilation_cache returned, JAX's cache hits (its monitoring
# events) and the files in the cache folders.
CACHED = """
import sys
from m2mrf_jax import xla_options
import jax, jax.numpy as jnp, numpy as np
def product(x):
  return jnp.sin(x) @ x.T
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == '/jax/compilation_cache/cache_hits' else None)
used = xla_options.use_compilation_cache(sys.argv[1])
print(used, np.asarray(jax.jit(product)(np.ones((8, 8), np.float32))).sum(), len(hits))
"""


def _cached(tmp_path, directory, **env):
  env = {**{k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'},
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, 'HOME': str(tmp_path / 'home'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **env}
  out = subprocess.run([sys.executable, '-c', CACHED, directory], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  used, value, hits = out.stdout.split()
  assert float(value) == pytest.approx(8 * 8 * 8 * np.sin(1.0), rel=1e-6)
  return used, int(hits)


def _entries(folder):
  return sorted(p.name for p in folder.glob('jit_*')) if folder.exists() else []


def test_compilation_cache_is_written_then_loaded_by_a_later_process(tmp_path):
  cache = tmp_path / 'cache'
  assert _cached(tmp_path, str(cache)) == (str(cache), 0)
  assert [name.split('-')[0] for name in _entries(cache)] == ['jit_product']
  assert _cached(tmp_path, str(cache)) == (str(cache), 1)  # the second process loads it


def test_compilation_cache_defaults_expand_home_and_defer_to_the_users_variable(tmp_path):
  home = tmp_path / 'home' / '.cache' / 'm2mrf_jax' / 'jit'
  assert _cached(tmp_path, xla_options.CACHE_DIR) == (str(home), 0)  # '~' is expanded
  assert _entries(home)
  users = tmp_path / 'users'
  assert _cached(tmp_path, str(tmp_path / 'ours'), JAX_COMPILATION_CACHE_DIR=str(users)) == (
      str(users), 0)
  assert _entries(users) and not _entries(tmp_path / 'ours')
  assert _cached(tmp_path, '') == ('None', 0)  # '' = no cache
