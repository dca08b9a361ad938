"""The compared resampling operators against independent PyTorch / NumPy statements, on odd sizes.

Each statement is written from the operator's paper and its authors' public code (NCHW, torch
functional ops), and gets the NNX module's weights through an explicit HWIO -> OIHW transpose.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2mrf_jax.resampling.a2u import A2UDown, A2UUp
from m2mrf_jax.resampling.carafe import CARAFE, CARAFEDown
from m2mrf_jax.resampling.deconv import Deconv
from m2mrf_jax.resampling.indexnet import IndexPool, IndexUnpool
from m2mrf_jax.resampling.lip import LIP
from m2mrf_jax.resampling.pooling import MaxPool, MaxUnpool

SIZES = [(7, 9), (10, 13), (6, 8)]


def randomize(module, seed=0, scale=0.5):
  """Every parameter of `module` set to N(0, scale^2) (so zero / tiny inits do not hide errors)."""
  rng = np.random.default_rng(seed)
  for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    variable[...] = jnp.asarray(rng.normal(0, scale, variable.shape), jnp.float32)
  return module


def t(x):
  """NHWC NumPy/JAX -> NCHW torch float64."""
  return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def w(conv):
  """An NNX HWIO conv weight -> torch OIHW float64."""
  return torch.from_numpy(np.asarray(conv.weight[...], np.float64)).permute(3, 2, 0, 1)


def b(conv):
  return None if conv.bias is None else torch.from_numpy(np.asarray(conv.bias[...], np.float64))


def nhwc(y):
  return y.permute(0, 2, 3, 1).numpy()


def inputs(size, channels=4, n=2, seed=1):
  return np.random.default_rng(seed).normal(size=(n, *size, channels)).astype(np.float32)


def max_err(a, b_):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b_, np.float64))))


@pytest.mark.parametrize('size', SIZES)
def test_maxpool_unpool_equal_torch(size):
  x = inputs(size)
  y, guide = MaxPool()(jnp.asarray(x))
  ref, ref_idx = F.max_pool2d(t(x), 3, 2, 1, return_indices=True)
  assert max_err(y, nhwc(ref)) == 0
  np.testing.assert_array_equal(np.asarray(guide[0]), nhwc(ref_idx))
  # Unpool other features (the up path's) with those indices.
  z = inputs(y.shape[1:3], seed=2)
  out = MaxUnpool()(jnp.asarray(z), guide)
  ref_out = F.max_unpool2d(t(z), ref_idx, 3, 2, 1, output_size=size)
  assert max_err(out, nhwc(ref_out)) == 0
  # A peak at an odd position is the maximum of 4 overlapping windows: they share its index.
  plateau = x.copy()
  plateau[:, 1, 1] = plateau[:, 3, 3] = 100.0
  y, guide = MaxPool()(jnp.asarray(plateau))
  _, ref_idx = F.max_pool2d(t(plateau), 3, 2, 1, return_indices=True)
  np.testing.assert_array_equal(np.asarray(guide[0]), nhwc(ref_idx))
  assert len(np.unique(nhwc(ref_idx)[0, ..., 0])) < ref_idx[0, 0].numel()  # shared indices
  out = MaxUnpool()(jnp.asarray(z), guide)
  assert max_err(out, nhwc(F.max_unpool2d(t(z), ref_idx, 3, 2, 1, output_size=size))) == 0


@pytest.mark.parametrize('scale', [2, 4])
def test_deconv_equals_conv_transpose(scale):
  x = inputs((5, 7))
  module = randomize(Deconv(4, 3, scale, rngs=nnx.Rngs(0)))
  ref = F.conv_transpose2d(t(x), w(module).permute(1, 0, 2, 3), stride=scale)  # (in, out, kh, kw)
  assert max_err(module(jnp.asarray(x)), nhwc(ref)) < 1e-5


def numpy_carafe(x, compressor_w, encoder_w, encoder_b, scale, k_up, k_enc):
  """CARAFE by its formula, one output pixel at a time: x (h, w, C) -> (h s, w s, C)."""
  h, w_, c = x.shape
  comp = x @ compressor_w  # 1x1 conv
  r = k_enc // 2
  padded = np.pad(comp, ((r, r), (r, r), (0, 0)))
  enc = np.zeros((h, w_, encoder_w.shape[-1]))
  for y in range(h):
    for x_ in range(w_):
      enc[y, x_] = np.einsum('abi,abio->o', padded[y:y + k_enc, x_:x_ + k_enc], encoder_w) + encoder_b
  out = np.zeros((h * scale, w_ * scale, c))
  half = k_up // 2
  for oy in range(h * scale):
    for ox in range(w_ * scale):
      sy, sx = oy % scale, ox % scale  # sub-pixel: encoder channel t s^2 + sy s + sx
      logits = enc[oy // scale, ox // scale].reshape(k_up * k_up, scale, scale)[:, sy, sx]
      kernel = np.exp(logits - logits.max())
      kernel /= kernel.sum()
      for tap in range(k_up * k_up):
        iy, ix = oy // scale + tap // k_up - half, ox // scale + tap % k_up - half
        if 0 <= iy < h and 0 <= ix < w_:
          out[oy, ox] += kernel[tap] * x[iy, ix]
  return out


@pytest.mark.parametrize('scale', [2, 4])
def test_carafe_equals_numpy_formula(scale):
  x = inputs((5, 7), channels=3, n=1)
  module = randomize(CARAFE(3, scale, compressed_channels=4, rngs=nnx.Rngs(0)))
  ref = numpy_carafe(x[0].astype(np.float64), np.asarray(module.channel_compressor.weight[0, 0]),
                     np.asarray(module.content_encoder.weight), np.asarray(module.content_encoder.bias),
                     scale, 5, 3)
  assert max_err(module(jnp.asarray(x))[0], ref) < 1e-5


@pytest.mark.parametrize('size', SIZES)
def test_carafe_down_equals_torch(size):
  x = inputs(size)
  module = randomize(CARAFEDown(4, compressed_channels=8, rngs=nnx.Rngs(0)))
  xt = t(x)
  mask = F.conv2d(F.conv2d(xt, w(module.channel_compressor)), w(module.content_encoder),
                  b(module.content_encoder), stride=2, padding=1)
  mask = F.softmax(mask, dim=1)  # (N, 9, Ho, Wo)
  n, c = xt.shape[:2]
  ho, wo = mask.shape[2:]
  patches = F.unfold(xt, 3, padding=1, stride=2).view(n, c, 9, ho, wo)
  ref = (patches * mask[:, None]).sum(2)
  assert max_err(module(jnp.asarray(x)), nhwc(ref)) < 1e-5


def torch_lip(module, xt):
  """sebgao/LIP: lip2d(x, logit(x)) with LIP-ResNet's bottleneck logit module."""
  def inorm(y, norm):
    return F.instance_norm(y, weight=b_(norm.weight), bias=b_(norm.bias), eps=1e-5)
  b_ = lambda p: torch.from_numpy(np.asarray(p[...], np.float64))
  y = F.relu(inorm(F.conv2d(xt, w(module.conv1)), module.bn1))
  y = F.relu(inorm(F.conv2d(y, w(module.conv2), padding=1), module.bn2))
  logit = torch.sigmoid(inorm(F.conv2d(y, w(module.conv3)), module.bn3)) * 12.0
  weight = logit.exp()
  return F.avg_pool2d(xt * weight, 3, 2, 1) / F.avg_pool2d(weight, 3, 2, 1)


