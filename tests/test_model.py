"""The segmentor: exact W48 parameter counts, branch/output shapes, BN modes, bf16, remat, init."""
import math

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.common import model_config
from m2mrf_jax import hrnet
from m2mrf_jax import layers
from m2mrf_jax import models
from m2mrf_jax.resampling.m2mrf import M2MRF
from tests.conftest import tiered

# The official segmentor, W48 + FCN head, 4 classes (paper Table / official-code.md section 2):
# total parameters, M2MRF-only parameters, M2MRF instances, state_dict keys.
OFFICIAL_W48 = {
    'base': (65_847_844, 0, 0, 1838),
    'a': (69_932_536, 11_212_788, 65, 2228),
    'b': (67_154_896, 8_435_148, 81, 2356),
    'c': (70_297_900, 11_576_328, 81, 2436),
    'd': (67_520_260, 8_798_688, 97, 2564),
}


def _abstract(variant, width=18, **overrides):
  config = model_config(variant, width)
  config.update(overrides)
  return nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))


def _eval_shape(fn, model, *args):
  """Output shapes of `fn(model, *args)` for an abstract model."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda s, *a: fn(nnx.merge(graphdef, s), *a), state, *args)


def _size(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize('variant', list(OFFICIAL_W48))
def test_w48_parameter_counts_equal_official(variant):
  model = _abstract(variant, 48)
  total, m2mrf_params, n_m2mrf, n_keys = OFFICIAL_W48[variant]
  assert _size(nnx.state(model, nnx.Param)) == total
  m2mrfs = [m for _, m in nnx.iter_graph(model) if isinstance(m, M2MRF)]
  assert len(m2mrfs) == n_m2mrf
  assert sum(_size(nnx.state(m, nnx.Param)) for m in m2mrfs) == m2mrf_params
  # state_dict keys = parameters + BN statistics + one num_batches_tracked per BN.
  n_bn = sum(isinstance(m, layers.BatchNorm) for _, m in nnx.iter_graph(model))
  assert len(jax.tree.leaves(nnx.state(model))) + n_bn == n_keys
  head = _size(nnx.state(model.decode_head, nnx.Param))
  assert head == 522_724


def _branch_sizes(h, w, variant):
  """Independent statement: stem (2 x ceil), then per branch ceil (strided conv) or floor (M2MRF)."""
  for _ in range(2):
    h, w = -(-h // 2), -(-w // 2)
  sizes = [(h, w)]
  for _ in range(3):
    h, w = (-(-h // 2), -(-w // 2)) if variant == 'base' else (h // 2, w // 2)
    sizes.append((h, w))
  return sizes


@pytest.mark.parametrize('variant', tiered(OFFICIAL_W48, fast=('base', 'c')))
def test_branch_and_output_shapes_on_odd_sizes(variant):
  model = _abstract(variant)
  model.eval()
  x = jax.ShapeDtypeStruct((2, 61, 83, 3), jnp.float32)
  branches = _eval_shape(lambda m, x: m.backbone(x), model, x)
  expected = [(2, h, w, 18 * 2 ** k) for k, (h, w) in enumerate(_branch_sizes(61, 83, variant))]
  assert [b.shape for b in branches] == expected
  out = _eval_shape(lambda m, x: m(x), model, x)
  assert out.shape == (2, 61, 83, 4) and out.dtype == jnp.float32


def test_cascade_up_keys_and_paths_mirror_mmseg():
  model = _abstract('d')
  keys = {'.'.join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model))}
  assert 'backbone.stage2.0.fuse_layers.0.1.sample_0.sample.sample_fc.weight' in keys
  assert 'backbone.stage4.0.fuse_layers.0.3.sample_2.sample_decode_conv.bias' in keys
  assert 'backbone.stage4.0.fuse_layers.3.0.2.0.sample_decode_conv.weight' in keys
  assert 'backbone.transition1.1.0.0.sample_encode_conv.weight' in keys
  assert 'backbone.transition1.1.0.1.running_var' in keys
  assert 'decode_head.convs.0.bn.running_mean' in keys
  assert model.backbone.stage2[0].fuse_layers[0][1].sample_0 is not None


def test_batchnorm_train_and_eval_match_torch():
  rng = np.random.RandomState(0)
  x = rng.randn(3, 5, 7, 6).astype(np.float32) * 2 + 1
  ref = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    for t in (ref.weight, ref.bias, ref.running_mean):
      t.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
  bn = layers.BatchNorm(6)
  for name in ('weight', 'bias', 'running_mean', 'running_var'):
    getattr(bn, name)[...] = jnp.asarray(getattr(ref, name).detach().numpy())
  to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  to_nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  ref.train()
  expected = to_nhwc(ref(to_torch(x)))
  got = np.asarray(bn(jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Running statistics: momentum 0.1 and the unbiased variance, as torch.
  np.testing.assert_allclose(bn.running_mean[...], ref.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(bn.running_var[...], ref.running_var.numpy(), atol=1e-6)
  ref.eval()
  bn.use_running_average = True
  np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), to_nhwc(ref(to_torch(x))), atol=1e-5)
  before = np.asarray(bn.running_mean[...])
  bn(jnp.asarray(x))
  np.testing.assert_array_equal(bn.running_mean[...], before)


def test_batchnorm_train_gradients_match_torch():
  """`layers.batch_norm_train` and its closed-form backward against torch's BatchNorm2d autograd."""
  rng = np.random.RandomState(1)
  x = rng.randn(2, 5, 7, 6).astype(np.float32) * 3 - 1
  g = rng.randn(2, 5, 7, 6).astype(np.float32)
  weight = rng.uniform(-1, 1, 6).astype(np.float32)
  bias = rng.uniform(-1, 1, 6).astype(np.float32)
  tx, tw, tb = (torch.tensor(a, requires_grad=True)
                for a in (x.transpose(0, 3, 1, 2), weight, bias))
  expected = torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True, eps=1e-5)
  (expected * torch.from_numpy(g.transpose(0, 3, 1, 2))).sum().backward()

  y, mean, var = layers.batch_norm_train(jnp.asarray(x), weight, bias, 1e-5)
  np.testing.assert_allclose(y, expected.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-5)

  def loss(x, weight, bias):
    return (layers.batch_norm_train(x, weight, bias, 1e-5)[0] * g).sum()

  gx, gw, gb = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), weight, bias)
  np.testing.assert_allclose(gx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('c_in,c_out', [(3, 8), (8, 3), (5, 5)])
def test_pointwise_and_its_gradients_match_numpy(c_in, c_out):
  """`layers.pointwise` (a 1x1 conv) and its backward, whose kernel gradient has a barrier when
  C_in < C_out, against the float64 matmuls y = x W, g_x = g W^T, g_W = x^T g."""
  rng = np.random.RandomState(2)
  x = rng.randn(2, 5, 7, c_in).astype(np.float32)
  weight = rng.randn(c_in, c_out).astype(np.float32)
  g = rng.randn(2, 5, 7, c_out).astype(np.float32)
  y, vjp = jax.vjp(layers.pointwise, jnp.asarray(x), jnp.asarray(weight))
  gx, gw = vjp(jnp.asarray(g))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, weight, g))
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, x64.reshape(-1, c_in).T @ g64.reshape(-1, c_out), rtol=1e-5,
                             atol=1e-4)


