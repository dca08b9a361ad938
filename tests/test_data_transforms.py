"""The pure transforms against independent statements: NumPy, PyTorch, colorsys, the mmcv formulas."""
import colorsys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines import transforms


class ScriptedRng:
  """Replays given draws for `integers` and `uniform`, in call order."""

  def __init__(self, draws):
    self._draws = list(draws)

  def _next(self):
    return self._draws.pop(0)

  def integers(self, *args):
    del args
    return self._next()

  def uniform(self, *args):
    del args
    return self._next()


def _mmcv_size(h, w, img_scale, ratio):
  # mmseg Resize._random_sample_ratio + mmcv.rescale_size, written out.
  scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def test_rescale_size_official_examples():
  assert transforms.rescale_size((2848, 4288), (1440, 960)) == (956, 1440)
  assert transforms.rescale_size((4288, 2848), (1440, 960)) == (1440, 956)  # rotated by the dihedral aug
  assert transforms.rescale_size((2848, 4288), (1440, 960), 2.0) == (1913, 2880)
  assert transforms.rescale_size((2848, 4288), (1440, 960), 0.5) == (478, 720)
  assert max(transforms.rescale_size((1880, 2816), (1024, 1024))) == 1024  # DDR: long side 1024


def test_rescale_size_matches_mmcv_formula():
  rng = np.random.default_rng(0)
  for _ in range(300):
    h, w = rng.integers(50, 5000, 2)
    ratio = rng.uniform(0.5, 2.0)
    scale = tuple(rng.permutation([1440, 960]))
    assert transforms.rescale_size((h, w), scale, ratio) == _mmcv_size(h, w, scale, ratio)


def _torch_resize(image, size, antialias):
  x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
  y = F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=antialias)
  return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize('size', [(53, 77), (120, 200), (20, 17), (10, 30)])
