"""The NNX Inception-v3 main branch against torchvision's `inception_v3` on random weights.

Random conv/fc weights and random BN running statistics in torchvision's model, converted with the key
table of `m2mrf_jax.grading.convert`; eval-mode logits and the Mixed_7c feature map, and the round trip
NNX -> torchvision keys. torchvision's own source is used (tests/torchvision_models.py).
"""
from flax import nnx
import jax
import numpy as np
import pytest
import torch

from m2mrf_jax.grading import convert
from m2mrf_jax.grading import inception
from tests import torchvision_models

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  tv = torchvision_models.inception_module()
  model = tv.inception_v3(weights=None, aux_logits=True, init_weights=True, num_classes=5,
                          transform_input=False)
  with torch.no_grad():
    for name, buffer in model.named_buffers():
      if name.endswith('running_mean'):
        buffer.copy_(torch.randn_like(buffer) * 0.2)
      elif name.endswith('running_var'):
        buffer.copy_(torch.rand_like(buffer) + 0.5)
    for name, p in model.named_parameters():
      if name.endswith('bn.weight') or name.endswith('bn.bias'):
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith('weight') else 0.0))
  return model.eval()


def test_logits_and_features_match_torchvision(torch_model):
  model = inception.InceptionV3(num_classes=5, rngs=nnx.Rngs(0))
  count = convert.load_state_dict(model, torch_model.state_dict())
  assert count == len(convert.state_dict(model))
  model.eval()
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 107, 139)).astype(np.float32)
  features = {}
  torch_model.Mixed_7c.register_forward_hook(lambda m, i, o: features.update(out=o))
  with torch.no_grad():
    want_logits = torch_model(torch.from_numpy(x)).numpy()
  want_features = features['out'].numpy().transpose(0, 2, 3, 1)
  x_nhwc = x.transpose(0, 2, 3, 1)
  with jax.default_matmul_precision('highest'):
    got_features = np.asarray(model.features(x_nhwc))
    got_logits = np.asarray(model(x_nhwc))
  assert got_features.shape == want_features.shape == (2, 2, 3, 2048)
  err_f = np.abs(got_features - want_features).max() / max(1.0, np.abs(want_features).max())
  err_l = np.abs(got_logits - want_logits).max() / max(1.0, np.abs(want_logits).max())
  print(f'Inception-v3 vs torchvision: relative max error features {err_f:.2e}, logits {err_l:.2e}')
  assert err_f < 1e-4 and err_l < 1e-4


def test_key_table_round_trip_and_errors(torch_model):
  model = inception.InceptionV3(num_classes=5, rngs=nnx.Rngs(1))
  torch_sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  convert.load_state_dict(model, torch_sd)
  back = convert.state_dict(model)
  kept = {k for k in torch_sd if convert.rule(k) != 'drop'}
  assert set(back) == kept
  assert all(np.array_equal(back[k], torch_sd[k]) for k in kept)
  # An ImageNet-shaped head: fc skipped with skip_classifier, an error without it.
  imagenet = dict(torch_sd, **{'fc.weight': np.zeros((1000, 2048), np.float32),
                               'fc.bias': np.zeros((1000,), np.float32)})
  fc_before = np.asarray(model.fc.weight[...]).copy()
  convert.load_state_dict(model, imagenet, skip_classifier=True)
  np.testing.assert_array_equal(np.asarray(model.fc.weight[...]), fc_before)
  with pytest.raises(ValueError, match=r'mis-shaped keys:\n  fc.bias'):
    convert.load_state_dict(model, imagenet)
  missing = {k: v for k, v in torch_sd.items() if not k.startswith('Mixed_7c.branch_pool')}
  with pytest.raises(ValueError, match='missing keys:\n  Mixed_7c.branch_pool.bn.bias'):
    convert.load_state_dict(model, missing)
