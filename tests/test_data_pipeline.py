"""The grain pipelines: official transforms end to end, topology-invariant batches, resume, prepare."""
import dataclasses

import cv2
import numpy as np
from PIL import Image
import pytest

from configs import common
from data_pipelines import build
from data_pipelines import codecs
from data_pipelines import pipeline
from data_pipelines import prepare
from data_pipelines import sources
from data_pipelines import synthetic
from data_pipelines import transforms

SIZE = (96, 144)
NUM_TRAIN = 5


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  manual_dir = synthetic.write_download('idrid', root / 'download', image_size=SIZE, seed=1,
                                        num_images={'train': NUM_TRAIN, 'test': 3})
  build.build('idrid', manual_dir, root / 'tfds')
  return root / 'tfds'


def _config(**overrides):
  config = common.data_config('idrid')
  config.img_scale = (144, 96)  # ratio 1 keeps the synthetic size
  config.crop_size = (64, 112)
  config.num_workers = 0
  config.update(overrides)
  return config


def _opencv_resize(image, size):
  return cv2.resize(np.ascontiguousarray(image), size[::-1], interpolation=cv2.INTER_LINEAR)


def _pillow_resize(image, size):
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size[::-1], Image.BILINEAR))


def _reference_train_example(record, example, seed, config, resize=_opencv_resize):
  """The official order written out on full-resolution arrays: dihedral, rescale (cv2 INTER_LINEAR, as
  mmcv.imrescale; or another `resize`), crop, pad; the step normalises (test_data_transforms)."""
  rng = np.random.default_rng(seed)
  k = int(rng.integers(6))
  ratio = rng.uniform(*config.ratio_range)
  image = transforms.dihedral(example['image'], k)
  bits = transforms.dihedral(codecs.decode_bits(record['mask_bits'], example['image'].shape[:2]), k)
  target = transforms.rescale_size(image.shape[:2], config.img_scale, ratio)
  image = resize(image, target)
  rows = np.minimum(np.floor(np.arange(target[0]) * bits.shape[0] / target[0]), bits.shape[0] - 1)
  cols = np.minimum(np.floor(np.arange(target[1]) * bits.shape[1] / target[1]), bits.shape[1] - 1)
  bits = bits[rows.astype(int)[:, None], cols.astype(int)[None, :]]
  ch, cw = config.crop_size
  y0 = rng.integers(0, max(target[0] - ch, 0) + 1)
  x0 = rng.integers(0, max(target[1] - cw, 0) + 1)
  image, bits = image[y0:y0 + ch, x0:x0 + cw], bits[y0:y0 + ch, x0:x0 + cw]
  label_map = np.zeros(bits.shape, np.uint8)
  for c in range(4):  # EX, HE, SE, MA in turn: the later class wins
    label_map[(bits >> c & 1) == 1] = c + 1
  label = (label_map[..., None] == np.arange(1, 5)).astype(np.uint8)
  out_image = np.zeros(tuple(config.crop_size) + (3,), np.uint8)
  out_label = np.zeros(tuple(config.crop_size) + (4,), np.uint8)
  out_image[:image.shape[0], :image.shape[1]] = image
  out_label[:label.shape[0], :label.shape[1]] = label
  return out_image, out_label, image.shape[:2]


@pytest.mark.parametrize('seed', range(6))
def test_train_example_matches_the_official_order(data_dir, seed):
  # The crop (64, 112) is smaller than some rescaled images and larger than others (padding).
  config = _config(ratio_range=(0.5, 2.0), photometric=False)
  source = sources.raw_source('idrid', 'train', data_dir)
  examples = sources.load('idrid', 'train', data_dir)
  record, example = source[seed % NUM_TRAIN], examples[seed % NUM_TRAIN]
  out = pipeline.train_example(record, np.random.default_rng(seed), **_transform_kwargs(config))
  image, label, size = _reference_train_example(record, example, seed, config)
  np.testing.assert_array_equal(out['label'], label)
  np.testing.assert_array_equal(out['image'], image)
  np.testing.assert_array_equal(out['image_size'], size)
  assert out['image'].dtype == out['label'].dtype == np.uint8 and out['image_size'].dtype == np.int32


