"""Synthetic downloads laid out and encoded like the real IDRiD and DDR ones, for tests and the demo.

Images are `skimage.data.retina()` (a CC0 fundus photograph) resized into a black frame, with tiny
lesions drawn on top: microaneurysms of a few pixels up to haemorrhages of a few hundred. A haemorrhage
and a microaneurysm overlap in every image, so the exclusive merge has something to decide.
"""
import functools
import io

from etils import epath
import numpy as np
from PIL import Image
import skimage.data

from data_pipelines.ddr import ddr_dataset_builder as ddr
from data_pipelines.idrid import idrid_dataset_builder as idrid

SPLITS = {'idrid': tuple(idrid.SPLITS), 'ddr': tuple(ddr.SPLITS)}

# lesion: (min count, max count, min radius, max radius, RGB colour); radii in pixels.
_LESIONS = {
    'EX': (2, 5, 1.5, 6.0, (235, 205, 90)),
    'HE': (1, 4, 2.0, 8.0, (90, 15, 10)),
    'SE': (1, 2, 3.0, 9.0, (215, 200, 160)),
    'MA': (2, 6, 0.8, 1.8, (110, 20, 15)),
}
_DRAW_ORDER = ('EX', 'SE', 'HE', 'MA')


@functools.lru_cache(maxsize=4)
def _background(height, width):
  """The fundus photograph resized to a (side, side) disc centred in a black (height, width) frame."""
  side = min(height, width)
  retina = Image.fromarray(skimage.data.retina()).resize((side, side), Image.Resampling.BILINEAR)
  frame = np.zeros((height, width, 3), np.uint8)
  top, left = (height - side) // 2, (width - side) // 2
  frame[top:top + side, left:left + side] = np.asarray(retina)
  return frame


