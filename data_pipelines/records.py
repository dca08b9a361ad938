"""The TFDS feature spec shared by the IDRiD and DDR builders, and the example made from the files."""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import codecs


def features(optic_disc=False):
  """The stored features; `optic_disc` adds the IDRiD optic disc flag (its mask is bit 4 of mask_bits)."""
  spec = {
      'id': tfds.features.Text(doc='File stem, e.g. IDRiD_01.'),
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg',
                                   doc='The original JPEG bytes, unchanged.'),
      'mask_bits': tfds.features.Tensor(
          shape=(), dtype=np.object_,
          doc='Full-resolution masks as (height, width) uint8 bit flags, zlib-compressed: bit 0 EX, '
              '1 HE, 2 SE, 3 MA, 4 optic disc (codecs.pack_bits).'),
      'has_mask': tfds.features.Tensor(shape=(4,), dtype=np.bool_,
                                       doc='Whether the EX, HE, SE, MA mask files exist.'),
      'height': tfds.features.Scalar(dtype=np.int32),
      'width': tfds.features.Scalar(dtype=np.int32),
  }
  if optic_disc:
    spec['has_optic_disc'] = tfds.features.Scalar(dtype=np.bool_)
  return tfds.features.FeaturesDict(spec)


def make_example(stem, image_path, mask_paths, optic_disc_path=None):
  """Reads one image and its masks into a feature dict.

  Args:
    stem: the example id.
    image_path: the JPEG.
    mask_paths: the EX, HE, SE, MA mask files in that order; a missing file means an empty mask.
    optic_disc_path: the optic disc mask (IDRiD), or None for datasets without one.

  Returns:
    the feature dict of `features(optic_disc=optic_disc_path is not None)`.
  """
  data, size = codecs.read_jpeg(image_path)
  paths = list(mask_paths) + ([optic_disc_path] if optic_disc_path is not None else [])
  exists = [epath.Path(p).exists() for p in paths]
  masks = [codecs.read_mask(p, size, image_path) if e else np.zeros(size, bool)
           for p, e in zip(paths, exists)]
  example = {
      'id': stem,
      'image': data,
      'mask_bits': codecs.pack_bits(masks),
      'has_mask': np.array(exists[:4]),
      'height': size[0],
      'width': size[1],
  }
  if optic_disc_path is not None:
    example['has_optic_disc'] = exists[4]
  return example


def find_root(manual_dir, marker, expected, required=()):
  """The folder named `marker` that holds the folders `required`: manual_dir or one up to 3 levels down.

  Zips often unpack into a folder of their own name, so "A. Segmentation/A. Segmentation/..." is found
  too. Without a folder that holds all of `required`, the first one named `marker` is returned (the
  caller then names the missing folder).

  Args:
    manual_dir: where the user unpacked the download.
    marker: the top folder of the layout, e.g. 'A. Segmentation'.
    expected: a description of the expected layout for the error message.
    required: subfolders the right `marker` folder has, e.g. ('1. Original Images',).

  Returns:
    the `marker` folder.
  """
  manual_dir = epath.Path(manual_dir)
  if not manual_dir.is_dir():
    raise FileNotFoundError(f'manual_dir {manual_dir} does not exist. Expected:\n{expected}')
  level, named = [manual_dir], []
  for depth in range(4):  # breadth first: the shallowest match wins
    named += [d for d in level if d.name == marker]
    for candidate in named:
      if all((candidate / r).is_dir() for r in required):
        return candidate
    if depth < 3:
      level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir()]
  if named:
    return named[0]
  found = sorted(p.name for p in manual_dir.iterdir())
  raise FileNotFoundError(
      f'manual_dir {manual_dir} does not hold the expected layout.\nExpected:\n{expected}\n'
      f'Found in {manual_dir}: {found}')


def require_dir(path, expected):
  """Returns `path` if it is a folder, else raises an error showing the expected layout and the parent."""
  path = epath.Path(path)
  if not path.is_dir():
    parent = path.parent
    found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else '(missing)'
    raise FileNotFoundError(f'Expected folder {path} is missing.\nExpected:\n{expected}\n'
                            f'Found in {parent}: {found}')
  return path


def check_masks_have_images(mask_dir, suffix, image_dir, stems):
  """Raises when a mask file in `mask_dir` is misnamed or its image `<stem>.jpg` is missing."""
  for path in sorted(mask_dir.glob('*.tif')):
    if not path.name.endswith(suffix):
      raise ValueError(f'Mask {path} is not named <image stem>{suffix}')
    stem = path.name[:-len(suffix)]
    if stem not in stems:
      raise FileNotFoundError(f'Missing image {image_dir / (stem + ".jpg")} for the mask {path}')