@pytest.mark.parametrize('size', SIZES)
def test_lip_equals_torch(size):
  x = inputs(size)
  module = randomize(LIP(4, width=8, rngs=nnx.Rngs(0)), scale=0.3)
  assert max_err(module(jnp.asarray(x)), nhwc(torch_lip(module, t(x)))) < 1e-4


def torch_indexnet(module, xt, low):
  """poppinace/indexnet_matting `DepthwiseM2OIndexBlock` (linear, no context), its pooling
  (4 * avg_pool2d(x * idx_en, 2)) and decoder upsampling (idx_de * nearest x2), on a zero-padded map."""
  xt = F.pad(xt, (0, xt.shape[3] % 2, 0, xt.shape[2] % 2))
  bs, c, h, w_ = xt.shape
  blocks = (module.indexnet1, module.indexnet2, module.indexnet3, module.indexnet4)
  x = torch.cat([F.conv2d(xt, w(k), stride=2).unsqueeze(2) for k in blocks], dim=2)
  y = torch.sigmoid(x)
  z = F.softmax(y, dim=2)
  idx_en = F.pixel_shuffle(z.reshape(bs, c * 4, h // 2, w_ // 2), 2)
  idx_de = F.pixel_shuffle(y.reshape(bs, c * 4, h // 2, w_ // 2), 2)
  pooled = 4 * F.avg_pool2d(xt * idx_en, (2, 2), stride=2)
  up = idx_de * F.interpolate(low, size=(h, w_), mode='nearest')
  return pooled, up


@pytest.mark.parametrize('size', SIZES)
def test_indexnet_equals_torch(size):
  x = inputs(size)
  module = randomize(IndexPool(4, rngs=nnx.Rngs(0)))
  pooled, guide = module(jnp.asarray(x))
  low = inputs(pooled.shape[1:3], seed=3)
  up = IndexUnpool()(jnp.asarray(low), guide)
  ref_pooled, ref_up = torch_indexnet(module, t(x), t(low))
  assert max_err(pooled, nhwc(ref_pooled)) < 1e-5
  assert max_err(up, nhwc(ref_up)[:, :size[0], :size[1]]) < 1e-5


def torch_a2u(kernels, xt, low):
  """dongdong93/a2u_matting `InterChannelUpDown` (share, d = 1, group 1, s = 3, k = 6) followed by the
  naive CUDA down (6x6 window from 2p - 2) / up (3x3 window around p // 2) reassembly, in torch."""
  param = lambda p: torch.from_numpy(np.asarray(p[...], np.float64))
  conv1x1 = lambda y, conv: F.conv2d(y, w(conv), b(conv))
  xt = F.pad(xt, (0, xt.shape[3] % 2, 0, xt.shape[2] % 2))
  n, c, h, w_ = xt.shape
  s, k = 3, 6
  groups = kernels.bnu.groups
  p_u = conv1x1(F.adaptive_avg_pool2d(xt, 1), kernels.bconv_UP).view(n, 36)
  p_d = conv1x1(F.adaptive_avg_pool2d(xt, 1), kernels.bconv_DP).view(n, 36)
  u = conv1x1(F.adaptive_avg_pool2d(xt, k), kernels.bconv_U).view(n, k, k)
  v = conv1x1(F.adaptive_avg_pool2d(xt, k), kernels.bconv_V).view(n, k, k)
  out_u, out_d = [], []
  for i in range(n):
    o1 = F.conv2d(xt[i].unsqueeze(1), u[i].view(1, 1, k, k), stride=2, padding=2).view(1, c, h // 2, w_ // 2)
    o2 = F.conv2d(xt[i].unsqueeze(1), v[i].view(1, 1, k, k), stride=2, padding=2).view(1, c, h // 2, w_ // 2)
    o1 = F.leaky_relu(F.group_norm(o1, groups, param(kernels.bnu.weight), param(kernels.bnu.bias)))
    o2 = F.leaky_relu(F.group_norm(o2, groups, param(kernels.bnv.weight), param(kernels.bnv.bias)))
    affinity = (o1 * o2).sum(dim=1, keepdim=True) / np.sqrt(c)
    out_u.append(F.conv2d(affinity, p_u[i].view(36, 1, 1, 1)))
    out_d.append(F.conv2d(affinity, p_d[i].view(36, 1, 1, 1)))
  up_k = F.softmax(torch.sigmoid(F.pixel_shuffle(torch.cat(out_u), 2)), dim=1)  # (n, 9, h, w)
  down_k = F.softmax(torch.cat(out_d), dim=1)  # (n, 36, h/2, w/2)
  patches = F.unfold(F.pad(xt, (2, 3, 2, 3)), 6, stride=2).view(n, c, 36, h // 2, w_ // 2)
  down = (patches * down_k[:, None]).sum(2)
  lh, lw = low.shape[2:]
  near = F.unfold(low, 3, padding=1).view(n, low.shape[1], 9, lh, lw)
  near = near.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
  up = (near * up_k[:, None]).sum(2)
  return down, up


@pytest.mark.parametrize('size', SIZES)
def test_a2u_equals_torch(size):
  x = inputs(size, channels=8)
  module = randomize(A2UDown(8, rngs=nnx.Rngs(0)), scale=0.3)
  down, guide = module(jnp.asarray(x))
  low = inputs(down.shape[1:3], channels=8, seed=3)
  up = A2UUp()(jnp.asarray(low), guide)
  ref_down, ref_up = torch_a2u(module.kernels, t(x), t(low))
  assert max_err(down, nhwc(ref_down)) < 1e-5
  assert max_err(up, nhwc(ref_up)[:, :size[0], :size[1]]) < 1e-5


LEARNED = {
    'deconv': lambda: (Deconv(4, 4, 2, rngs=nnx.Rngs(0)), None),
    'carafe': lambda: (CARAFE(4, 2, rngs=nnx.Rngs(0)), None),
    'carafe_down': lambda: (CARAFEDown(4, rngs=nnx.Rngs(0)), None),
    'lip': lambda: (LIP(4, width=8, rngs=nnx.Rngs(0)), None),
    'indexnet': lambda: (IndexPool(4, rngs=nnx.Rngs(0)), IndexUnpool()),
    'a2u': lambda: (A2UDown(4, rngs=nnx.Rngs(0)), A2UUp()),
}


@pytest.mark.parametrize('name', list(LEARNED))
def test_gradients_reach_every_parameter_and_an_sgd_step_lowers_the_loss(name):
  module, up = LEARNED[name]()
  x = jnp.asarray(inputs((7, 9)))

  def loss_fn(m):
    y = m(x)
    if up is not None:  # the paired up path: down then up with the recorded guide
      y = up(*y)
    target = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.mean(jnp.square(y - target))

  # As initialised (LIP's zero-initialised last logit conv then blocks the gradient of the layers
  # before it, as in sebgao/LIP), and with random weights, where every parameter must get a gradient.
  for trained, every in ((module, False), (randomize(LEARNED[name]()[0], scale=0.3), True)):
    loss, grads = nnx.value_and_grad(loss_fn)(trained)
    norms = {'.'.join(map(str, k)): float(jnp.linalg.norm(g[...]))
             for k, g in nnx.to_flat_state(grads)}
    assert all(n > 0 for n in norms.values()) if every else any(n > 0 for n in norms.values()), norms
    total = np.sqrt(sum(n * n for n in norms.values()))
    if not every and name == 'lip':
      continue  # LIP as initialised: IN of an all-zero logit map is not smooth at that point
    # One SGD step that moves the parameters by 1e-2 (in norm) lowers the loss.
    moved = nnx.merge(*nnx.split(trained))
    nnx.update(moved, jax.tree.map(lambda p, g: p - 1e-2 / total * g, nnx.state(trained, nnx.Param),
                                   grads))
    assert float(loss_fn(moved)) < float(loss), (name, every)