def _ellipse(mask, center, radii, angle):
  """Sets the pixels of a rotated ellipse in the bool (H, W) `mask`, in place."""
  extent = int(np.ceil(max(radii))) + 1
  y0, x0 = max(int(center[0]) - extent, 0), max(int(center[1]) - extent, 0)
  y1, x1 = min(int(center[0]) + extent + 1, mask.shape[0]), min(int(center[1]) + extent + 1, mask.shape[1])
  yy, xx = np.mgrid[y0:y1, x0:x1]
  dy, dx = yy - center[0], xx - center[1]
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  mask[y0:y1, x0:x1] |= (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1


def make_example(rng, size, with_soft_exudates):
  """One synthetic fundus image and its masks.

  Args:
    rng: `np.random.Generator`.
    size: (h, w).
    with_soft_exudates: whether SE lesions are drawn (IDRiD has no SE mask for about half the images).

  Returns:
    (uint8 (h, w, 3) image, {'EX', 'HE', 'SE', 'MA', 'OD'} -> bool (h, w) masks).
  """
  h, w = size
  side = min(h, w)
  gain = rng.uniform(0.85, 1.15)
  image = np.clip(_background(h, w).astype(np.float32) * gain, 0, 255)
  masks = {name: np.zeros((h, w), bool) for name in list(_LESIONS) + ['OD']}
  centre = np.array([h / 2, w / 2])
  _ellipse(masks['OD'], centre + [0, side * 0.22], (side / 14, side / 16), 0.0)
  centres = {}
  for name, (lo, hi, r_lo, r_hi, _) in _LESIONS.items():
    count = rng.integers(lo, hi + 1) if name != 'SE' or with_soft_exudates else 0
    radius = rng.uniform(0, side * 0.38, count)
    theta = rng.uniform(0, 2 * np.pi, count)
    centres[name] = centre + np.stack([radius * np.sin(theta), radius * np.cos(theta)], -1)
  centres['MA'][0] = centres['HE'][0]
  for name in _DRAW_ORDER:
    lo, hi, r_lo, r_hi, _ = _LESIONS[name]
    for c in centres[name]:
      _ellipse(masks[name], c, rng.uniform(r_lo, r_hi, 2), rng.uniform(0, np.pi))
  for name in ['OD'] + list(_DRAW_ORDER):
    colour = np.array(_LESIONS[name][4] if name != 'OD' else (250, 230, 180), np.float32)
    image[masks[name]] = 0.25 * image[masks[name]] + 0.75 * colour
  return image.astype(np.uint8), masks


def dotted_jpeg(size=(2848, 4288), num_dots=400, radii=(2.0, 5.0), seed=0, quality=95):
  """A fundus JPEG with tiny bright and dark discs, microaneurysm-like, to test the input resize.

  Args:
    size: (h, w); the default is IDRiD's.
    num_dots: discs, alternately dark (x0.35) and bright (2/3 of the way to white), inside the fundus.
    radii: (min, max) disc radius in pixels.
    seed: the random seed.
    quality: JPEG quality.

  Returns:
    (JPEG bytes, float (num_dots, 4) of centre y, centre x, radius, +1 bright / -1 dark).
  """
  rng = np.random.default_rng(seed)
  h, w = size
  image = _background(h, w).astype(np.float32)
  radius = rng.uniform(0, min(h, w) * 0.4, num_dots)
  theta = rng.uniform(0, 2 * np.pi, num_dots)
  dots = np.stack([h / 2 + radius * np.sin(theta), w / 2 + radius * np.cos(theta),
                   rng.uniform(*radii, num_dots), np.where(np.arange(num_dots) % 2, 1.0, -1.0)], -1)
  for y, x, r, sign in dots:
    top, left = int(y) - 6, int(x) - 6
    patch = image[top:top + 13, left:left + 13]
    mask = np.zeros(patch.shape[:2], bool)
    _ellipse(mask, (y - top, x - left), (r, r), 0.0)
    patch[mask] = patch[mask] * 0.35 if sign < 0 else patch[mask] + (255 - patch[mask]) * (2 / 3)
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue(), dots


def _save_jpeg(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, format='JPEG', quality=90)


def _save_tiff(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format='TIFF', compression='tiff_lzw')


def _write_idrid(root, num_images, image_size, seed):
  top = root / idrid.TOP
  number = 0
  for split_index, (split, folder) in enumerate(idrid.SPLITS.items()):
    for i in range(num_images.get(split, 0)):
      number += 1
      stem = f'IDRiD_{number:02d}'
      rng = np.random.default_rng([seed, split_index, i])
      image, masks = make_example(rng, image_size, with_soft_exudates=i % 2 == 0)
      _save_jpeg(top / idrid.IMAGES / folder / f'{stem}.jpg', image)
      for name, suffix in idrid.LESION_FOLDERS + (idrid.OPTIC_DISC_FOLDER,):
        if not masks[suffix].any():
          continue  # as the real download: no file when the image has no such lesion
        red = np.zeros(image_size + (3,), np.uint8)
        red[..., 0] = masks[suffix] * np.uint8(255)
        _save_tiff(top / idrid.GROUNDTRUTHS / folder / name / f'{stem}_{suffix}.tif', red)


def _write_ddr(root, num_images, image_size, seed):
  top = root / 'DDR-dataset' / ddr.TOP
  for split_index, (split, folder) in enumerate(ddr.SPLITS.items()):
    mask_folder = 'segmentation label' if folder == 'valid' else 'label'
    for i in range(num_images.get(split, 0)):
      rng = np.random.default_rng([seed, split_index, i])
      # The names and sizes of several cameras.
      stem = (f'{split_index:03d}-{rng.integers(1000, 9999)}-{100 + i}' if i % 2 == 0
              else f'2017032309{rng.integers(10**6, 10**7)}{i}')
      size = image_size if i % 2 == 0 else (image_size[0] * 7 // 8, image_size[1] * 7 // 8)
      image, masks = make_example(rng, size, with_soft_exudates=i % 3 != 1)
      _save_jpeg(top / folder / 'image' / f'{stem}.jpg', image)
      for lesion in ('EX', 'HE', 'MA', 'SE'):
        _save_tiff(top / folder / mask_folder / lesion / f'{stem}.tif', masks[lesion] * np.uint8(255))


def check_splits(name, num_images, splits):
  """Raises ValueError unless `name` is in `splits` (dataset -> split names) and has every split asked."""
  if name not in splits:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {tuple(splits)}')
  unknown = set(num_images) - set(splits[name])
  if unknown:
    raise ValueError(f'{name} has splits {splits[name]}, not {sorted(unknown)}')


def write_download(name, root, *, num_images, image_size=(160, 240), seed=0):
  """Writes a synthetic download of dataset `name` under `root`, deterministic for `seed`.

  Args:
    name: 'idrid' or 'ddr'.
    root: the folder to write into.
    num_images: split -> number of images (idrid: train, test; ddr: train, validation, test).
    image_size: (h, w) of the images (DDR: every other image is 7/8 of it, as cameras vary).
    seed: the random seed.

  Returns:
    the manual_dir to pass to the builder.
  """
  check_splits(name, num_images, SPLITS)
  root = epath.Path(root)
  image_size = tuple(int(s) for s in image_size)
  writer = _write_idrid if name == 'idrid' else _write_ddr
  writer(root, num_images, image_size, seed)
  return root


def draw_lesions(rng, size, counts, radius_scale=1.0):
  """A synthetic fundus photograph with a given number of lesions of each type (for grading data).

  Args:
    rng: `np.random.Generator`.
    size: (h, w).
    counts: lesion name ('EX', 'HE', 'SE', 'MA') -> how many to draw (absent names: none).
    radius_scale: multiplies the lesion radii of `make_example` (which suit 160x240 images).

  Returns:
    (uint8 (h, w, 3) image, {'EX', 'HE', 'SE', 'MA'} -> bool (h, w) masks).
  """
  h, w = size
  side = min(h, w)
  image = np.clip(_background(h, w).astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255)
  masks = {name: np.zeros((h, w), bool) for name in _LESIONS}
  centre = np.array([h / 2, w / 2])
  for name in _DRAW_ORDER:
    _, _, r_lo, r_hi, colour = _LESIONS[name]
    count = int(counts.get(name, 0))
    radius = rng.uniform(0, side * 0.38, count)
    theta = rng.uniform(0, 2 * np.pi, count)
    for c in centre + np.stack([radius * np.sin(theta), radius * np.cos(theta)], -1):
      _ellipse(masks[name], c, rng.uniform(r_lo, r_hi, 2) * radius_scale, rng.uniform(0, np.pi))
    image[masks[name]] = 0.25 * image[masks[name]] + 0.75 * np.array(colour, np.float32)
  return image.astype(np.uint8), masks
