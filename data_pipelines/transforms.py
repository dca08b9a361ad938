"""Pure transforms of the official mmseg 0.8 pipelines, on NumPy arrays (H, W, C) in RGB.

Interpolation as mmcv 1.2: images with OpenCV's INTER_LINEAR (`resize_linear`, cv2.resize itself: it
blends the 2x2 nearest pixels and does not low-pass when shrinking), masks with INTER_NEAREST
(`resize_nearest`, source index floor(i * src / dst), equal to cv2's, computed only for a window).
`resize_antialiased` (Pillow BILINEAR, a triangle filter widened when shrinking) is the opt-in fast path
(`data.reduced_decode`), not the official one. Colour conversions are cv2.cvtColor, as mmcv's.
`normalize_padded` is the one jnp transform: Normalize and Pad of a training batch, inside the jitted step.
"""
import cv2
import jax.numpy as jnp
import numpy as np
from PIL import Image

from data_pipelines.lesions import CLASSES

NUM_CLASSES = len(CLASSES)

# Dihedral maps of the official offline augmentation (tools/augment.py); rot90 is counter-clockwise.
DIHEDRAL_NAMES = ('identity', 'rot90', 'rot180', 'rot270', 'hflip', 'vflip')


def rescale_size(size, img_scale, ratio=1.0):
  """Output (h, w) of mmcv's keep-ratio rescale into the box `img_scale` scaled by `ratio`.

  As mmseg Resize(ratio_range) + mmcv.imrescale: box = (int(long * ratio), int(short * ratio)),
  factor = min(max(box) / max(h, w), min(box) / min(h, w)), size = int(x * factor + 0.5).

  Args:
    size: (h, w) of the input.
    img_scale: the box, (long, short) in either order, e.g. (1440, 960).
    ratio: the random ratio of the training pipeline.

  Returns:
    (h, w) after the rescale: 4288x2848 into (1440, 960) -> (956, 1440).
  """
  box = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
  h, w = size
  factor = min(max(box) / max(h, w), min(box) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_linear(image, size):
  """mmcv.imresize(image, (w, h), 'bilinear') = cv2.resize(INTER_LINEAR): uint8 (H, W, C) -> (h, w, C)."""
  return cv2.resize(np.ascontiguousarray(image), (int(size[1]), int(size[0])),
                    interpolation=cv2.INTER_LINEAR)


def resize_antialiased(image, size, box=None):
  """Pillow BILINEAR resize (antialiased when shrinking; opt-in path) of uint8 (H, W, 3) to (h, w).

  Args:
    image: uint8 (H, W, 3) array or an RGB `PIL.Image.Image`.
    size: (h, w) of the output.
    box: (x0, y0, x1, y1) float region of the source mapped onto the output; None = the whole image.
      Resizing the whole image to (H', W') and cropping [y, y + h) x [x, x + w) equals resizing the box
      (x, y, x + w, y + h) * (W / W', H / H') to (h, w): pixels outside the box still contribute.

  Returns:
    uint8 (h, w, 3).
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  out = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
  return np.asarray(out)


def nearest_indices(src, dst, start=0, count=None):
  """Source indices of OpenCV INTER_NEAREST for output positions start .. start + count - 1."""
  count = dst - start if count is None else count
  inverse = 1.0 / (dst / src)
  index = np.floor(np.arange(start, start + count) * inverse).astype(np.int64)
  return np.minimum(index, src - 1)


def resize_nearest(array, size, window=None):
  """Nearest resize (OpenCV INTER_NEAREST) of (H, W, ...) to (h, w), or only a window of the result.

  Args:
    array: (H, W, ...) array, any dtype (also a strided view).
    size: (h, w) of the full resized array.
    window: (y0, x0, hc, wc) of the resized array to compute; None = all of it.

  Returns:
    (hc, wc, ...) equal to the full nearest resize cropped to the window.
  """
  y0, x0, hc, wc = window if window is not None else (0, 0) + tuple(size)
  rows = nearest_indices(array.shape[0], size[0], y0, hc)
  cols = nearest_indices(array.shape[1], size[1], x0, wc)
  return array[rows[:, None], cols[None, :]]


def rescale_keep_ratio(image, img_scale):
  """The test-time resize, mmcv.imrescale: uint8 (H, W, 3) -> (h', w', 3) keep-ratio into `img_scale`."""
  return resize_linear(image, rescale_size(image.shape[:2], img_scale))


def random_crop_box(size, crop_size, rng):
  """mmseg RandomCrop's box (without cat_max_ratio): (y0, x0, h, w) of a crop of `crop_size` (h, w).

  The offsets are uniform over [0, max(H - ch, 0)] and [0, max(W - cw, 0)]; the crop is clipped to the
  image when the image is smaller.
  """
  margin_h, margin_w = max(size[0] - crop_size[0], 0), max(size[1] - crop_size[1], 0)
  y0 = int(rng.integers(0, margin_h + 1))
  x0 = int(rng.integers(0, margin_w + 1))
  return y0, x0, min(crop_size[0], size[0]), min(crop_size[1], size[1])


def dihedral(array, k):
  """Map k of the six-fold dihedral augmentation (DIHEDRAL_NAMES) on (H, W, ...); a view, not a copy."""
  return (array, np.rot90(array, 1), np.rot90(array, 2), np.rot90(array, 3), array[:, ::-1],
          array[::-1])[k]


# cv2 codes of the maps 1..5 (cv2.rotate for rotations, cv2.flip for the rest); None = identity.
_CV2_DIHEDRAL = (None, (cv2.rotate, cv2.ROTATE_90_COUNTERCLOCKWISE), (cv2.rotate, cv2.ROTATE_180),
                 (cv2.rotate, cv2.ROTATE_90_CLOCKWISE), (cv2.flip, 1), (cv2.flip, 0))


def dihedral_copy(image, k):
  """`dihedral(image, k)` as a C-contiguous array, by OpenCV: 10x faster than NumPy on 12 MP (H, W, 3)."""
  if _CV2_DIHEDRAL[k] is None:
    return image
  fn, code = _CV2_DIHEDRAL[k]
  return fn(image, code)


def dihedral_size(size, k):
  """(h, w) after dihedral map k."""
  return (size[1], size[0]) if k in (1, 3) else tuple(size)


def dihedral_window(window, size, k):
  """The window of an (h, w) = `size` array that dihedral map k takes onto `window` of its result.

  Args:
    window: (y0, x0, h, w) in the mapped array.
    size: (h, w) of the array before the map.
    k: the dihedral map.

  Returns:
    (y0, x0, h, w) in the array before the map: dihedral(a, k)[window] == dihedral(a[result], k).
  """
  y0, x0, h, w = window
  rows, cols = size
  return ((y0, x0, h, w), (x0, cols - y0 - h, w, h), (rows - y0 - h, cols - x0 - w, h, w),
          (rows - x0 - w, y0, w, h), (y0, cols - x0 - w, h, w), (rows - y0 - h, x0, h, w))[k]


def rgb_to_hsv(image):
  """mmcv.bgr2hsv in RGB order (cv2.cvtColor): uint8 (H, W, 3) -> H in [0, 180), S, V in [0, 255]."""
  return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv):
  """mmcv.hsv2bgr in RGB order (cv2.cvtColor): uint8 (H, W, 3) -> uint8 RGB."""
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _convert(array, alpha=1.0, beta=0.0):
  """mmseg PhotoMetricDistortion.convert: float32 affine map, clip to [0, 255], truncate to uint8."""
  table = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta), 0, 255)
  return cv2.LUT(np.ascontiguousarray(array), table.astype(np.uint8))


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
  """mmseg 0.8 PhotoMetricDistortion with its defaults on uint8 RGB (H, W, 3).

  Order: brightness; contrast here if mode == 1; saturation; hue; contrast here if mode == 0. Each op
  runs with probability 1/2; saturation and hue each round-trip through 8-bit HSV as mmcv does.
  """
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast_range))
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = hsv_to_rgb(hsv)
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
    image = hsv_to_rgb(hsv)
  if mode == 0 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast_range))
  return image


def normalize(image, mean, std):
  """mmcv.imnormalize on RGB: uint8 (H, W, 3) -> float32 (image - mean) / std, bit for bit.

  As mmcv: the float32 image, and the mean and 1 / std of float32 arrays widened to float64, through
  cv2.subtract and cv2.multiply.
  """
  out = image.astype(np.float32)
  mean, std = (np.float64(np.asarray(v, np.float32).reshape(1, -1)) for v in (mean, std))
  if cv2.subtract(out, mean, out) is not out or cv2.multiply(out, 1 / std, out) is not out:
    raise ValueError(f'OpenCV {cv2.__version__} cannot normalise an image of shape {image.shape} in '
                     'place (OpenCV 5.1 broadcasts the mean against an image one pixel wide)')
  return out


def normalize_table(mean, std):
  """`normalize` of every uint8 value in each channel: float32 (3, 256), for `normalize_padded`.

  The values are one row of 256 pixels: OpenCV 5.1 broadcasts a (1, 3) mean against an image one
  pixel wide as NumPy would, into a new (256, 3, 3) array, and leaves the image itself unchanged.
  """
  values = np.arange(256, dtype=np.uint8)[None, :, None] * np.ones(3, np.uint8)  # (1, 256, 3)
  return np.ascontiguousarray(normalize(values, mean, std)[0].T)


def normalize_padded(pixels, image_size, table):
  """On device (jnp, in the jitted step): `pad_to(normalize(crop), ...)` of each crop of a padded batch.

  A lookup in `table` = `normalize_table(mean, std)`, so bit for bit the host's mmcv normalisation on
  every backend (XLA turns a division by a broadcast std into a multiply by 1 / std: up to 1 ulp off
  from cv2), with 0 in the padding as mmseg's Pad.

  Args:
    pixels: uint8 (B, H, W, 3), crop b in [0, h_b) x [0, w_b).
    image_size: int (B, 2), (h_b, w_b) of each crop.
    table: float32 (3, 256).

  Returns:
    float32 (B, H, W, 3).
  """
  image = jnp.asarray(table)[jnp.arange(3), pixels.astype(jnp.int32)]
  rows = jnp.arange(pixels.shape[1])[None, :, None] < image_size[:, 0, None, None]
  cols = jnp.arange(pixels.shape[2])[None, None, :] < image_size[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], image, 0.0)


def pad_to(array, size, value=0):
  """Pads (h, w, ...) at the bottom and right to `size` (H, W) with `value` (mmseg Pad)."""
  if array.shape[0] > size[0] or array.shape[1] > size[1]:
    raise ValueError(f'Cannot pad {array.shape[:2]} to the smaller size {tuple(size)}')
  out = np.full(tuple(size) + array.shape[2:], value, array.dtype)
  out[:array.shape[0], :array.shape[1]] = array
  return out


def _label_tables():
  """256-entry lookup tables from bit flags (bit c = class c) to the 4 targets, packed as uint32."""
  bits = np.arange(256)[:, None] >> np.arange(NUM_CLASSES) & 1
  # The official merge writes EX, HE, SE, MA in turn, so the highest set class wins.
  highest = np.where(bits.any(1), NUM_CLASSES - 1 - np.argmax(bits[:, ::-1], 1), -1)
  tables = {'multilabel': bits, 'exclusive': highest[:, None] == np.arange(NUM_CLASSES)}
  return {mode: np.ascontiguousarray(t, np.uint8).view(np.uint32)[:, 0] for mode, t in tables.items()}


LABEL_TABLES = _label_tables()


def check_label_mode(mode):
  """Returns `mode` if it is a label mode ('exclusive' or 'multilabel'), else raises naming the setting."""
  if mode not in LABEL_TABLES:
    raise ValueError(f'data.label_mode must be one of {tuple(LABEL_TABLES)}, got {mode!r}')
  return mode


def labels_from_bits(bits, mode):
  """Bit flags (..., ) uint8 -> targets (..., 4) uint8 in {0, 1}.

  Args:
    bits: uint8 flags, bit 0 EX, bit 1 HE, bit 2 SE, bit 3 MA (higher bits ignored).
    mode: 'exclusive' (official label map, MA > SE > HE > EX on overlaps, one-hot) or 'multilabel'.
  """
  return LABEL_TABLES[check_label_mode(mode)][bits].view(np.uint8).reshape(bits.shape + (NUM_CLASSES,))