@pytest.mark.parametrize('ratio', [0.5, 0.3])
def test_reduced_decode_keeps_image_and_label_aligned(data_dir, ratio):
  # Opt-in: ratios <= 1/2 decode the JPEG at 1/2 (or 1/4) scale before the dihedral map and the resize.
  config = _config(ratio_range=(ratio, ratio), photometric=False, crop_size=SIZE, reduced_decode=True)
  record = sources.raw_source('idrid', 'train', data_dir)[1]
  example = sources.load('idrid', 'train', data_dir)[1]
  for seed in range(12):
    out = pipeline.train_example(record, np.random.default_rng(seed), **_transform_kwargs(config))
    # Compared with the full-size decode resized by the same (antialiased) filter.
    image, label, _ = _reference_train_example(record, example, seed, config, _pillow_resize)
    np.testing.assert_array_equal(out['label'], label)
    h, w = transforms.rescale_size(transforms.dihedral_size(SIZE, np.random.default_rng(seed).integers(6)),
                                   config.img_scale, ratio)
    error = np.abs(out['image'].astype(np.float64) - image)[:h, :w]  # in uint8 levels
    assert error.mean() < 3.0, (seed, error.mean())


def _transform_kwargs(config):
  return dataclasses.asdict(pipeline.train_transform(config))


def test_reduced_decode_is_close_to_full_decode(data_dir):
  record = sources.raw_source('idrid', 'test', data_dir)[0]
  image = sources.load('idrid', 'test', data_dir)[0]['image']
  scale = (60, 40)  # 96x144 -> 40x60: the JPEG is decoded at 1/2 (48x72)
  assert codecs.open_jpeg(record['image'], min_size=(40, 60))[1] == 2
  out = pipeline.eval_example(record, img_scale=scale, mean=(0, 0, 0), std=(1, 1, 1),
                              reduced_decode=True)
  full = _pillow_resize(image, (40, 60)).astype(np.float32)
  assert out['image'].shape == full.shape == (40, 60, 3)
  assert np.abs(out['image'] - full).mean() < 2.0


IDRID_SIZE = (2848, 4288)


@pytest.fixture(scope='module')
def dotted_record():
  """A full-size IDRiD-like record with 400 tiny dots: dark ones are MA, bright ones EX in the masks."""
  data, dots = synthetic.dotted_jpeg(IDRID_SIZE, seed=3)
  masks = [np.zeros(IDRID_SIZE, bool) for _ in range(4)]
  yy, xx = np.mgrid[-6:7, -6:7]
  for y, x, r, sign in dots:
    iy, ix = int(round(y)), int(round(x))
    disc = (yy + iy - y) ** 2 + (xx + ix - x) ** 2 <= r * r
    masks[3 if sign < 0 else 0][iy - 6:iy + 7, ix - 6:ix + 7] |= disc
  return {'id': b'dots', 'image': data, 'mask_bits': codecs.pack_bits(masks),
          'height': IDRID_SIZE[0], 'width': IDRID_SIZE[1]}


def _opencv_image(record):
  """mmcv.imfrombytes(flag='color'): cv2.imdecode, BGR."""
  return cv2.imdecode(np.frombuffer(record['image'], np.uint8), cv2.IMREAD_COLOR)


def test_test_input_equals_opencv_at_the_idrid_scale(dotted_record):
  out = pipeline.eval_example(dotted_record, img_scale=(1440, 960), mean=(0, 0, 0), std=(1, 1, 1))
  # mmcv.imrescale to (1440, 960): (1440, 956) by int(x * scale + 0.5), cv2.resize INTER_LINEAR; RGB.
  expected = cv2.resize(_opencv_image(dotted_record), (1440, 956), interpolation=cv2.INTER_LINEAR)
  np.testing.assert_array_equal(out['image'], expected[..., ::-1])
  reduced = pipeline.eval_example(dotted_record, img_scale=(1440, 960), mean=(0, 0, 0), std=(1, 1, 1),
                                  reduced_decode=True)
  assert np.abs(reduced['image'] - expected[..., ::-1]).max() > 20  # the opt-in is another input


# The seeds draw every dihedral map k once (transforms.DIHEDRAL_NAMES).
@pytest.mark.parametrize('ratio,seed,k', [(0.5, 21, 1), (0.5, 3, 4), (1.0, 11, 0), (1.0, 0, 5),
                                          (2.0, 12, 3), (2.0, 1, 2)])
