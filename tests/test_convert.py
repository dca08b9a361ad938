"""Checkpoint conversion: reading .pth files, the CLI round trip, errors, MSRA backbone loading."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from configs import common
from m2mrf_jax import checkpoints
from m2mrf_jax import convert
from tests import torch_reference
from tests.conftest import tiered
from tests.test_model_parity import abstract_model, build_filled, flat_state, images, nchw, nhwc, scaled_error

torch.set_num_threads(1)  # 2-core CI: intra-op threads only contend.

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-4
MMSEG_META = {'mmseg_version': '0.8.0+13af879', 'config': "model = dict(type='EncoderDecoder')",
              'CLASSES': ('bg', 'EX', 'HE', 'SE', 'MA'), 'PALETTE': [[0, 0, 0], [128, 0, 0]],
              'epoch': 1, 'iter': 40000}


class _Exploit:
  """A pickle that would create `marker` when unpickled with full pickle."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.touch, (self.marker,)


def numpy_state(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope='module')
def reference_c():
  """A randomized W18 M2MRF-C torch segmentor (eval mode)."""
  return torch_reference.randomize_(torch_reference.build_torch_model('c', width=18), seed=3)


@pytest.fixture(scope='module')
def model_a():
  return build_filled('a', 18)


@pytest.fixture(scope='module')
def state_a():
  return numpy_state(torch_reference.build_torch_model('a', width=18))