def test_train_and_eval_switch_every_batchnorm():
  model = _abstract('c')
  bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.BatchNorm)]
  assert len(bns) == len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) // 2 > 0
  assert not any(bn.use_running_average for bn in bns)  # built in train mode, as torch
  model.eval()
  assert all(bn.use_running_average for bn in bns)
  model.train()
  assert not any(bn.use_running_average for bn in bns)


def test_bfloat16_computes_in_bf16_and_returns_float32_logits():
  model = _abstract('b', dtype='bfloat16')
  model.eval()
  params = jax.tree.leaves(nnx.state(model))
  assert all(p.dtype == jnp.float32 for p in params)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, 40, 48, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  heavy = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in ('conv_general_dilated',
                                                                      'dot_general')]
  in_f32 = [e for e in heavy if any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
  # Every conv and matmul runs in bfloat16 (the final float32 upsampling of the logits is a gather).
  assert len(heavy) > 400 and not in_f32
  assert jaxpr.out_avals[0].dtype == jnp.float32 and jaxpr.out_avals[0].shape == (1, 40, 48, 4)


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def test_bfloat16_m2mrf_close_to_float32():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 19, 27, 16), jnp.float32)
  f32 = M2MRF(16, 8, 0.5, rngs=nnx.Rngs(0))
  bf16 = M2MRF(16, 8, 0.5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ref, got = np.asarray(f32(x)), np.asarray(bf16(x).astype(jnp.float32))
  assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


@pytest.mark.slow
def test_remat_gives_same_outputs_gradients_and_bn_updates():
  graphdef, state = nnx.split(models.build(model_config('a', 18), nnx.Rngs(0)).backbone.stage2[0])
  xs = [jnp.asarray(np.random.RandomState(k).randn(2, 16 >> k, 20 >> k, 18 << k), jnp.float32)
        for k in range(2)]

  results = []
  for remat in (False, True):
    module = nnx.merge(graphdef, state)  # an HRModule in train mode, same weights and statistics
    loss = lambda m, remat=remat: sum(jnp.mean(jnp.square(y)) for y in hrnet.remat_call(m, xs, remat))
    value, grads = nnx.jit(nnx.value_and_grad(loss))(module)
    results.append((value, grads, nnx.state(module, nnx.BatchStat)))
  (v0, g0, s0), (v1, g1, s1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  assert _size(g0) > 0
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  # Every stage module and layer1 is rematerialised in the full model.
  graphdef, state = nnx.split(_abstract('a', remat=True))
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  n_remat = sum(e.primitive.name in ('checkpoint', 'remat', 'remat2') for e in _equations(jaxpr.jaxpr))
  assert n_remat == 1 + 1 + 4 + 3


def test_initialisation_follows_official_from_scratch():
  model = models.build(model_config('base', 18), nnx.Rngs(0))
  w = np.asarray(model.backbone.stage4[0].branches[3][0].conv1.weight[...])  # (3, 3, 144, 144)
  assert abs(w.std() / math.sqrt(2.0 / (9 * 144)) - 1) < 0.02  # kaiming normal, fan_out
  w = np.asarray(model.decode_head.conv_seg.weight[...])
  assert abs(w.std() / 0.01 - 1) < 0.05 and not np.asarray(model.decode_head.conv_seg.bias[...]).any()
  bn = model.decode_head.convs[0].bn
  assert (np.asarray(bn.weight[...]) == 1).all() and not np.asarray(bn.bias[...]).any()


def test_rejects_bad_config():
  with pytest.raises(ValueError, match='model.width'):
    _abstract('c', 20)
  with pytest.raises(ValueError, match='model.dtype'):
    _abstract('c', dtype='float16')
  with pytest.raises(ValueError, match='NHWC'):
    model = _abstract('base')
    _eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))


@pytest.mark.parametrize('size, out', [((9, 13), (30, 41)), ((24, 36), (12, 17)),
                                       ((239, 360), (712, 1072))])
def test_resize_bilinear_and_its_gradient_match_torch(size, out):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, 3)).astype(np.float32)
  g = rng.normal(size=(2, *out, 3)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.interpolate(xt, size=out, mode='bilinear', align_corners=False)
  (yt * torch.from_numpy(g).permute(0, 3, 1, 2)).sum().backward()
  y, vjp = jax.vjp(lambda v: layers.resize_bilinear(v, out), jnp.asarray(x))
  np.testing.assert_allclose(y, yt.detach().permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], xt.grad.permute(0, 2, 3, 1).numpy(), rtol=0,
                             atol=1e-4)
  for start, rows in ((0, out[0]), (out[0] // 3, 5)):
    band = layers.resize_bilinear_rows(jnp.asarray(x), out, start, rows)
    np.testing.assert_allclose(band, y[:, start:start + rows], rtol=0, atol=1e-6)