def test_train_crop_equals_opencv(dotted_record, ratio, seed, k):
  crop = (960, 1440)
  out = pipeline.train_example(dotted_record, np.random.default_rng(seed), img_scale=(1440, 960),
                               ratio_range=(ratio, ratio), crop_size=crop, photometric=False)
  # The official order: the (offline) dihedral map of the decoded image, Resize(ratio_range) =
  # mmcv.imrescale into (int(1440 r), int(960 r)), RandomCrop offsets, Pad; labels nearest.
  rng = np.random.default_rng(seed)
  assert int(rng.integers(6)) == k
  assert rng.uniform(ratio, ratio) == ratio
  image = np.ascontiguousarray(transforms.dihedral(_opencv_image(dotted_record), k))
  h, w = image.shape[:2]
  factor = min(int(1440 * ratio) / max(h, w), int(960 * ratio) / min(h, w))
  target = (int(w * factor + 0.5), int(h * factor + 0.5))  # (w, h)
  resized = cv2.resize(image, target, interpolation=cv2.INTER_LINEAR)
  y0 = int(rng.integers(0, max(target[1] - crop[0], 0) + 1))
  x0 = int(rng.integers(0, max(target[0] - crop[1], 0) + 1))
  expected = resized[y0:y0 + crop[0], x0:x0 + crop[1], ::-1]
  eh, ew = expected.shape[:2]
  np.testing.assert_array_equal(out['image'][:eh, :ew], expected)
  assert tuple(out['image_size']) == (eh, ew)
  assert not out['image'][eh:].any() and not out['image'][:, ew:].any()
  bits = np.ascontiguousarray(transforms.dihedral(
      codecs.decode_bits(dotted_record['mask_bits'], IDRID_SIZE), k))
  bits = cv2.resize(bits, target, interpolation=cv2.INTER_NEAREST)[y0:y0 + crop[0], x0:x0 + crop[1]]
  np.testing.assert_array_equal(out['label'][:eh, :ew], transforms.labels_from_bits(bits, 'exclusive'))
  assert out['label'][..., 3].any() and out['label'][..., 0].any()  # dots survive in the crop


@pytest.mark.parametrize('label_mode', ['exclusive', 'multilabel'])
def test_eval_dataset(data_dir, label_mode):
  config = _config(img_scale=(300, 200), label_mode=label_mode)
  examples = pipeline.eval_dataset(config, data_dir, 'test')
  reference = sources.load('idrid', 'test', data_dir)
  assert len(examples) == 3
  for example, expected in zip(examples, reference):
    assert example['id'] == expected['id'] and example['original_size'] == SIZE
    assert example['image'].shape == (200, 300, 3)  # keep-ratio into (300, 200), no padding
    upscaled = transforms.rescale_keep_ratio(expected['image'], (300, 200))
    np.testing.assert_allclose(example['image'] * np.array(config.std) + np.array(config.mean),
                               upscaled, atol=1e-3)
    masks = expected['masks']
    if label_mode == 'exclusive':
      highest = np.where(masks.any(-1), 3 - np.argmax(masks[..., ::-1], -1), -1)
      masks = highest[..., None] == np.arange(4)
    np.testing.assert_array_equal(example['masks'], masks)
  assert (reference[0]['masks'].sum(-1) > 1).any()  # the modes differ on these images


def test_eval_shares_are_disjoint_and_cover_the_split(data_dir):
  config = _config()
  shares = [[e['id'] for e in pipeline.eval_dataset(config, data_dir, 'test', process_index=p,
                                                      process_count=2)] for p in range(2)]
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == [e['id'] for e in sources.load('idrid', 'test', data_dir)]


def _identify(batch_images, data_dir):
  """Which train example each image of a batch is (no augmentation: the image is the example)."""
  examples = {e['id']: e['image'].astype(np.int64) for e in sources.load('idrid', 'train', data_dir)}
  ids = []
  for image in batch_images:
    matches = [i for i, e in examples.items() if np.abs(e - image).max() <= 1]
    assert len(matches) == 1
    ids.append(matches[0])
  return ids


def _plain_config():
  return _config(ratio_range=(1.0, 1.0), crop_size=SIZE, dihedral=False, photometric=False)


def test_epochs_are_permutations_and_reshuffle(data_dir):
  config = _plain_config()
  iterator = pipeline.train_iterator(config, data_dir, batch_size=NUM_TRAIN, seed=0)
  epochs = [_identify(next(iterator)['image'], data_dir) for _ in range(3)]
  assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == NUM_TRAIN for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled across epochs