def test_read_pth_unwraps_an_mmseg_checkpoint(tmp_path, reference_c):
  sd = reference_c.state_dict()
  path = tmp_path / 'iter_40000.pth'
  torch.save({'meta': MMSEG_META, 'state_dict': sd}, path)
  read = convert.read_pth(path)
  assert set(read) == set(sd)
  for k, v in sd.items():
    assert isinstance(read[k], np.ndarray) and read[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(read[k], v.numpy(), err_msg=k)


def test_read_pth_reads_a_plain_msra_state_dict(tmp_path):
  sd = torch_reference.build_msra_backbone_state_dict(width=18)
  path = tmp_path / 'hrnetv2_w18.pth'
  torch.save(sd, path)
  read = convert.read_pth(path)
  assert set(read) == set(sd)
  for k in ('conv1.weight', 'stage4.2.fuse_layers.3.0.2.1.running_var', 'classifier.weight'):
    np.testing.assert_array_equal(read[k], sd[k].numpy())


def test_read_pth_does_not_unpickle_arbitrary_objects(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  torch.save({'state_dict': {'conv.weight': torch.ones(2)}, 'meta': _Exploit(str(marker))}, path)
  with pytest.raises(Exception, match='(?i)weights.only|unpickl|global'):
    convert.read_pth(path)
  assert not marker.exists()


@pytest.mark.slow
def test_cli_converts_an_mmseg_checkpoint_to_an_orbax_checkpoint(tmp_path, reference_c):
  pth, out = tmp_path / 'm2mrf_c.pth', tmp_path / 'converted'
  torch.save({'meta': MMSEG_META, 'state_dict': reference_c.state_dict()}, pth)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.convert', '--config=configs/idrid_c.py',
       '--config.model.width=18', f'--input={pth}', f'--output={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  card = checkpoints.read_card(out)  # the config given to the converter, no training
  assert (card['variant'], card['width'], card['dataset'], card['training_steps']) == ('c', 18, 'idrid', 0)
  model = checkpoints.restore_model(out, common.model_config('c', 18))
  model.eval()
  x = images((61, 83), seed=5)
  with torch.no_grad():
    expected = nhwc(reference_c(nchw(x)))
  err = scaled_error(np.asarray(model(x)), expected)
  assert err <= RTOL, f'restored logits: max abs diff / logit scale = {err:.3g}'


def test_loaded_arrays_do_not_alias_the_source_buffers(state_a):
  """JAX arrays are immutable: writing into the source tensors afterwards must not change the model."""
  source = {k: v.copy() for k, v in state_a.items()}
  model = build_filled('a', 18)
  convert.load_state_dict(model, source)
  before = {k: np.array(v) for k, v in flat_state(model).items()}
  for v in source.values():
    v += 1
  changed = [k for k, v in flat_state(model).items() if not np.array_equal(np.asarray(v), before[k])]
  assert not changed, f'{len(changed)} model arrays share memory with the source, e.g. {changed[:3]}'


@pytest.mark.slow
def test_an_abstract_model_is_filled_as_a_concrete_one(state_a):
  abstract, concrete = abstract_model('a', 18), build_filled('a', 18, seed=0)
  convert.load_state_dict(abstract, state_a)
  convert.load_state_dict(concrete, state_a)
  got, want = flat_state(abstract), flat_state(concrete)
  assert set(got) == set(want) == set(state_a) - {k for k in state_a if 'num_batches' in k}
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
  backbone = {k: v for k, v in state_a.items() if k.startswith('backbone.')}
  with pytest.raises(ValueError, match='(?s)abstract.*decode_head.conv_seg.weight'):
    convert.load_state_dict(abstract_model('a', 18), backbone)


def test_missing_keys_are_listed(model_a, state_a):
  sd = dict(state_a)
  gone = ('decode_head.conv_seg.bias', 'backbone.stage4.2.fuse_layers.0.3.2.sample.sample_fc1.weight')
  for k in gone:
    del sd[k]
  with pytest.raises(ValueError, match='missing') as info:
    convert.load_state_dict(model_a, sd)
  for k in gone:
    assert k in str(info.value)


def test_unexpected_keys_are_listed(model_a, state_a):
  extra = 'backbone.stage2.0.fuse_layers.0.1.3.sample_encode_conv.weight'
  sd = dict(state_a, **{extra: np.zeros((4, 18, 1, 1), np.float32)})
  with pytest.raises(ValueError, match='unexpected') as info:
    convert.load_state_dict(model_a, sd)
  assert extra in str(info.value)


def test_misshaped_keys_are_listed(model_a, state_a):
  key = 'backbone.stage3.1.branches.1.2.bn1.running_var'
  sd = dict(state_a, **{key: np.ones((35,), np.float32)})
  with pytest.raises(ValueError, match='(?i)shape') as info:
    convert.load_state_dict(model_a, sd)
  assert key in str(info.value)


def test_a_checkpoint_of_another_variant_says_so(model_a):
  sd = numpy_state(torch_reference.build_torch_model('c', width=18))
  with pytest.raises(ValueError, match='variant') as info:
    convert.load_state_dict(model_a, sd)
  assert 'variant c' in str(info.value) and 'variant a' in str(info.value)


def test_a_checkpoint_of_another_width_says_so(model_a):
  sd = numpy_state(torch_reference.build_torch_model('a', width=32))
  with pytest.raises(ValueError, match='width') as info:
    convert.load_state_dict(model_a, sd)
  assert 'width 32' in str(info.value) and 'width 18' in str(info.value)


def test_msra_reference_loads_as_the_official_notes_count():
  """The mmcv strict=False emulation on the W48 structures: notes/official-code.md section 6."""
  with torch.device('meta'):
    msra = torch_reference.HRNet('base', 48).state_dict()
    for variant, (n_loaded, n_skipped) in {'a': (1648, 52), 'b': (1648, 52), 'c': (1780, 0),
                                           'd': (1780, 0)}.items():
      own = torch_reference.HRNet(variant, 48).state_dict()
      loaded, skipped = torch_reference.official_backbone_load(own, msra)
      assert (len(loaded), len(skipped)) == (n_loaded, n_skipped), variant


@pytest.mark.parametrize('variant', tiered(['a', 'b', 'c', 'd'], fast=('c',)))
def test_msra_backbone_loads_as_the_official_loader(variant):
  msra = torch_reference.build_msra_backbone_state_dict(width=18)
  own = torch_reference.HRNet(variant, 18).state_dict()
  loaded, expected_skipped = torch_reference.official_backbone_load(own, msra)

  model = build_filled(variant, 18, seed=0)
  before = {k: np.array(v) for k, v in flat_state(model).items()}
  skipped = convert.load_pretrained_backbone(model, {k: v.numpy() for k, v in msra.items()})
  assert sorted(skipped) == sorted(expected_skipped)
  assert len(skipped) == (52 if variant in 'ab' else 0)

  after = flat_state(model)
  written = {f'backbone.{k}' for k in loaded if not k.endswith('num_batches_tracked')}
  assert written <= set(after)
  for key, value in after.items():
    if key in written:
      source = msra[key.removeprefix('backbone.')].numpy()
      expected = source.transpose(2, 3, 1, 0) if source.ndim == 4 else source  # OIHW -> HWIO
      np.testing.assert_array_equal(np.asarray(value), expected, err_msg=key)
    else:
      np.testing.assert_array_equal(np.asarray(value), before[key], err_msg=f'{key} changed')
