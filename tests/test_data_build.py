"""The TFDS builders over synthetic downloads: every example read back equals its source files."""
import pathlib
import shutil
import subprocess
import sys

import cv2
from etils import epath
import numpy as np
from PIL import Image
import pytest

from data_pipelines import build
from data_pipelines import sources
from data_pipelines import synthetic

SIZE = (160, 240)
IDRID_COUNTS = {'train': 4, 'test': 2}
DDR_COUNTS = {'train': 3, 'validation': 2, 'test': 2}
IDRID_FOLDERS = {'EX': '3. Hard Exudates', 'HE': '2. Haemorrhages', 'SE': '4. Soft Exudates',
                 'MA': '1. Microaneurysms', 'OD': '5. Optic Disc'}


@pytest.fixture(scope='module')
def downloads(tmp_path_factory):
  root = tmp_path_factory.mktemp('downloads')
  return {'idrid': synthetic.write_download('idrid', root / 'idrid', num_images=IDRID_COUNTS,
                                            image_size=SIZE, seed=3),
          'ddr': synthetic.write_download('ddr', root / 'ddr', num_images=DDR_COUNTS,
                                          image_size=SIZE, seed=4)}


@pytest.fixture(scope='module')
def data_dir(downloads, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  build.build('idrid', downloads['idrid'], data_dir)
  build.build('ddr', downloads['ddr'], data_dir)
  return data_dir


def _decode(path):
  with Image.open(path) as image:
    return np.asarray(image)


def _idrid_files(manual_dir, split):
  folder = {'train': 'a. Training Set', 'test': 'b. Testing Set'}[split]
  top = epath.Path(manual_dir) / 'A. Segmentation'
  images = sorted((top / '1. Original Images' / folder).glob('*.jpg'))
  masks = {p.stem: {k: top / '2. All Segmentation Groundtruths' / folder / d / f'{p.stem}_{k}.tif'
                    for k, d in IDRID_FOLDERS.items()} for p in images}
  return images, masks


def _ddr_files(manual_dir, split):
  folder = {'train': 'train', 'validation': 'valid', 'test': 'test'}[split]
  top = epath.Path(manual_dir) / 'DDR-dataset' / 'lesion_segmentation' / folder
  labels = 'segmentation label' if split == 'validation' else 'label'
  images = sorted((top / 'image').glob('*.jpg'))
  masks = {p.stem: {k: top / labels / k / f'{p.stem}.tif' for k in ('EX', 'HE', 'SE', 'MA')}
           for p in images}
  return images, masks


@pytest.mark.parametrize('name,split', [('idrid', 'train'), ('idrid', 'test'), ('ddr', 'train'),
                                        ('ddr', 'validation'), ('ddr', 'test')])
def test_every_example_equals_its_source_files(downloads, data_dir, name, split):
  images, masks = (_idrid_files if name == 'idrid' else _ddr_files)(downloads[name], split)
  examples = sources.load(name, split, data_dir)
  assert len(examples) == len(images) == (IDRID_COUNTS if name == 'idrid' else DDR_COUNTS)[split]
  assert [e['id'] for e in examples] == [p.stem for p in images]
  for path, example in zip(images, examples):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]  # mmcv.imread, then to RGB
    np.testing.assert_array_equal(example['image'], image)
    assert example['masks'].dtype == bool and example['masks'].shape == image.shape[:2] + (4,)
    for c, lesion in enumerate(('EX', 'HE', 'SE', 'MA')):
      mask_path = masks[path.stem][lesion]
      assert example['has_mask'][c] == mask_path.exists()
      # IDRiD: red on black RGB; DDR: one channel at 255. An absent file is an empty mask.
      expected = (_decode(mask_path).reshape(image.shape[:2] + (-1,)).max(-1) > 0
                  if mask_path.exists() else np.zeros(image.shape[:2], bool))
      np.testing.assert_array_equal(example['masks'][..., c], expected)
    if name == 'idrid':
      np.testing.assert_array_equal(example['optic_disc'], _decode(masks[path.stem]['OD'])[..., 0] > 0)


def test_synthetic_downloads_are_like_the_real_ones(downloads, data_dir):
  images, masks = _idrid_files(downloads['idrid'], 'train')
  se_exists = [m['SE'].exists() for m in masks.values()]
  assert any(se_exists) and not all(se_exists)  # some images without an SE file
  with Image.open(masks[images[0].stem]['EX']) as mask:
    assert mask.mode == 'RGB' and mask.format == 'TIFF'
    red = np.asarray(mask)
  assert set(np.unique(red[..., 0])) == {0, 255} and not red[..., 1:].any()
  ddr_images, ddr_masks = _ddr_files(downloads['ddr'], 'validation')
  with Image.open(ddr_masks[ddr_images[0].stem]['MA']) as mask:
    assert mask.mode == 'L' and set(np.unique(np.asarray(mask))) <= {0, 255}
  sizes = {e['image'].shape for e in sources.load('ddr', 'train', data_dir)}
  assert len(sizes) == 2  # varying cameras
  for example in sources.load('idrid', 'train', data_dir):
    areas = example['masks'].sum((0, 1))
    assert (areas > 0).sum() >= 3 and 0 < areas[3] < 100 and areas.max() < 2000  # tiny lesions
    # A microaneurysm sits on a haemorrhage in every image: the exclusive merge has overlaps.
    assert (example['masks'][..., 1] & example['masks'][..., 3]).any()