def test_train_batches(data_dir):
  config = _config(crop_size=(128, 160), ratio_range=(0.5, 2.0))
  iterator = pipeline.train_iterator(config, data_dir, batch_size=4, seed=3)
  padded = 0
  for _ in range(3):
    batch = next(iterator)
    assert batch['image'].shape == (4, 128, 160, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (4, 128, 160, 4) and batch['label'].dtype == np.uint8
    assert batch['image_size'].shape == (4, 2) and batch['image_size'].dtype == np.int32
    assert batch['label'].max() == 1 and batch['label'].sum(-1).max() == 1  # exclusive one-hot
    for image, label, (h, w) in zip(batch['image'], batch['label'], batch['image_size']):
      assert image[:h, :w].any(-1).mean() > 0.5  # the crop: a fundus photograph, mostly not black
      padded += image.shape[0] * image.shape[1] - h * w
      assert not image[h:].any() and not image[:, w:].any()  # padding: 0 (the step normalises
      assert not label[h:].any() and not label[:, w:].any()  # only the crop), label 0
  assert padded > 0  # ratios below ~1.3 give images smaller than the crop


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches, others):
  for a, b in zip(batches, others, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image_size'], b['image_size'])
    np.testing.assert_array_equal(a['label'], b['label'])


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize('rows', [[range(0, 2), range(2, 4)], [range(0, 1), range(1, 2), range(2, 3),
                                                                range(3, 4)], [(0, 2), (1, 3)]])
def test_global_batches_do_not_depend_on_the_processes(data_dir, rows):
  # Augmented (dihedral, rescale, crop, photometric): global batch k is the same whoever decodes it.
  config = _config(ratio_range=(0.5, 2.0))
  expected = _take(pipeline.train_iterator(config, data_dir, batch_size=4, seed=3), 3)
  shards = [_take(pipeline.train_iterator(config, data_dir, batch_size=4, seed=3, rows=r), 3)
            for r in rows]
  for k in range(3):
    got = _concat([shard[k] for shard in shards])
    order = np.argsort(np.concatenate([list(r) for r in rows]))
    _assert_same([expected[k]], [{key: v[order] for key, v in got.items()}])
  assert not np.array_equal(expected[0]['image'][0], expected[0]['image'][1])


def test_resumes_from_the_step_alone(data_dir):
  config = _config()
  first = _take(pipeline.train_iterator(config, data_dir, batch_size=2, seed=7), 5)
  _assert_same(first[3:], _take(pipeline.train_iterator(config, data_dir, batch_size=2, seed=7,
                                                        start_step=3), 2))
  _assert_same(first[4:], _take(pipeline.train_iterator(config, data_dir, batch_size=2, seed=7,
                                                        start_step=4, rows=(0, 1)), 1))
  other = next(pipeline.train_iterator(config, data_dir, batch_size=2, seed=8))
  assert not np.array_equal(other['image'], first[0]['image'])


@pytest.mark.slow
def test_workers_give_the_same_batches(data_dir):
  config = _config()
  expected = _take(pipeline.train_iterator(config, data_dir, batch_size=4, seed=5), 4)
  config.num_workers = 2
  iterator = pipeline.train_iterator(config, data_dir, batch_size=4, seed=5, start_step=1,
                                     rows=(2, 3))
  _assert_same([{k: v[2:] for k, v in b.items()} for b in expected[1:]], _take(iterator, 3))
  iterator.close()


def test_batch_size_must_divide_by_processes(data_dir):
  with pytest.raises(ValueError, match='batch_size 3 is not divisible by the 2 processes'):
    pipeline.default_rows(3, 0, 2)
  with pytest.raises(ValueError, match=r'rows \(4,\) are not rows of a global batch of 4'):
    pipeline.train_dataset(_config(), data_dir, batch_size=4, seed=0, rows=(4,))


def test_prepare_synthetic_builds_once(tmp_path):
  config = common.data_config('ddr')
  config.synthetic = True
  config.synthetic_image_size = (64, 96)
  config.synthetic_num_train, config.synthetic_num_test = 2, 1
  config.num_workers = 0
  data_dir = prepare.prepare(config, tmp_path)
  assert [len(sources.load('ddr', s, data_dir)) for s in ('train', 'validation', 'test')] == [2, 1, 1]
  config.crop_size, config.img_scale = (48, 48), (80, 80)
  batch = next(pipeline.train_iterator(config, data_dir, batch_size=2, seed=0))
  assert batch['image'].shape == (2, 48, 48, 3) and batch['label'].shape == (2, 48, 48, 4)
  example = pipeline.eval_dataset(config, data_dir, 'validation')[0]
  assert max(example['image'].shape[:2]) == 80 and example['masks'].shape[:2] == example['original_size']
  info = tmp_path / 'tfds' / 'ddr' / '1.0.0' / 'dataset_info.json'
  stamp = info.stat().st_mtime_ns
  assert prepare.prepare(config, tmp_path) == data_dir
  assert info.stat().st_mtime_ns == stamp


def test_prepare_manual_dir_and_missing(tmp_path):
  config = common.data_config('idrid')
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match='python -m data_pipelines.build idrid'):
    prepare.prepare(config, tmp_path)
  config.manual_dir = str(synthetic.write_download('idrid', tmp_path / 'download', image_size=(48, 72),
                                                   num_images={'train': 1, 'test': 1}))
  assert prepare.prepare(config, tmp_path) == config.data_dir
  assert len(sources.load('idrid', 'test', config.data_dir)) == 1
