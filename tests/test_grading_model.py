"""SiAN: the lesion-map pooling against PyTorch, the side attention wiring, and the frozen side branch.

The real Inception-v3 main branch with a tiny stand-in segmenter as the side branch (the wiring is
under test, not HRNet); the forward runs op by op (no jit): every op compiles once per shape.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import grading_common
from m2mrf_jax.grading import sian

torch.set_num_threads(1)


class TinySide(nnx.Module):
  """Stands in for `models.build(model.side)`: backbone (stride-4 conv -> BN) and decode_head (1x1)."""

  def __init__(self, model_config, rngs):
    self.backbone = nnx.Sequential(nnx.Conv(3, 8, (4, 4), strides=4, rngs=rngs),
                                   nnx.BatchNorm(8, rngs=rngs))
    self.decode_head = nnx.Conv(8, model_config.num_classes, (1, 1), rngs=rngs)
    self.dtype = jnp.float32


@pytest.fixture(autouse=True)
def tiny_side(monkeypatch):
  monkeypatch.setattr(sian.models, 'build', TinySide)


@pytest.mark.parametrize('shape,size', [((2, 13, 17, 3), (4, 5)), ((1, 40, 40, 4), (3, 3)),
                                        ((1, 7, 9, 2), (7, 9)), ((1, 5, 6, 1), (8, 11))])
def test_adaptive_max_pool_matches_torch(shape, size):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  want = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), size)
  got = sian.adaptive_max_pool(jnp.asarray(x), size)
  np.testing.assert_array_equal(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))


def _config(attention='conv', freeze=True):
  m = grading_common.model_config('idrid_grading', side_variant='c', side_width=18)
  m.attention = attention
  m.freeze_side = freeze
  m.dropout = 0.0
  return m


@pytest.fixture(scope='module')
def pixels():
  return np.random.default_rng(1).uniform(0, 255, (2, 80, 80, 3)).astype(np.float32)


def test_maxpool_attention_weights_the_features_with_the_lesion_maps(pixels):
  model = sian.build(_config('maxpool'), nnx.Rngs(0))
  model.eval()
  logits, lesions = model(pixels)
  assert logits.shape == (2, 5) and lesions.shape == (2, 20, 20, 4)
  # Eq. 6 restated in NumPy: weights = channel-wise max of the lesion maps pooled onto f's grid.
  features = np.asarray(model.main.features(pixels / 127.5 - 1.0))
  probs = 0.5 * (1 + np.tanh(0.5 * np.asarray(lesions, np.float64)))  # the sigmoid
  grid = features.shape[1:3]  # 1x1 at 80x80: the max over the whole map
  assert grid == (1, 1)
  weights = probs.max(axis=(1, 2, 3))[:, None, None, None]
  pooled = (features * weights).mean(axis=(1, 2))
  want = pooled @ np.asarray(model.main.fc.weight[...]) + np.asarray(model.main.fc.bias[...])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)
  # The side branch sees the segmenter's normalisation of the same pixels.
  x = (pixels - np.array(model.side_mean)) / np.array(model.side_std)
  side = model.side
  np.testing.assert_allclose(np.asarray(lesions), np.asarray(side.decode_head(side.backbone(x))),
                             rtol=1e-5, atol=1e-5)


def test_frozen_side_branch_gets_no_update_and_stays_in_eval_mode(pixels, fast_compile):
  config = _config('conv', freeze=True)
  model = sian.build(config, nnx.Rngs(0))
  model.train()
  assert model.side.backbone.layers[1].use_running_average  # eval mode
  assert not model.main.Conv2d_1a_3x3.bn.use_running_average  # train mode
  trainable = sian.trainable(config)
  params = nnx.state(model, trainable)
  assert not any('side' in map(str, path) for path, _ in nnx.to_flat_state(params))
  side_before = jax.tree.map(np.asarray, nnx.state(model.side))

  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(pixels)[0] ** 2), argnums=nnx.DiffState(0, trainable)))(model)
  attention_grad = np.abs(np.asarray(grads['attention']['conv1']['weight'])).sum()
  assert attention_grad > 0  # the lesion maps reach the loss through the attention block
  side_after = jax.tree.map(np.asarray, nnx.state(model.side))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(side_before),
                                                  jax.tree.leaves(side_after)))
  # Unfrozen, the side branch trains (train-mode BN, in the optimised parameters).
  unfrozen = _config('conv', freeze=False)
  assert any('side' in map(str, path) for path, _ in
             nnx.to_flat_state(nnx.state(sian.build(unfrozen, nnx.Rngs(0)), sian.trainable(unfrozen))))
