"""The M2MRF operator against a PyTorch unfold/fold statement of the official code, for every scale."""
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2mrf_jax import convert
from m2mrf_jax.resampling.m2mrf import M2MRF

SCALES = [2.0 ** t for t in range(-3, 4)]
SIZES = [(13, 21), (17, 9), (16, 24)]


class TorchM2MRF(torch.nn.Module):
  """The official operator (mmseg/models/utils/m2mrf.py) in NCHW, keys as its state_dict."""

  def __init__(self, scale, cin, cout, p=8, encode_rate=4, fc_rate=64):
    super().__init__()
    enc = int(cin / encode_rate)
    fc = int(p * p * enc / fc_rate)
    self.scale, self.p = scale, p
    self.sample_encode_conv = torch.nn.Conv2d(cin, enc, 1)
    self.sample = torch.nn.Module()
    self.sample.sample_fc = torch.nn.Conv1d(p * p * enc, fc, 1)
    self.sample.sample_fc1 = torch.nn.Conv1d(fc, int(p * p * scale * scale * enc), 1)
    self.sample_decode_conv = torch.nn.Conv2d(enc, cout, 1)

  def forward(self, x):
    h, w = x.shape[2:]
    x = F.pad(x, (0, -w % self.p, 0, -h % self.p))
    oh, ow = max(int(h * self.scale), 1), max(int(w * self.scale), 1)
    x = self.sample_encode_conv(x)
    hp, wp = x.shape[2:]
    v = F.unfold(x, self.p, stride=self.p)
    v = self.sample.sample_fc1(self.sample.sample_fc(v))
    k = int(self.p * self.scale)
    x = F.fold(v, (int(hp * self.scale), int(wp * self.scale)), kernel_size=k, stride=k)
    return self.sample_decode_conv(x)[:, :, :oh, :ow]


def _copy_torch_to_jax(torch_module, module):
  """Every leaf through the converter's layout change, keyed by the official state_dict names."""
  variables = {'.'.join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(module))}
  state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
  assert sorted(state) == sorted(variables)
  for key, variable in variables.items():
    variable[...] = jnp.asarray(convert.from_torch(key, state[key], variable.shape))


@pytest.mark.parametrize('scale', SCALES)
def test_matches_torch_unfold_fold(scale):
  cin, cout = 8, 6
  torch.manual_seed(0)
  ref = TorchM2MRF(scale, cin, cout)
  with torch.no_grad():
    for p in ref.parameters():  # non-zero biases, so padding and bias placement matter
      p.uniform_(-0.5, 0.5)
  module = M2MRF(cin, cout, scale, rngs=nnx.Rngs(0))
  _copy_torch_to_jax(ref, module)
  forward = jax.jit(lambda x: module(x))
  for h, w in SIZES:
    x = np.random.RandomState(h * w).randn(2, h, w, cin).astype(np.float32)
    with torch.no_grad():
      expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(forward(jnp.asarray(x)))
    assert got.shape == (2, max(math.floor(h * scale), 1), max(math.floor(w * scale), 1), cout)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_output_size_is_floor_of_unpadded_size_and_at_least_one():
  module = M2MRF(8, 4, 0.125, rngs=nnx.Rngs(0))
  out = jax.eval_shape(module, jax.ShapeDtypeStruct((1, 5, 239, 8), jnp.float32))
  assert out.shape == (1, 1, 29, 4)  # max(floor(5/8), 1), floor(239/8)
  out = jax.eval_shape(M2MRF(8, 4, 0.5, rngs=nnx.Rngs(0)),
                       jax.ShapeDtypeStruct((1, 239, 119, 8), jnp.float32))
  assert out.shape == (1, 119, 59, 4)  # floor, where a stride-2 conv gives ceil (120, 60)


def test_torch_layout_round_trip():
  module = M2MRF(16, 8, 4.0, rngs=nnx.Rngs(1))
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    key = '.'.join(map(str, path))
    value = np.asarray(variable[...])
    back = convert.from_torch(key, convert.to_torch(key, value), value.shape)
    np.testing.assert_array_equal(back, value)


def test_parameter_shapes_follow_official_rates():
  # enc = C/4, fc = p^2 enc / 64 = enc, fc1 out = (p s)^2 enc: stage-4 fuse 0 <- 3 of W48, one-step.
  module = M2MRF(48, 48, 8.0, rngs=nnx.Rngs(0))
  shapes = {k: convert.to_torch(k, np.asarray(v[...])).shape
            for k, v in ((('.'.join(map(str, p))), v)
                         for p, v in nnx.to_flat_state(nnx.state(module)))}
  assert shapes == {
      'sample_encode_conv.weight': (12, 48, 1, 1), 'sample_encode_conv.bias': (12,),
      'sample.sample_fc.weight': (12, 768, 1), 'sample.sample_fc.bias': (12,),
      'sample.sample_fc1.weight': (49152, 12, 1), 'sample.sample_fc1.bias': (49152,),
      'sample_decode_conv.weight': (48, 12, 1, 1), 'sample_decode_conv.bias': (48,),
  }


def test_xavier_uniform_init_and_zero_bias():
  module = M2MRF(64, 32, 2.0, rngs=nnx.Rngs(3))
  fans = {  # torch (fan_in, fan_out) of each weight
      'sample_encode_conv': (64, 16), 'sample.sample_fc': (1024, 16),
      'sample.sample_fc1': (16, 4096), 'sample_decode_conv': (16, 32)}
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    key = '.'.join(map(str, path))
    value = np.asarray(variable[...])
    if key.endswith('bias'):
      assert not value.any(), key
      continue
    bound = math.sqrt(6.0 / sum(fans[key.removesuffix('.weight')]))
    assert np.abs(value).max() <= bound, key
    assert np.abs(value).max() > 0.95 * bound, key
    # U(-b, b): mean 0, std b / sqrt(3); tolerance ~5 standard errors of the estimates.
    tol = 5 / math.sqrt(value.size)
    assert abs(value.mean()) < bound * tol, key
    assert abs(value.std() / (bound / math.sqrt(3)) - 1) < 2.5 * tol, key


@pytest.mark.parametrize('scale', [3.0, 2.0 ** -4, 16.0])
def test_rejects_unsupported_scale(scale):
  with pytest.raises(ValueError, match='scale'):
    M2MRF(8, 8, scale, rngs=nnx.Rngs(0))
