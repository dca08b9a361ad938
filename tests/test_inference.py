"""inference.logits: flip TTA = mirror the input, run, mirror back, average; 'none' = the model's logits."""
from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m2mrf_jax import inference
from tests.tiny_model import TinySegmenter

pytestmark = pytest.mark.usefixtures('fast_compile')


class Ramp(nnx.Module):
  """Logits = 2 x (first channel) + a ramp across the columns: the model is not mirror-symmetric."""

  def __call__(self, x):
    w = x.shape[2]
    return 2 * x[..., :1] + jnp.arange(w, dtype=jnp.float32)[:, None] * jnp.arange(1, 5) / w


def ramp_numpy(x):
  w = x.shape[2]
  return 2 * x[..., :1] + np.arange(w)[:, None] * np.arange(1, 5) / w


def test_flip_averages_the_mirrored_logits_mirrored_back():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  got = np.asarray(inference.logits(Ramp(), x, 'flip'))
  want = (ramp_numpy(x) + ramp_numpy(x[:, :, ::-1])[:, :, ::-1]) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Written out: the first channel is mirror-equivariant (kept), the ramp becomes its symmetric mean.
  ramp = np.arange(7)[:, None] * np.arange(1, 5) / 7
  np.testing.assert_allclose(got, 2 * x[..., :1] + (ramp + ramp[::-1]) / 2, rtol=1e-6, atol=1e-6)
  assert np.abs(got - ramp_numpy(x)).max() > 0.5  # the augmentation changed something


def test_flip_on_a_conv_model_and_none_is_the_model():
  config = ml_collections.ConfigDict(dict(width=4, num_classes=4))
  model = TinySegmenter(config, nnx.Rngs(0))
  model.eval()
  x = np.random.default_rng(1).normal(size=(1, 6, 9, 3)).astype(np.float32)
  plain = np.asarray(model(x))
  np.testing.assert_array_equal(np.asarray(inference.logits(model, x)), plain)
  np.testing.assert_array_equal(np.asarray(inference.logits(model, x, 'none')), plain)
  mirrored = np.asarray(model(np.ascontiguousarray(x[:, :, ::-1])))[:, :, ::-1]
  got = np.asarray(inference.logits(model, x, 'flip'))
  np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
  assert np.abs(got - plain).max() > 1e-3  # a 3x3 conv with random weights is not mirror-symmetric


def test_unknown_tta_names_the_setting():
  with pytest.raises(ValueError, match="tta must be one of none, flip, got 'hflip'"):
    inference.logits(Ramp(), np.zeros((1, 2, 2, 3), np.float32), 'hflip')