def test_synthetic_download_is_deterministic(tmp_path):
  first = synthetic.write_download('ddr', tmp_path / 'a', num_images={'train': 2}, image_size=SIZE)
  second = synthetic.write_download('ddr', tmp_path / 'b', num_images={'train': 2}, image_size=SIZE)
  first, second = pathlib.Path(first), pathlib.Path(second)
  files = sorted(p.relative_to(first) for p in first.rglob('*') if p.is_file())
  assert len(files) == 2 * 5
  for f in files:
    assert (first / f).read_bytes() == (second / f).read_bytes()


def _copy(downloads, name, tmp_path):
  return epath.Path(shutil.copytree(downloads[name], tmp_path / 'copy'))


def _expect_build_error(name, manual_dir, tmp_path, error, *fragments):
  with pytest.raises(error) as info:
    build.build(name, manual_dir, tmp_path / 'tfds')
  for fragment in fragments:
    assert str(fragment) in str(info.value), str(info.value)


def test_wrong_layout_says_expected_and_found(tmp_path):
  (tmp_path / 'wrong' / 'images').mkdir(parents=True)
  _expect_build_error('idrid', tmp_path / 'wrong', tmp_path, FileNotFoundError,
                      'A. Segmentation', 'Expected', "Found in", "['images']")
  _expect_build_error('ddr', tmp_path / 'wrong', tmp_path, FileNotFoundError,
                      'lesion_segmentation', 'Expected', "['images']")


def test_missing_folder_names_the_path(downloads, tmp_path):
  manual_dir = _copy(downloads, 'idrid', tmp_path)
  groundtruths = manual_dir / 'A. Segmentation' / '2. All Segmentation Groundtruths'
  gone = groundtruths / 'b. Testing Set' / '4. Soft Exudates'
  shutil.rmtree(gone)
  _expect_build_error('idrid', manual_dir, tmp_path, FileNotFoundError, gone, '1. Microaneurysms')


def test_idrid_without_optic_disc_folder_in_a_doubly_nested_unzip(downloads, data_dir, tmp_path):
  # The zip unpacked into a folder of its own name, and the (unused) optic disc masks left out.
  outer = tmp_path / 'unzipped' / 'A. Segmentation'
  shutil.copytree(epath.Path(downloads['idrid']) / 'A. Segmentation', outer / 'A. Segmentation')
  for split in ('a. Training Set', 'b. Testing Set'):
    shutil.rmtree(outer / 'A. Segmentation' / '2. All Segmentation Groundtruths' / split / '5. Optic Disc')
  for manual_dir in (outer, tmp_path / 'unzipped'):
    build.build('idrid', manual_dir, tmp_path / f'tfds_{manual_dir.name}')
    for split in ('train', 'test'):
      examples = sources.load('idrid', split, tmp_path / f'tfds_{manual_dir.name}')
      reference = sources.load('idrid', split, data_dir)
      assert len(examples) == len(reference) == IDRID_COUNTS[split]
      for example, expected in zip(examples, reference):
        np.testing.assert_array_equal(example['image'], expected['image'])
        np.testing.assert_array_equal(example['masks'], expected['masks'])
        assert not example['optic_disc'].any() and expected['optic_disc'].any()


def test_missing_image_names_the_path(downloads, tmp_path):
  manual_dir = _copy(downloads, 'ddr', tmp_path)
  image = manual_dir / 'DDR-dataset' / 'lesion_segmentation' / 'test' / 'image'
  victim = sorted(image.glob('*.jpg'))[0]
  victim.unlink()
  _expect_build_error('ddr', manual_dir, tmp_path, FileNotFoundError, 'Missing image', victim)


def test_corrupt_jpeg_names_the_path(downloads, tmp_path):
  manual_dir = _copy(downloads, 'idrid', tmp_path)
  victim = manual_dir / 'A. Segmentation' / '1. Original Images' / 'a. Training Set' / 'IDRiD_02.jpg'
  victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
  _expect_build_error('idrid', manual_dir, tmp_path, ValueError, 'Corrupt or unreadable JPEG', victim)


@pytest.mark.filterwarnings('ignore:Corrupt EXIF data')
def test_corrupt_tiff_names_the_path(downloads, tmp_path):
  manual_dir = _copy(downloads, 'ddr', tmp_path)
  labels = manual_dir / 'DDR-dataset' / 'lesion_segmentation' / 'valid' / 'segmentation label' / 'HE'
  victim = sorted(labels.glob('*.tif'))[0]
  victim.write_bytes(b'II*\x00garbage')
  _expect_build_error('ddr', manual_dir, tmp_path, ValueError, 'Corrupt or unreadable mask', victim)


def test_mask_size_mismatch_names_both_files(downloads, tmp_path):
  manual_dir = _copy(downloads, 'idrid', tmp_path)
  victim = (manual_dir / 'A. Segmentation' / '2. All Segmentation Groundtruths' / 'a. Training Set' /
            '3. Hard Exudates' / 'IDRiD_01_EX.tif')
  Image.new('RGB', (SIZE[1], SIZE[0] - 1)).save(victim)
  _expect_build_error('idrid', manual_dir, tmp_path, ValueError, victim, 'IDRiD_01.jpg',
                      f'{SIZE[1]}x{SIZE[0] - 1}')


def test_load_unbuilt_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m data_pipelines.build idrid'):
    sources.load('idrid', 'train', tmp_path)


@pytest.mark.slow
def test_build_command(downloads, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.build', 'ddr', f'--manual_dir={downloads["ddr"]}',
       f'--data_dir={tmp_path}'], capture_output=True, text=True, check=True,
      cwd=epath.Path(__file__).parent.parent)
  assert 'ddr validation: 2 examples' in result.stdout
  examples = sources.load('ddr', 'validation', tmp_path)
  assert len(examples) == 2 and examples[1]['image'].shape[-1] == 3
