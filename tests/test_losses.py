"""Losses, lr schedule and optimizer against NumPy / PyTorch statements of the official recipe."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs import common
from m2mrf_jax import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _inputs(seed=0, shape=(3, 7, 5, 4)):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, shape).astype(np.float32)
  labels = (rng.random(shape) < 0.2).astype(np.uint8)
  labels[1, ..., 2] = 0  # an absent class in one sample
  return logits, labels


def _official_dice_numpy(logits, labels, smooth=1e-5):
  """binary_loss.py: per sample n, per class c, then sum_c / C, then mean over n."""
  n_samples, _, _, n_classes = logits.shape
  p = _sigmoid(logits.astype(np.float64))
  per_sample = []
  for n in range(n_samples):
    total = 0.0
    for c in range(n_classes):
      pc, yc = p[n, ..., c].ravel(), labels[n, ..., c].ravel().astype(np.float64)
      total += 1 - (2 * np.sum(pc * yc) + smooth) / (np.sum(pc) + np.sum(yc) + smooth)
    per_sample.append(total / n_classes)
  return np.mean(per_sample)


def _lnet_dual_numpy(logits, labels, lam, smooth=1e-5):
  """L-Net eq. (2)-(3): squared-denominator Dice over batch and classes, pixel and max-pooled."""
  p, t = _sigmoid(logits.astype(np.float64)), labels.astype(np.float64)
  def dice(a, b):
    return 1 - (2 * np.sum(a * b) + smooth) / (np.sum(a ** 2) + np.sum(b ** 2) + smooth)
  big_p = p.reshape(p.shape[0], -1, p.shape[-1]).max(axis=1)
  big_t = t.reshape(t.shape[0], -1, t.shape[-1]).max(axis=1)
  return lam * dice(p, t) + (1 - lam) * dice(big_p, big_t)


def test_dice_loss_equals_official_formula():
  logits, labels = _inputs()
  got = losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, _official_dice_numpy(logits, labels), rtol=1e-6)


def test_dice_loss_of_absent_class_is_about_one():
  logits = np.full((1, 4, 4, 4), -2.0, np.float32)  # sigmoid ~0.12 everywhere
  labels = np.zeros((1, 4, 4, 4), np.uint8)
  np.testing.assert_allclose(losses.dice_loss(logits, labels), 1.0, atol=1e-5)


def test_dual_loss_equals_lnet_formula():
  logits, labels = _inputs(1)
  for lam in (0.8, 0.3):
    got = losses.dual_loss(jnp.asarray(logits), jnp.asarray(labels), lam=lam)
    np.testing.assert_allclose(got, _lnet_dual_numpy(logits, labels, lam), rtol=1e-6)


def test_get_loss_fn_selects_by_config():
  logits, labels = _inputs(2)
  config = ml_collections.ConfigDict({'loss': 'dual', 'dual_lambda': 0.6})
  np.testing.assert_allclose(losses.get_loss_fn(config)(logits, labels),
                             _lnet_dual_numpy(logits, labels, 0.6), rtol=1e-6)
  config.loss = 'dice'
  np.testing.assert_allclose(losses.get_loss_fn(config)(logits, labels),
                             _official_dice_numpy(logits, labels), rtol=1e-6)
  config.loss = 'focal'
  with pytest.raises(ValueError, match="config.loss must be 'dice' or 'dual'"):
    losses.get_loss_fn(config)


def test_loss_rejects_logits_not_at_label_size():
  with pytest.raises(ValueError, match='same'):
    losses.dice_loss(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 8, 8, 4)))


@pytest.mark.parametrize('dataset', ['idrid', 'ddr'])
def test_poly_schedule_equals_official_formula(dataset):
  config = common.get_config(dataset, 'c')
  schedule = losses.poly_schedule(config)
  total = config.num_train_steps
  for step in (0, 1, total // 2, total - 1, total):  # float32 arithmetic: atol 1e-9
    official = (0.01 - 1e-4) * (1 - step / total) ** 0.9 + 1e-4
    np.testing.assert_allclose(schedule(step), official, rtol=1e-6, atol=1e-9,
                               err_msg=f'step {step}')


def test_sgd_equals_torch_sgd_with_weight_decay_and_poly_lr():
  config = common.get_config('idrid', 'c')
  config.num_train_steps = 6
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(5)]

  tx = losses.sgd(config)
  jax_params, opt_state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)

  torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = torch.optim.SGD(list(torch_params.values()), lr=0.01, momentum=0.9, weight_decay=5e-4)
  for it, g in enumerate(grads):
    for group in opt.param_groups:  # mmcv PolyLrUpdaterHook, before each iteration
      group['lr'] = (0.01 - 1e-4) * (1 - it / 6) ** 0.9 + 1e-4
    for k, p in torch_params.items():
      p.grad = torch.tensor(g[k])
    opt.step()
  for k in params:
    np.testing.assert_allclose(jax_params[k], torch_params[k].detach().numpy(),
                               rtol=1e-6, atol=1e-7)
