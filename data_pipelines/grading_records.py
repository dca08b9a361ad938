"""The TFDS feature spec of the DR grading builders (DDR, IDRiD part B) and the checks of their label files.

Every error names the label file and line (or the image file) it is about.
"""
import tensorflow_datasets as tfds
import numpy as np

from data_pipelines import codecs

# ICDR grades; DDR adds 5 = ungradable.
GRADE_NAMES = ('none', 'mild', 'moderate', 'severe', 'proliferative', 'ungradable')
UNGRADABLE = 5
MACULAR_EDEMA_NAMES = ('none', 'mild_or_moderate', 'severe')  # IDRiD "Risk of macular edema" 0..2


def features(macular_edema=False):
  """The stored features; `macular_edema` adds IDRiD's risk of macular edema."""
  spec = {
      'id': tfds.features.Text(doc='File stem, e.g. IDRiD_001 or 007-3036-100.'),
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg',
                                   doc='The original JPEG bytes, unchanged.'),
      'grade': tfds.features.ClassLabel(names=GRADE_NAMES,
                                        doc='DR grade 0..4 (ICDR); DDR 5 = ungradable.'),
      'height': tfds.features.Scalar(dtype=np.int32),
      'width': tfds.features.Scalar(dtype=np.int32),
  }
  if macular_edema:
    spec['macular_edema'] = tfds.features.ClassLabel(names=MACULAR_EDEMA_NAMES,
                                                     doc='IDRiD risk of macular edema 0..2.')
  return tfds.features.FeaturesDict(spec)


def make_example(stem, image_path, grade, macular_edema=None):
  """Reads and checks one JPEG; returns the feature dict of `features(macular_edema is not None)`."""
  data, (height, width) = codecs.read_jpeg(image_path)
  example = {'id': stem, 'image': data, 'grade': int(grade), 'height': height, 'width': width}
  if macular_edema is not None:
    example['macular_edema'] = int(macular_edema)
  return example


def parse_grade(text, where, allowed):
  """An integer label from `text`, which must be one of `allowed`; the error names `where`."""
  try:
    value = int(text.strip())
  except ValueError:
    value = None
  if value not in allowed:
    raise ValueError(f'{where}: unknown grade {text.strip()!r}; expected one of '
                     f'{", ".join(map(str, allowed))}')
  return value


def check_new(stem, seen, where):
  """Raises when `stem` was already listed; `seen` maps stem -> where it was first listed."""
  if stem in seen:
    raise ValueError(f'{where}: duplicate image name {stem!r} (first listed at {seen[stem]})')
  seen[stem] = where


def require_image(path, where):
  """Raises when a listed image is missing; returns `path`."""
  if not path.exists():
    raise FileNotFoundError(f'{where}: missing image {path}')
  return path