def test_resize_linear_is_plain_bilinear_both_ways(size):
  image = np.random.default_rng(1).integers(0, 256, (31, 45, 3), dtype=np.uint8)
  ours = transforms.resize_linear(image, size)
  assert ours.shape == size + (3,) and ours.dtype == np.uint8
  # INTER_LINEAR blends the 2x2 nearest pixels also when shrinking (no low-pass): torch bilinear,
  # align_corners=False, antialias=False, up to OpenCV's 11-bit fixed-point weights and rounding.
  assert np.abs(ours - _torch_resize(image, size, antialias=False)).max() <= 1.0
  # and (the official code calls it) OpenCV itself on a non-contiguous view.
  np.testing.assert_array_equal(transforms.resize_linear(image[:, ::-1], size),
                                cv2.resize(np.ascontiguousarray(image[:, ::-1]), size[::-1],
                                           interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize('size', [(53, 77), (120, 200)])
def test_resize_antialiased_upscale_is_plain_bilinear(size):
  image = np.random.default_rng(1).integers(0, 256, (31, 45, 3), dtype=np.uint8)
  ours = transforms.resize_antialiased(image, size).astype(np.float32)
  assert ours.shape == size + (3,)
  # OpenCV INTER_LINEAR = torch bilinear, align_corners=False, when upscaling (up to uint8 rounding).
  assert np.abs(ours - _torch_resize(image, size, antialias=False)).max() <= 1.0


def test_resize_antialiased_downscale_is_antialiased():
  image = np.random.default_rng(2).integers(0, 256, (120, 170, 3), dtype=np.uint8)
  ours = transforms.resize_antialiased(image, (40, 57)).astype(np.float32)
  # torch's antialias=True is the Pillow triangle filter.
  assert np.abs(ours - _torch_resize(image, (40, 57), antialias=True)).max() <= 1.0


@pytest.mark.parametrize('target', [(70, 100), (200, 290)])
def test_resize_antialiased_box_equals_resize_then_crop(target):
  image = np.random.default_rng(3).integers(0, 256, (97, 141, 3), dtype=np.uint8)
  full = transforms.resize_antialiased(image, target)
  y0, x0, h, w = 13, 21, 40, 55
  sy, sx = 97 / target[0], 141 / target[1]
  window = transforms.resize_antialiased(image, (h, w), (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy))
  # The same filter taps; Pillow's 8-bit fixed-point weights can round a few pixels the other way.
  diff = np.abs(window.astype(int) - full[y0:y0 + h, x0:x0 + w])
  assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize('size', [(20, 33), (97, 301), (7, 5)])
def test_resize_nearest_matches_torch_nearest(size):
  labels = np.random.default_rng(4).integers(0, 16, (41, 67), dtype=np.uint8)
  ours = transforms.resize_nearest(labels, size)
  # torch 'nearest' (legacy) = OpenCV INTER_NEAREST: source floor(i * in / out).
  theirs = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=size, mode='nearest')
  np.testing.assert_array_equal(ours, theirs[0, 0].numpy().astype(np.uint8))
  window = transforms.resize_nearest(labels, size, (size[0] // 3, size[1] // 4, size[0] // 2, size[1] // 2))
  np.testing.assert_array_equal(window, ours[size[0] // 3:size[0] // 3 + size[0] // 2,
                                             size[1] // 4:size[1] // 4 + size[1] // 2])


@pytest.mark.parametrize('size', [(956, 1440), (1913, 2880), (478, 720), (97, 301)])
def test_resize_nearest_matches_opencv(size):
  # mmcv.imrescale(label, interpolation='nearest') is cv2.resize(INTER_NEAREST).
  bits = np.random.default_rng(14).integers(0, 32, (2848 // 4, 4288 // 4), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.resize_nearest(bits, size),
                                cv2.resize(bits, size[::-1], interpolation=cv2.INTER_NEAREST))


def test_rescale_keep_ratio():
  image = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)
  out = transforms.rescale_keep_ratio(image, (48, 40))
  assert out.shape == (32, 48, 3)
  # mmcv.imrescale: the mmcv size, then cv2.resize INTER_LINEAR.
  np.testing.assert_array_equal(out, cv2.resize(image, (48, 32), interpolation=cv2.INTER_LINEAR))


def test_random_crop_box_bounds_and_coverage():
  rng = np.random.default_rng(6)
  offsets = []
  for _ in range(2000):
    y0, x0, h, w = transforms.random_crop_box((13, 20), (10, 15), rng)
    assert (h, w) == (10, 15)
    assert 0 <= y0 <= 3 and 0 <= x0 <= 5
    offsets.append((y0, x0))
  assert {o[0] for o in offsets} == set(range(4)) and {o[1] for o in offsets} == set(range(6))
  # An image smaller than the crop: the whole image along that axis.
  for _ in range(50):
    y0, x0, h, w = transforms.random_crop_box((8, 30), (10, 15), rng)
    assert (y0, h, w) == (0, 8, 15) and 0 <= x0 <= 15


def _by_index(array, shape, source):
  """out[i, j] = array[source(i, j)] for out of `shape`."""
  out = np.empty(shape + array.shape[2:], array.dtype)
  for i in range(shape[0]):
    for j in range(shape[1]):
      out[i, j] = array[source(i, j)]
  return out


def test_dihedral_maps_are_the_six_index_maps_on_image_and_labels():
  rng = np.random.default_rng(7)
  h, w = 5, 8
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (h, w, 4), dtype=np.uint8)
  statements = {  # k: (output shape, source pixel of output pixel (i, j))
      0: ((h, w), lambda i, j: (i, j)),
      1: ((w, h), lambda i, j: (j, w - 1 - i)),  # rot90 counter-clockwise
      2: ((h, w), lambda i, j: (h - 1 - i, w - 1 - j)),
      3: ((w, h), lambda i, j: (h - 1 - j, i)),
      4: ((h, w), lambda i, j: (i, w - 1 - j)),  # horizontal flip
      5: ((h, w), lambda i, j: (h - 1 - i, j)),  # vertical flip
  }
  for k, (shape, source) in statements.items():
    np.testing.assert_array_equal(transforms.dihedral(image, k), _by_index(image, shape, source))
    np.testing.assert_array_equal(transforms.dihedral(labels, k), _by_index(labels, shape, source))
    assert transforms.dihedral_size((h, w), k) == shape


def test_dihedral_copy_equals_dihedral():
  image = np.random.default_rng(15).integers(0, 256, (7, 12, 3), dtype=np.uint8)
  for k in range(6):
    out = transforms.dihedral_copy(image, k)
    np.testing.assert_array_equal(out, transforms.dihedral(image, k))
    assert out.flags.c_contiguous


def test_dihedral_window_maps_a_crop_back():
  rng = np.random.default_rng(13)
  array = rng.integers(0, 256, (9, 14, 2))
  for k in range(6):
    mapped = transforms.dihedral(array, k)
    for _ in range(20):
      h, w = rng.integers(1, mapped.shape[0] + 1), rng.integers(1, mapped.shape[1] + 1)
      y0, x0 = rng.integers(0, mapped.shape[0] - h + 1), rng.integers(0, mapped.shape[1] - w + 1)
      wy, wx, wh, ww = transforms.dihedral_window((y0, x0, h, w), array.shape[:2], k)
      np.testing.assert_array_equal(transforms.dihedral(array[wy:wy + wh, wx:wx + ww], k),
                                    mapped[y0:y0 + h, x0:x0 + w])


def test_rgb_to_hsv_matches_colorsys():
  rgb = np.random.default_rng(8).integers(0, 256, (2000, 3), dtype=np.uint8)
  ours = transforms.rgb_to_hsv(rgb[None])[0].astype(np.int64)
  for (r, g, b), (h, s, v) in zip(rgb, ours):
    eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    assert v == max(r, g, b)
    # Half a step of 8-bit rounding, plus cv2's 12-bit fixed-point reciprocals (each off by up to 1/2
    # unit in 4096, times a numerator of up to diff for S and 6 diff for H).
    diff = int(max(r, g, b)) - int(min(r, g, b))
    assert abs(s - es * 255) <= 0.5 + diff * 0.5 / 4096 + 1e-9
    assert min(abs(h - eh * 180), 180 - abs(h - eh * 180)) <= 0.5 + 6 * diff * 0.5 / 4096 + 1e-9


def test_hsv_to_rgb_matches_colorsys():
  rng = np.random.default_rng(9)
  hsv = np.stack([rng.integers(0, 180, 2000), rng.integers(0, 256, 2000), rng.integers(0, 256, 2000)],
                 -1).astype(np.uint8)
  ours = transforms.hsv_to_rgb(hsv[None])[0].astype(np.float64)
  for (h, s, v), rgb in zip(hsv, ours):
    expected = np.array(colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)) * 255
    # OpenCV's 8-bit HSV2RGB (mmcv.hsv2bgr) is within 1 level of exact, not 1/2 (1.0 over all inputs).
    assert np.abs(rgb - expected).max() <= 1.0 + 1e-3


def test_photometric_single_ops_match_statements():
  rng = np.random.default_rng(10)
  image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  f = image.astype(np.float32)
  # Draws: brightness flag [beta], mode, (mode 1: contrast flag [alpha]), saturation flag [alpha],
  # hue flag [delta], (mode 0: contrast flag [alpha]).
  brightness = transforms.photometric_distortion(image, ScriptedRng([1, 20.7, 0, 0, 0, 0]))
  np.testing.assert_array_equal(brightness, np.clip(f + 20.7, 0, 255).astype(np.uint8))
  contrast = transforms.photometric_distortion(image, ScriptedRng([0, 1, 1, 1.3, 0, 0]))
  np.testing.assert_array_equal(contrast, np.clip(f * 1.3, 0, 255).astype(np.uint8))
  hue = transforms.photometric_distortion(image, ScriptedRng([0, 0, 0, 1, 10, 0]))
  saturation = transforms.photometric_distortion(image, ScriptedRng([0, 0, 1, 0.6, 0, 0]))
  for (r, g, b), hue_out, sat_out in zip(image.reshape(-1, 3), hue.reshape(-1, 3),
                                         saturation.reshape(-1, 3)):
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    # +10 in 8-bit HSV is +20 degrees. Bounds of the 8-bit round trip: the hue rounds to 2 degrees
    # (1 degree moves a channel by up to 255 v s / 60), the saturation to 1/255 (truncated after the
    # scale: up to 1.3/255, moving a channel by 1.3 v), the output to 0.5.
    hue_step = 255 * v * s / 60
    expected_hue = np.array(colorsys.hsv_to_rgb((h + 20 / 360) % 1, s, v)) * 255
    assert np.abs(hue_out - expected_hue).max() <= hue_step + 0.5 * v + 0.5 + 1e-3
    expected_sat = np.array(colorsys.hsv_to_rgb(h, s * 0.6, v)) * 255
    assert np.abs(sat_out - expected_sat).max() <= 0.6 * hue_step + 1.3 * v + 0.5 + 1e-3


def test_photometric_contrast_position_follows_mode():
  image = np.random.default_rng(11).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  hue_then = lambda x: transforms.hsv_to_rgb(_shift_hue(transforms.rgb_to_hsv(x), 7))
  contrast = lambda x: np.clip(x.astype(np.float32) * 1.4, 0, 255).astype(np.uint8)
  mode0 = transforms.photometric_distortion(image, ScriptedRng([0, 0, 0, 1, 7, 1, 1.4]))
  mode1 = transforms.photometric_distortion(image, ScriptedRng([0, 1, 1, 1.4, 0, 1, 7]))
  np.testing.assert_array_equal(mode0, contrast(hue_then(image)))
  np.testing.assert_array_equal(mode1, hue_then(contrast(image)))
  assert not np.array_equal(mode0, mode1)


def _shift_hue(hsv, delta):
  out = hsv.copy()
  out[..., 0] = (hsv[..., 0].astype(int) + delta) % 180
  return out


def test_normalize_and_pad():
  image = np.random.default_rng(12).integers(0, 256, (6, 9, 3), dtype=np.uint8)
  mean, std = (116.513, 56.437, 16.309), (80.206, 41.232, 13.293)
  out = transforms.normalize(image, mean, std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (image - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
  # mmseg Normalize(to_rgb=True) on the BGR image: mmcv.imnormalize_ as written in mmcv 1.2.
  official = image[..., ::-1].astype(np.float32)
  cv2.cvtColor(official, cv2.COLOR_BGR2RGB, official)
  cv2.subtract(official, np.float64(np.array(mean, np.float32).reshape(1, -1)), official)
  cv2.multiply(official, 1 / np.float64(np.array(std, np.float32).reshape(1, -1)), official)
  np.testing.assert_array_equal(out, official)
  padded = transforms.pad_to(out, (10, 12))
  assert padded.shape == (10, 12, 3)
  np.testing.assert_array_equal(padded[:6, :9], out)
  assert not padded[6:].any() and not padded[:, 9:].any()
  with pytest.raises(ValueError, match='Cannot pad'):
    transforms.pad_to(out, (5, 12))


def test_normalize_of_an_image_one_pixel_wide_is_right_or_refused():
  # OpenCV 5.1 broadcasts the (1, 3) mean against a (H, 1, 3) image into a new (H, 3, 3) array and
  # leaves the image as it was; 5.0 subtracts per channel in place.
  image = np.random.default_rng(13).integers(0, 256, (4, 1, 3), dtype=np.uint8)
  mean, std = (116.513, 56.437, 16.309), (80.206, 41.232, 13.293)
  try:
    out = transforms.normalize(image, mean, std)
  except ValueError as e:
    assert f'OpenCV {cv2.__version__} cannot normalise an image of shape (4, 1, 3)' in str(e)
    return
  np.testing.assert_allclose(out, (image - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mean,std', [((116.513, 56.437, 16.309), (80.206, 41.232, 13.293)),  # IDRiD
                                      ((81.205, 50.636, 21.216), (76.252, 48.798, 21.625)),  # DDR
                                      ((0.5, 254.25, 100.0), (0.7, 3.0, 99.9))])
def test_normalize_padded_on_device_is_normalize_and_pad_bit_for_bit(mean, std):
  # Every uint8 value in every channel (the map is elementwise), three crops, two of them padded.
  import jax  # pylint: disable=g-import-not-at-top
  values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1) * np.ones(3, np.uint8)
  image_size = np.array([(16, 16), (9, 16), (16, 5)], np.int32)
  pixels = np.stack([transforms.pad_to(values[:h, :w], (16, 16)) for h, w in image_size])
  table = transforms.normalize_table(mean, std)
  np.testing.assert_allclose(table, (np.arange(256) - np.array(mean)[:, None]) / np.array(std)[:, None],
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(transforms.normalize_padded)(pixels, image_size, table)
  expected = np.stack([transforms.pad_to(transforms.normalize(values[:h, :w], mean, std), (16, 16))
                       for h, w in image_size])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), expected.view(np.uint32))


def test_exclusive_merge_priority_and_multilabel():
  bits = np.arange(32, dtype=np.uint8).reshape(4, 8)  # every combination, with the optic disc bit
  masks = [(bits >> c & 1).astype(bool) for c in range(4)]
  # The official prepare_labels.py: write EX, HE, SE, MA in turn into one label map, then one-hot 1..4.
  label_map = np.zeros(bits.shape, np.uint8)
  for c, mask in enumerate(masks):
    label_map[mask] = c + 1
  expected = (label_map[..., None] == np.arange(1, 5)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.labels_from_bits(bits, 'exclusive'), expected)
  np.testing.assert_array_equal(transforms.labels_from_bits(bits, 'multilabel'),
                                np.stack(masks, -1).astype(np.uint8))
  with pytest.raises(ValueError, match='label_mode'):
    transforms.labels_from_bits(bits, 'softmax')
