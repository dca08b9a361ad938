"""Test session setup: 8 fake CPU devices for the sharding tests, before anything imports jax.

Also: `tiered(values, fast)` (parameters outside `fast` are marked slow) and the `fast_compile`
fixture, which turns off most XLA optimisations for tests that check plumbing, not speed
(as flax's imagenet test does).
"""
import os

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def tiered(values, fast):
  """pytest parameters of `values`; those not in `fast` carry the `slow` mark."""
  return [pytest.param(v, marks=() if v in fast else pytest.mark.slow) for v in values]


@pytest.fixture
def fast_compile():
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)
