"""m2mrf_jax's XLA option: set by importing the package, reaching XLA:CPU, a user's own choice kept."""
import os
import subprocess
import sys

from m2mrf_jax import xla_options

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

# A shared callee (jax.nn.relu, lowered as one function called twice) between two elementwise ops:
# fused into one loop when XLA inlines before fusing, kept apart (several fusions) when it inlines after.
FUSIONS = """
import re
import m2mrf_jax
import jax, jax.numpy as jnp
text = jax.jit(lambda x: jax.nn.relu(x * 3) + jax.nn.relu(x - 1)).lower(jnp.ones((8, 8))).compile().as_text()
print(len(re.findall(r' fusion\\(', text)))
"""


def _fusions(xla_flags):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  env.pop('XLA_FLAGS', None)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  out = subprocess.run([sys.executable, '-c', FUSIONS], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  return int(out.stdout.split()[-1])


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
