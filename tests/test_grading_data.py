"""The DR grading builders over synthetic downloads, their errors, and the grading pipeline."""
import pathlib
import shutil

from etils import epath
import ml_collections
import numpy as np
from PIL import Image
import pytest

from data_pipelines import build
from data_pipelines import grading_pipeline
from data_pipelines import sources
from data_pipelines import synthetic_grading

SIZE = (64, 96)
DDR_COUNTS = {'train': 12, 'validation': 6, 'test': 7}
IDRID_COUNTS = {'train': 5, 'test': 3}


@pytest.fixture(scope='module')
def downloads(tmp_path_factory):
  root = tmp_path_factory.mktemp('grading_downloads')
  return {name: synthetic_grading.write_download(name, root / name, num_images=counts,
                                                 image_size=SIZE, seed=1)
          for name, counts in (('ddr_grading', DDR_COUNTS), ('idrid_grading', IDRID_COUNTS))}


@pytest.fixture(scope='module')
def data_dir(downloads, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('grading_tfds')
  for name in ('ddr_grading', 'ddr_grading/with_ungradable', 'idrid_grading'):
    build.build(name, downloads[name.split('/')[0]], data_dir)
  return data_dir


def _ddr_listing(manual_dir, split):
  folder = {'train': 'train', 'validation': 'valid', 'test': 'test'}[split]
  top = epath.Path(manual_dir) / 'DDR-dataset' / 'DR_grading'
  rows = [line.split() for line in (top / f'{folder}.txt').read_text().splitlines() if line.strip()]
  return [(top / folder / name, int(grade)) for name, grade in rows]


def _idrid_listing(manual_dir, split):
  folder, csv_name = {'train': ('a. Training Set', 'a. IDRiD_Disease Grading_Training Labels.csv'),
                      'test': ('b. Testing Set', 'b. IDRiD_Disease Grading_Testing Labels.csv')}[split]
  top = epath.Path(manual_dir) / 'B. Disease Grading'
  rows = [line.split(',') for line in (top / '2. Groundtruths' / csv_name).read_text().splitlines()[1:]]
  return [(top / '1. Original Images' / folder / f'{r[0]}.jpg', int(r[1]), int(r[2]))
          for r in rows if r[0]]


@pytest.mark.parametrize('name,split', [('ddr_grading', 'train'), ('ddr_grading', 'test'),
                                        ('ddr_grading/with_ungradable', 'validation'),
                                        ('idrid_grading', 'train'), ('idrid_grading', 'test')])
def test_every_example_equals_its_listing(downloads, data_dir, name, split):
  base = name.split('/')[0]
  source = sources.raw_source(name, split, data_dir)
  if base == 'ddr_grading':
    listing = [(p, g) for p, g in _ddr_listing(downloads[base], split)
               if g != 5 or name.endswith('with_ungradable')]
    assert len(listing) < DDR_COUNTS[split] or name.endswith('with_ungradable')
  else:
    listing = _idrid_listing(downloads[base], split)
  assert len(source) == len(listing)
  for record, row in zip(source, listing):
    path, grade = row[0], row[1]
    assert record['id'].decode() == path.stem
    assert record['image'] == path.read_bytes()  # the JPEG bytes, unchanged
    assert int(record['grade']) == grade
    with Image.open(path) as image:
      assert (int(record['width']), int(record['height'])) == image.size
    if base == 'idrid_grading':
      assert int(record['macular_edema']) == row[2]
  if name.endswith('with_ungradable'):
    assert 5 in [g for _, g in listing]


def _copy_ddr(downloads, tmp_path):
  dst = tmp_path / 'DR_grading'
  shutil.copytree(pathlib.Path(downloads['ddr_grading']) / 'DDR-dataset' / 'DR_grading', dst)
  return dst


@pytest.mark.parametrize('edit,message', [
    (lambda lines: lines[:1] + [lines[1].split()[0] + ' 7'] + lines[2:], r'train.txt:2: unknown grade'),
    (lambda lines: lines + [lines[0]], r'train.txt:13: duplicate image name .* \(first listed at .*train.txt:1\)'),
    (lambda lines: ['nowhere.jpg 1'] + lines, r'train.txt:1: missing image .*nowhere.jpg'),
    (lambda lines: ['a b c'] + lines, r'train.txt:1: expected "<name>.jpg <grade>"'),
])
def test_ddr_label_errors_name_the_line(downloads, tmp_path, edit, message):
  root = _copy_ddr(downloads, tmp_path)
  label_file = root / 'train.txt'
  label_file.write_text('\n'.join(edit(label_file.read_text().splitlines())) + '\n')
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    build.build('ddr_grading', tmp_path, tmp_path / 'tfds')


def test_idrid_label_errors_name_the_line(downloads, tmp_path):
  shutil.copytree(pathlib.Path(downloads['idrid_grading']) / 'B. Disease Grading',
                  tmp_path / 'B. Disease Grading')
  csv_path = (tmp_path / 'B. Disease Grading' / '2. Groundtruths' /
              'b. IDRiD_Disease Grading_Testing Labels.csv')
  lines = csv_path.read_text().splitlines()
  csv_path.write_text('\n'.join(lines[:2] + ['IDRiD_999,1,0,,,'] + lines[2:]) + '\n')
  with pytest.raises(FileNotFoundError, match=r'Testing Labels.csv:3: missing image .*IDRiD_999.jpg'):
    build.build('idrid_grading', tmp_path, tmp_path / 'tfds')
  csv_path.write_text('\n'.join(lines[:2] + [lines[1].replace(',', ',x', 1)] + lines[2:]) + '\n')
  with pytest.raises(ValueError, match=r"Testing Labels.csv:3: unknown grade 'x"):
    build.build('idrid_grading', tmp_path, tmp_path / 'tfds')
  csv_path.write_text('\n'.join(lines + [lines[1]]) + '\n')
  with pytest.raises(ValueError, match=r'duplicate image name'):
    build.build('idrid_grading', tmp_path, tmp_path / 'tfds')


def test_fit_square_and_train_batches(downloads, data_dir):
  record = sources.raw_source('ddr_grading', 'test', data_dir)[1]
  path = _ddr_listing(downloads['ddr_grading'], 'test')[1][0]
  with Image.open(path) as image:
    w, h = image.size
    reference = np.asarray(image.convert('RGB').resize((80, round(h * 80 / w)),
                                                       Image.Resampling.BILINEAR))
  out = grading_pipeline.fit_square(record, 80)
  top = (80 - reference.shape[0]) // 2
  assert out.shape == (80, 80, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[top:top + reference.shape[0]], reference)
  assert not out[:top].any() and not out[top + reference.shape[0]:].any()

  config = ml_collections.ConfigDict(dict(
      name='ddr_grading', keep_ungradable=False, train_split='train', image_size=48, dihedral=True,
      photometric=True, num_workers=0, prefetch=1))
  batch = next(grading_pipeline.train_iterator(config, data_dir, batch_size=4, seed=0))
  assert batch['image'].shape == (4, 48, 48, 3) and batch['image'].dtype == np.uint8
  assert batch['grade'].shape == (4,) and set(batch['grade']) <= set(range(5))


def test_train_batches_are_a_function_of_seed_and_step(data_dir):
  """Resuming at step k (start_step) and splitting a global batch into rows give the same pixels."""
  config = ml_collections.ConfigDict(dict(
      name='ddr_grading', keep_ungradable=False, train_split='train', image_size=32, dihedral=True,
      photometric=True, num_workers=0, prefetch=1))
  whole = grading_pipeline.train_iterator(config, data_dir, batch_size=4, seed=3)
  first = [next(whole) for _ in range(4)]  # 16 draws of 12 examples: the second epoch begins
  resumed = next(grading_pipeline.train_iterator(config, data_dir, batch_size=4, seed=3, start_step=2))
  halves = [next(grading_pipeline.train_iterator(config, data_dir, batch_size=4, seed=3, start_step=2,
                                                 rows=rows)) for rows in ((0, 1), (2, 3))]
  for key in ('image', 'grade'):
    np.testing.assert_array_equal(resumed[key], first[2][key])
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[2][key])
  assert not np.array_equal(first[1]['image'], first[2]['image'])
  other = next(grading_pipeline.train_iterator(config, data_dir, batch_size=4, seed=4, start_step=2))
  assert not np.array_equal(other['image'], first[2]['image'])
