"""The Flax NNX model against the independent PyTorch statement of the official model.

Random weights and random BN running statistics (tests/torch_reference.py), converted with
`m2mrf_jax.convert.load_state_dict`; W18 logits in eval and train mode and the BN running statistics
after one train-mode forward; W48 parameter and key counts of the official model.

The JAX model runs op by op (no jit): XLA compiles each small op once per shape and the cache is shared
by every variant, while a jitted W18 forward costs 15-40 s CPU of compilation per variant and size.
"""
import copy
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from m2mrf_jax import convert
from m2mrf_jax import hrnet
from m2mrf_jax import models
from tests import torch_reference
from tests.conftest import tiered

torch.set_num_threads(1)  # 2-core CI: intra-op threads only contend.

SIZES = ((61, 83), (100, 150))
RTOL = 1e-4  # max abs difference <= RTOL * max(1, max |reference|)

# Official segmentor with W48 and 4 classes: parameters (no BN buffers), state_dict keys (with them).
W48_COUNTS = {
    'base': (65_847_844, 1838),
    'a': (69_932_536, 2228),
    'b': (67_154_896, 2356),
    'c': (70_297_900, 2436),
    'd': (67_520_260, 2564),
}


def flat_state(model, what=nnx.Variable):
  """NNX state (the Variables that filter `what` selects) as {mmseg key: value}.

  The module paths spell the mmseg keys.
  """
  return {'.'.join(str(p) for p in path): v.get_value()
          for path, v in nnx.to_flat_state(nnx.state(model, what))}


class _FixedKey:
  """Stands in for nnx.Rngs at shape inference: `nnx.Rngs` counters cost ~10 s CPU to trace."""

  def params(self):
    return jax.random.key(0)


def abstract_model(variant, width):
  """`models.build`'s model with ShapeDtypeStructs for values."""
  return nnx.eval_shape(lambda: models.build(common.model_config(variant, width), _FixedKey()))


def build_filled(variant, width, seed=None):
  """`models.build`'s model with zeros (seed None) or N(0, 1) values everywhere, built quickly.

  Eager initialisation compiles a random kernel per parameter shape (~50 s CPU for the first model);
  the parity tests overwrite every value anyway, or check which ones a loader leaves untouched.
  """
  graphdef, state = nnx.split(abstract_model(variant, width))
  rng = np.random.default_rng(seed)
  fill = (lambda s: np.zeros(s.shape, s.dtype)) if seed is None else (
      lambda s: rng.standard_normal(s.shape).astype(s.dtype))
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(fill(s)), state))


def scaled_error(actual, expected):
  """max |actual - expected| / max(1, max |expected|)."""
  expected = np.asarray(expected, np.float64)
  return np.abs(np.asarray(actual, np.float64) - expected).max() / max(1.0, np.abs(expected).max())


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(y):
  return y.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module', params=tiered(hrnet.VARIANTS, fast=('c',)))
def converted(request):
  """(variant, randomized W18 torch segmentor in eval mode, the converted NNX model)."""
  variant = request.param
  torch.manual_seed(0)
  reference = torch_reference.randomize_(torch_reference.build_torch_model(variant, width=18), seed=1)
  model = build_filled(variant, 18)
  convert.load_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})
  return variant, reference, model


def images(size, seed):
  return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize('variant', hrnet.VARIANTS)
def test_w48_counts_equal_the_official_model(variant):
  with torch.device('meta'):
    reference = torch_reference.build_torch_model(variant, width=48)
  params, keys = W48_COUNTS[variant]
  assert sum(p.numel() for p in reference.parameters()) == params
  sd = reference.state_dict()
  assert len(sd) == keys
  abstract = abstract_model(variant, 48)
  jax_params = flat_state(abstract, nnx.Param)
  assert sum(math.prod(v.shape) for v in jax_params.values()) == params
  jax_keys = set(flat_state(abstract, (nnx.Param, nnx.BatchStat)))
  assert jax_keys == {k for k in sd if not k.endswith('num_batches_tracked')}


def test_eval_logits_match(converted):
  variant, reference, model = converted
  model.eval()
  for seed, size in enumerate(SIZES):
    x = images(size, seed)
    with torch.no_grad():
      expected = nhwc(reference(nchw(x)))
    actual = np.asarray(model(x))
    assert actual.shape == (2, *size, 4)
    err = scaled_error(actual, expected)
    assert err <= RTOL, f'{variant} {size}: max abs diff / logit scale = {err:.3g}'


def test_train_mode_forward_and_running_statistics_match(converted):
  variant, reference, model = converted
  reference, model = copy.deepcopy(reference).train(), nnx.clone(model)
  model.train()
  x = images(SIZES[0], seed=7)
  with torch.no_grad():
    expected = nhwc(reference(nchw(x)))
  actual = np.asarray(model(x))
  err = scaled_error(actual, expected)
  assert err <= RTOL, f'{variant} train-mode logits: max abs diff / logit scale = {err:.3g}'

  stats = flat_state(model, nnx.BatchStat)
  sd = reference.state_dict()
  assert set(stats) == {k for k in sd if k.endswith(('running_mean', 'running_var'))}
  errors = {k: scaled_error(v, sd[k].numpy()) for k, v in stats.items()}
  worst = max(errors, key=errors.get)
  assert errors[worst] <= RTOL, f'{variant} {worst}: scaled error {errors[worst]:.3g}'
