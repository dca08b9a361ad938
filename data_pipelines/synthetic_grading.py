"""Synthetic DR grading downloads laid out like DDR "DR_grading" and IDRiD "B. Disease Grading".

The grade follows the lesions drawn, loosely as the ICDR scale: 0 none; 1 microaneurysms only;
2 microaneurysms, haemorrhages and exudates; 3 many haemorrhages and soft exudates; 4 more and larger
of everything. DDR's grade 5 (ungradable) is a dark, blurred photograph.
"""
from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageFilter

from data_pipelines import synthetic
from data_pipelines.ddr_grading import ddr_grading_dataset_builder as ddr
from data_pipelines.idrid_grading import idrid_grading_dataset_builder as idrid

SPLITS = {'ddr_grading': tuple(ddr.SPLITS), 'idrid_grading': tuple(idrid.SPLITS)}

# grade -> lesion -> (min, max) count.
LESION_COUNTS = {
    0: {},
    1: {'MA': (3, 6)},
    2: {'MA': (3, 6), 'HE': (2, 4), 'EX': (2, 5)},
    3: {'MA': (4, 8), 'HE': (7, 10), 'EX': (3, 6), 'SE': (1, 2)},
    4: {'MA': (4, 8), 'HE': (12, 16), 'EX': (5, 8), 'SE': (3, 5)},
}


def photograph(rng, size, grade):
  """A uint8 (h, w, 3) photograph of `grade` (0..4, or 5 = ungradable)."""
  scale = min(size) / 100  # lesions 1.6x the segmentation data's: grades must survive downscaling
  if grade == 5:
    image, _ = synthetic.draw_lesions(rng, size, {}, scale)
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(min(size) / 20))
    return (np.asarray(blurred, np.float32) * 0.35).astype(np.uint8)
  counts = {k: rng.integers(lo, hi + 1) for k, (lo, hi) in LESION_COUNTS[grade].items()}
  return synthetic.draw_lesions(rng, size, counts, scale)[0]


def _grades(rng, count, num_grades):
  """`count` grades, each of the `num_grades` grades at least once when count allows, shuffled."""
  grades = np.arange(count) % num_grades
  rng.shuffle(grades)
  return grades


def _save(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, format='JPEG', quality=90)


def _write_ddr(root, num_images, image_size, seed):
  top = root / 'DDR-dataset' / ddr.TOP
  for split_index, (split, folder) in enumerate(ddr.SPLITS.items()):
    rng = np.random.default_rng([seed, split_index])
    lines = []
    for i, grade in enumerate(_grades(rng, num_images.get(split, 0), 6)):
      stem = f'{split_index:03d}-{rng.integers(1000, 9999)}-{100 + i}'
      size = image_size if i % 2 == 0 else (image_size[0] * 7 // 8, image_size[1] * 7 // 8)
      _save(top / folder / f'{stem}.jpg', photograph(rng, size, int(grade)))
      lines.append(f'{stem}.jpg {grade}')
    (top / f'{folder}.txt').write_text('\n'.join(lines) + '\n')


def _write_idrid(root, num_images, image_size, seed):
  top = root / idrid.TOP
  number = 0
  for split_index, (split, (folder, label_name)) in enumerate(idrid.SPLITS.items()):
    rng = np.random.default_rng([seed, split_index])
    rows = ['Image name,Retinopathy grade,Risk of macular edema ,,,']  # as the real training file
    for grade in _grades(rng, num_images.get(split, 0), 5):
      number += 1
      stem = f'IDRiD_{number:03d}'
      _save(top / idrid.IMAGES / folder / f'{stem}.jpg', photograph(rng, image_size, int(grade)))
      rows.append(f'{stem},{grade},{min(int(grade), 2) if grade >= 2 else 0},,,')
    path = top / idrid.GROUNDTRUTHS / label_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(rows + [',,,,,']) + '\n')


def write_download(name, root, *, num_images, image_size=(256, 384), seed=0):
  """Writes a synthetic grading download of `name` ('ddr_grading' or 'idrid_grading') under `root`.

  Args:
    name: 'ddr_grading' or 'idrid_grading'.
    root: the folder to write into.
    num_images: split -> number of images (ddr: train, validation, test; idrid: train, test).
    image_size: (h, w); DDR: every other image is 7/8 of it, as cameras vary.
    seed: the random seed.

  Returns:
    the manual_dir to pass to the builder.
  """
  synthetic.check_splits(name, num_images, SPLITS)
  root = epath.Path(root)
  writer = _write_ddr if name == 'ddr_grading' else _write_idrid
  writer(root, num_images, tuple(int(s) for s in image_size), seed)
  return root
