"""evaluate.score (resize to the original size, sigmoid, pooled counts) and report, against NumPy/PyTorch."""
import csv
import io
import json

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from configs import common
from data_pipelines.lesions import CLASSES
from m2mrf_jax import evaluate
from m2mrf_jax import metrics
from m2mrf_jax import report
from m2mrf_jax import summary
from m2mrf_jax import visualize
from tests.test_metrics import official_metrics
from tests.tb_events import read_events

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time


class StandIn(nnx.Module):
  """1x1 conv + BatchNorm with random running statistics: eval and train mode differ."""

  def __init__(self, rngs):
    self.conv = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    rng = np.random.default_rng(0)
    self.bn.mean[...] = rng.normal(size=4).astype(np.float32)
    self.bn.var[...] = rng.uniform(0.5, 2, size=4).astype(np.float32)

  def __call__(self, x):
    return self.bn(self.conv(x))


class Skewed(StandIn):
  """StandIn plus a ramp across the columns: not mirror-symmetric, so flip TTA changes its logits."""

  def __call__(self, x):
    return super().__call__(x) + jnp.linspace(-1.5, 1.5, x.shape[2])[:, None]


def reference_logits(model, image):
  """StandIn's (or Skewed's) eval-mode logits in NumPy: (h, w, 4)."""
  w, b = np.asarray(model.conv.kernel[...]), np.asarray(model.conv.bias[...])
  bn = model.bn
  logits = image @ w + b
  logits = (logits - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
  logits = logits * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  if isinstance(model, Skewed):
    logits = logits + np.linspace(-1.5, 1.5, image.shape[1])[:, None]
  return logits


def reference_probs(model, image, size, logits=None):
  """Logits (default: `reference_logits`), bilinear resize with torch (align_corners=False), sigmoid:
  (H, W, 4)."""
  logits = reference_logits(model, image) if logits is None else logits
  t = torch.from_numpy(logits.astype(np.float32)).permute(2, 0, 1)[None]
  t = torch.nn.functional.interpolate(t, size=size, mode='bilinear', align_corners=False)
  return torch.sigmoid(t)[0].permute(1, 2, 0).numpy()


def fake_examples(seed):
  """Two input/original sizes; exclusive label maps; returns (examples, label maps)."""
  rng = np.random.default_rng(seed)
  examples, labels = [], []
  for i, (small, size) in enumerate([((10, 15), (24, 36))] * 3 + [((8, 8), (20, 20))]):
    label = rng.choice(5, size=size, p=[0.8, 0.05, 0.05, 0.05, 0.05])
    examples.append(dict(id=f'img{i}', image=rng.normal(size=(*small, 3)).astype(np.float32),
                         masks=np.stack([label == k for k in range(1, 5)], -1), original_size=size))
    labels.append(label)
  return examples, labels


def test_score_equals_reference_on_8_devices():
  examples, labels = fake_examples(0)
  config = common.get_config('idrid', 'c')
  config.num_pictures = 2  # fewer than the first batch of 3
  model = StandIn(nnx.Rngs(0))
  assert jax.local_device_count() == 8
  got = evaluate.score(model, grain.MapDataset.source(examples), config)
  probs = [reference_probs(model, e['image'], e['original_size']) for e in examples]
  want = official_metrics(probs, labels)
  for key in ('aupr', 'iou', 'f1'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  assert got['mAUPR'] == pytest.approx(want['aupr'].mean(), rel=1e-6)
  assert got['num_images'] == 4
  per_image = got['per_image']
  assert per_image['ids'] == ['img0', 'img1', 'img2', 'img3']
  for i, (prob, label) in enumerate(zip(probs, labels)):
    want = official_metrics([prob], [label])
    present = np.array([np.any(label == k) for k in range(1, 5)])
    np.testing.assert_allclose(per_image['aupr'][i][present], want['aupr'][present], rtol=1e-6)
    np.testing.assert_allclose(np.nan_to_num(per_image['iou'][i]), want['iou'], rtol=1e-6)
    np.testing.assert_array_equal(per_image['true'][i], [np.sum(label == k) for k in range(1, 5)])
  np.testing.assert_array_equal(per_image['true'].sum(axis=0),
                             [sum(np.sum(l == k) for l in labels) for k in range(1, 5)])
  # The same maps through metrics.score_maps: identical pooled counts.
  masks = [e['masks'] for e in examples]
  np.testing.assert_allclose(metrics.score_maps(probs, masks)['aupr_fine'], got['aupr_fine'], rtol=1e-4)
  assert model.bn.use_running_average is False  # the caller's module stays in train mode
  # The first config.num_pictures images: the picture of the image, the masks and the prediction at
  # the original size as the reference counts it.
  assert list(got['pictures']) == ['img0', 'img1']
  for first in examples[:2]:
    predicted = reference_probs(model, first['image'], first['original_size']) > 0.5
    np.testing.assert_array_equal(got['pictures'][first['id']], visualize.picture(
        denormalised(first, config.data), first['masks'], predicted, title=first['id']))


def test_score_with_no_pictures():
  examples, _ = fake_examples(1)
  config = common.get_config('idrid', 'c')
  config.num_pictures = 0
  assert evaluate.score(StandIn(nnx.Rngs(0)), grain.MapDataset.source(examples), config)['pictures'] == {}


def test_picture_draws_the_prediction_at_the_original_size(monkeypatch):
  """evaluate.picture hands visualize.picture the photograph, the masks and torch's resized prob > 0.5."""
  examples, _ = fake_examples(2)
  config = common.get_config('idrid', 'c')
  model = StandIn(nnx.Rngs(2))
  model.eval()
  seen = {}
  monkeypatch.setattr(visualize, 'picture', lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
  for example in examples[2:]:  # two sizes
    logits = np.asarray(model(example['image'][None]))[0]
    evaluate.picture(example, logits, config.data)
    image, truth, predicted = seen['args']
    np.testing.assert_array_equal(image, denormalised(example, config.data))
    assert truth is example['masks'] and seen['kwargs'] == {'title': example['id']}
    want = reference_probs(model, example['image'], example['original_size']) > 0.5
    assert predicted.shape == want.shape == (*example['original_size'], 4) and want.any()
    np.testing.assert_array_equal(predicted, want)


def denormalised(example, data_config):
  """NumPy: the example's normalised image back to uint8 RGB."""
  image = example['image'] * np.array(data_config.std) + np.array(data_config.mean)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def test_score_with_flip_tta_averages_the_mirrored_logits():
  examples, labels = fake_examples(2)
  config = common.get_config('idrid', 'c')
  assert config.tta == 'none'  # the official protocol by default
  config.tta = 'flip'
  model = Skewed(nnx.Rngs(2))
  got = evaluate.score(model, grain.MapDataset.source(examples), config)
  probs = []
  for e in examples:  # mirror the input, run, mirror back, average the logits; then resize + sigmoid
    plain = reference_logits(model, e['image'])
    averaged = (plain + reference_logits(model, e['image'][:, ::-1])[:, ::-1]) / 2
    assert np.abs(averaged - plain).max() > 0.5
    probs.append(reference_probs(model, e['image'], e['original_size'], averaged))
  want = official_metrics(probs, labels)
  for key in ('aupr', 'iou', 'f1'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  plain = official_metrics([reference_probs(model, e['image'], e['original_size']) for e in examples],
                           labels)
  assert np.abs(plain['aupr'] - want['aupr']).max() > 1e-3  # TTA made a difference the test can see


def test_same_size_batches_groups_consecutive_sizes():
  examples, _ = fake_examples(1)
  batches = list(evaluate.same_size_batches(examples, 2))
  assert [[e['id'] for e in b] for b in batches] == [['img0', 'img1'], ['img2'], ['img3']]


def test_report_writes_table_json_and_curves(tmp_path, capsys):
  rng = np.random.default_rng(4)
  probs = [rng.random((30, 20, 4), dtype=np.float32) ** 2 for _ in range(2)]
  masks = [rng.random((30, 20, 4)) < 0.1 for _ in range(2)]
  masks[1][..., 2] = False  # no SE in the second image: its SE AUPR is undefined
  scores = metrics.score_maps(probs, masks)
  pictures = {'IDRiD_55': rng.integers(0, 256, (6, 9, 3), dtype=np.uint8),
              'cam 2/x': rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)}
  with summary.Writer(tmp_path) as writer:
    report.write(dict(scores, pictures=pictures), tmp_path, writer, step=7)
  assert sorted(p.name for p in (tmp_path / 'pictures').iterdir()) == ['IDRiD_55.png', 'cam_2_x.png']
  for image_id, name in [('IDRiD_55', 'IDRiD_55'), ('cam 2/x', 'cam_2_x')]:
    with Image.open(tmp_path / 'pictures' / f'{name}.png') as png:
      np.testing.assert_array_equal(np.asarray(png), pictures[image_id])
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved == json.loads(json.dumps(report.to_json(scores))) and 'per_image' not in saved
  for key in ('mAUPR', 'mIoU', 'mF1'):
    assert saved[key] == pytest.approx(scores[key])
  assert [saved['aupr'][c] for c in CLASSES] == pytest.approx(list(scores['aupr']))
  assert [saved['iou'][c] for c in CLASSES] == pytest.approx(list(scores['iou']))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ['EX', 'HE', 'SE', 'MA', 'mean']
  printed = {line.split()[0]: [float(v) for v in line.split()[-5:]] for line in lines[1:4]}
  np.testing.assert_allclose(printed['AUPR'], 100 * np.append(scores['aupr'], scores['mAUPR']), atol=0.006)
  np.testing.assert_allclose(printed['F'], 100 * np.append(scores['f1'], scores['mF1']), atol=0.006)
  np.testing.assert_allclose(printed['IoU'], 100 * np.append(scores['iou'], scores['mIoU']), atol=0.006)
  with open(tmp_path / 'per_image.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == ['0', '1']
  assert list(rows[0])[1:8] == ['EX_aupr_11', 'EX_aupr_1001', 'EX_iou', 'EX_f1', 'EX_dice',
                                'EX_predicted_pixels', 'EX_true_pixels'] and len(rows[0]) == 1 + 4 * 7
  per_image = scores['per_image']
  for i, row in enumerate(rows):
    for c, name in enumerate(CLASSES):
      for column, key in (('aupr_11', 'aupr'), ('aupr_1001', 'aupr_fine'), ('iou', 'iou'),
                          ('f1', 'f1'), ('dice', 'f1')):
        want = per_image[key][i, c]
        assert row[f'{name}_{column}'] == ('' if np.isnan(want) else repr(float(want)))
      assert int(row[f'{name}_predicted_pixels']) == np.sum(probs[i][..., c] > np.float32(0.5))
      assert int(row[f'{name}_true_pixels']) == np.sum(masks[i][..., c])
  assert rows[1]['SE_aupr_11'] == rows[1]['SE_aupr_1001'] == '' and rows[1]['SE_iou'] == '0.0'
  assert rows[0]['SE_aupr_11'] != ''
  with Image.open(tmp_path / 'pr_curves.png') as png:
    assert png.size[0] > 3 * png.size[1]  # four panels side by side
    curves = np.asarray(png.convert('RGB'))
  images = [(e.step, v) for e in read_events(tmp_path) for v in e.summary.value]
  assert [(step, v.tag) for step, v in images] == [(7, 'pr_curves'), (7, 'overlay')]
  for (_, value), want in zip(images, [curves, pictures['IDRiD_55']]):  # the first picture as 'overlay'
    with Image.open(io.BytesIO(value.image.encoded_image_string)) as logged:
      np.testing.assert_array_equal(np.asarray(logged.convert('RGB')), want)


def test_score_on_synthetic_idrid_against_the_tiff_masks(tmp_path):
  """The real pipeline: masks read back from the synthetic download's TIFFs, merged as the official code."""
  from data_pipelines import build, pipeline, synthetic  # pylint: disable=g-import-not-at-top
  manual = synthetic.write_download('idrid', tmp_path / 'download', num_images={'train': 1, 'test': 3},
                                    image_size=(64, 96), seed=3)
  build.build('idrid', manual, tmp_path / 'tfds')
  config = common.get_config('idrid', 'c')
  config.data.img_scale = (48, 32)  # 64 x 96 -> 32 x 48 at the test scale
  model = StandIn(nnx.Rngs(1))
  examples = pipeline.eval_dataset(config.data, str(tmp_path / 'tfds'), 'test')
  got = evaluate.score(model, examples, config)
  truth = manual / 'A. Segmentation' / '2. All Segmentation Groundtruths' / 'b. Testing Set'
  probs, labels = [], []
  for example in examples:
    assert example['image'].shape == (32, 48, 3)
    probs.append(reference_probs(model, example['image'], example['original_size']))
    label = np.zeros(example['original_size'], np.uint8)
    for k, name in enumerate(CLASSES, start=1):  # prepare_labels.py: later classes overwrite
      found = list(truth.glob(f'*/{example["id"]}_{name}.tif'))
      if found:
        label[np.asarray(Image.open(found[0]).convert('L')) > 0] = k
    labels.append(label)
  assert all(np.any(label > 0) for label in labels)
  want = official_metrics(probs, labels)
  assert got['num_images'] == 3
  for key in ('aupr', 'iou', 'f1'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  # per_image.csv: one row per test image, named by its id, in the split's order.
  report.write(got, tmp_path / 'report')
  with open(tmp_path / 'report' / 'per_image.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == [e['id'] for e in examples] and len(set(r['id'] for r in rows)) == 3
  for row, prob, label in zip(rows, probs, labels):
    for k, name in enumerate(CLASSES, start=1):
      assert int(row[f'{name}_true_pixels']) == np.sum(label == k)
      predicted = np.sum(prob[..., k - 1] > np.float32(0.5))
      assert abs(int(row[f'{name}_predicted_pixels']) - predicted) <= 2  # float32 rounding
