"""Files in, features out: checked reading of the downloads and the stored encodings.

Stored features (both datasets):
  image      the original JPEG bytes, never re-encoded.
  mask_bits  (H, W) uint8 bit flags, bit 0 EX, bit 1 HE, bit 2 SE, bit 3 MA, bit 4 optic disc, as zlib
             (level 1) of the C-order bytes: lossless, small for sparse masks, and inflated 3x faster
             than the same array as a PNG (16 ms against 48 ms at 4288x2848).
Images are decoded as the official pipeline does (`decode_jpeg`: OpenCV, as mmcv.imfrombytes);
`open_jpeg` is the opt-in reduced-size decode (`data.reduced_decode`). Every reading error names the file.
"""
import io
import zlib

import cv2
from etils import epath
import numpy as np
from PIL import Image

LESIONS = ('EX', 'HE', 'SE', 'MA')  # channel order of every mask and label
OPTIC_DISC_BIT = 4


def read_jpeg(path):
  """Reads a JPEG file and checks that it decodes completely.

  Args:
    path: the image file.

  Returns:
    (bytes of the file, (height, width)).
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'Missing image {path}')
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != 'JPEG':
        raise ValueError(f'the file is {image.format}, not JPEG')
      image.load()
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'Corrupt or unreadable JPEG {path}: {e}') from e
  return data, (height, width)


def read_mask(path, size, image_path=''):
  """Reads a lesion mask TIFF (RGB red on black, or one channel 255 on 0) as a bool (H, W) array.

  A pixel is set where any colour channel is > 0 (IDRiD's red is 76 in grey, so never threshold grey at 127).

  Args:
    path: the mask file.
    size: (height, width) the mask must have: its image's size.
    image_path: the image, named in the size error.

  Returns:
    bool array of shape `size`.
  """
  path = epath.Path(path)
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as mask:
      mask.load()
      if mask.mode in ('P', 'PA', 'LA', 'RGBA', 'CMYK', 'YCbCr'):
        mask = mask.convert('RGB')
      array = np.asarray(mask)
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'Corrupt or unreadable mask {path}: {e}') from e
  if array.shape[:2] != tuple(size):
    raise ValueError(f'Mask {path} is {array.shape[1]}x{array.shape[0]} (WxH) but its image '
                     f'{image_path} is {size[1]}x{size[0]}')
  return array.max(axis=-1) > 0 if array.ndim == 3 else array > 0


def pack_bits(masks):
  """Packs bool (H, W) masks into `mask_bits` bytes, mask i in bit i."""
  bits = np.zeros(masks[0].shape, np.uint8)
  for i, mask in enumerate(masks):
    bits |= mask.astype(np.uint8) << i
  return zlib.compress(bits.tobytes(), 1)


def decode_bits(data, size):
  """`mask_bits` bytes of an image of `size` (H, W) -> (H, W) uint8 bit flags (read-only)."""
  return np.frombuffer(zlib.decompress(data), np.uint8).reshape(size)


def decode_jpeg(data, channel_order='rgb'):
  """JPEG bytes -> uint8 (H, W, 3), as the official mmcv.imfrombytes(flag='color', backend='cv2').

  That is cv2.imdecode(IMREAD_COLOR), which gives BGR (mmseg's Normalize(to_rgb=True) swaps later).
  Unlike mmcv, EXIF orientation is ignored, as it is for the masks, so that a tagged file stays aligned
  with its mask.

  Args:
    data: JPEG bytes.
    channel_order: 'rgb' or 'bgr' (OpenCV's own order, saves a pass over the full image).
  """
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise ValueError('cannot decode the JPEG bytes')
  if channel_order == 'rgb':
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
  if channel_order != 'bgr':
    raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
  return image


def open_jpeg(data, min_size=None):
  """Opens JPEG bytes as an RGB Pillow image, decoded at a reduced scale when allowed (opt-in path).

  Pillow's decode equals `decode_jpeg` where both use the same libjpeg-turbo; the reduced-scale decode
  (JPEG DCT scaling) is not what the official pipeline sees (`data.reduced_decode`).

  Args:
    data: JPEG bytes.
    min_size: (height, width) the decoded image must at least have; JPEG DCT scaling (`draft`) then
      decodes at 1/2, 1/4 or 1/8 of the size when that is still at least `min_size`. None: full size.

  Returns:
    (a loaded RGB `PIL.Image.Image`, the reduction factor 1, 2, 4 or 8): pixel (y, x) of the original
    lies at (y / factor, x / factor) in the decoded image.
  """
  image = Image.open(io.BytesIO(data))
  factor = 1
  if min_size is not None:
    width = image.width
    drafted = image.draft('RGB', (max(int(min_size[1]), 1), max(int(min_size[0]), 1)))
    if drafted is not None:  # (mode, the original image's box in decoded pixels)
      factor = round(width / drafted[1][2])
  image.load()
  return (image if image.mode == 'RGB' else image.convert('RGB')), factor
