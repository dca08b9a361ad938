"""predict: files written, overlay colours at lesion pixels, a corrupt input skipped, sliding windows."""
import subprocess
import sys

import cv2
from flax import nnx
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import common
from data_pipelines.lesions import CLASSES
from m2mrf_jax import predict
from m2mrf_jax import visualize
from tests.test_visualize import boundary

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time

# Marker colours and the class each one lights up (EX, HE, SE, MA).
MARKERS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 255)}


class ColourModel(nnx.Module):
  """Per-pixel linear logits on the de-normalised colour: EX on red, HE green, SE blue, MA white."""

  def __init__(self, mean, std):
    self.mean, self.std = jnp.asarray(mean), jnp.asarray(std)
    self.kernel = nnx.Param(jnp.array([[1, -1, -1, 1], [-1, 1, -1, 1], [-1, -1, 1, 1]], jnp.float32) / 20)
    self.bias = nnx.Param(jnp.array([-100, -100, -100, -600], jnp.float32) / 20)

  def __call__(self, x):
    return (x * self.std + self.mean) @ self.kernel[...] + self.bias[...]


def marked_image(size, seed):
  """Grey image with one 6x6 block per marker colour; returns (image, {class: block centre})."""
  rng = np.random.default_rng(seed)
  image = np.full((*size, 3), 100, np.uint8)
  centres = {}
  for c, colour in MARKERS.items():
    y = int(rng.integers(0, size[0] - 6))
    x = (c * size[1]) // 4 + 1
    image[y:y + 6, x:x + 6] = colour
    centres[c] = (y + 3, x + 3)
  return image, centres


def data_config(img_scale):
  data = common.data_config('idrid')
  data.img_scale = img_scale
  return data


def test_window_starts_as_mmseg_slide_inference():
  for length, window, stride in [(100, 30, 20), (64, 64, 32), (50, 80, 10), (97, 32, 32), (10, 4, 3)]:
    crop = min(window, length)
    grids = max(length - crop + stride - 1, 0) // stride + 1
    expected = sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(grids)})
    assert predict.window_starts(length, window, stride) == expected
    covered = np.zeros(length, bool)
    for start in expected:
      covered[start:start + crop] = True
    assert covered.all()
  with pytest.raises(ValueError, match='stride 5 is larger than the window 4'):
    predict.window_starts(10, 4, 5)
  assert predict.window_starts(10, 64, 32) == [0]  # an image smaller than the window: one window


def test_sliding_window_equals_whole_image():
  data = data_config((36, 24))  # a 24 x 36 image is already at the test scale
  model = ColourModel(data.mean, data.std)
  image, _ = marked_image((24, 36), 0)
  predictor = predict.Predictor(model, data)
  whole = predictor.whole([image])[0]
  np.testing.assert_allclose(predictor.sliding(image, (24, 36), (24, 36)), whole, atol=1e-6)
  # The model is per pixel: overlapping windows average equal logits, anything else would show.
  np.testing.assert_allclose(predictor.sliding(image, (10, 16), (7, 9)), whole, atol=1e-6)
  np.testing.assert_allclose(predictor.sliding(image, (64, 64), (32, 32)), whole, atol=1e-6)
  logits = (image.astype(np.float64) @ np.asarray(model.kernel[...]) + np.asarray(model.bias[...]))
  np.testing.assert_allclose(whole, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_run_writes_maps_masks_overlays_and_skips_a_corrupt_file(tmp_path, capsys):
  data = data_config((96, 64))  # the 32 x 48 images are upscaled x2 for inference
  model = ColourModel(data.mean, data.std)
  inputs, centres = [], {}
  for name, size, seed in [('a.png', (32, 48), 1), ('b.jpg', (32, 48), 2), ('c.tif', (40, 44), 3)]:
    image, centres[name.split('.')[0]] = marked_image(size, seed)
    Image.fromarray(image).save(tmp_path / name, **({'quality': 100} if name.endswith('jpg') else {}))
    inputs.append(str(tmp_path / name))
  (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg at all')
  inputs.insert(1, str(tmp_path / 'bad.jpg'))
  out = tmp_path / 'out'
  failed = predict.run(model, data, inputs, out, batch_size=2)
  assert failed == [str(tmp_path / 'bad.jpg')]
  assert 'bad.jpg' in capsys.readouterr().err
  assert not list(out.glob('bad_*'))
  for stem, marks in centres.items():
    overlay = np.asarray(Image.open(out / f'{stem}_overlay.png'))
    source = np.asarray(Image.open(next(tmp_path.glob(f'{stem}.*'))).convert('RGB'))
    assert overlay.shape == source.shape
    for c, (y, x) in marks.items():
      with Image.open(out / f'{stem}_prob_{CLASSES[c]}.png') as png:
        assert png.mode.startswith('I;16') and png.size == (source.shape[1], source.shape[0])
        prob = np.asarray(png, np.float64) / 65535
      mask = np.asarray(Image.open(out / f'{stem}_mask_{CLASSES[c]}.png'))
      assert prob[y, x] > 0.99 and prob[2, 2] < 0.01  # lesion block vs grey background
      np.testing.assert_array_equal(mask > 0, prob > 0.5)
      edge = boundary(mask > 0)  # the block's outline in the class colour, its inside as the photograph
      assert edge.sum() >= 8 and not edge[y, x]
      np.testing.assert_array_equal(overlay[edge], np.broadcast_to(visualize.COLORS[c], (edge.sum(), 3)))
      np.testing.assert_array_equal(overlay[y, x], source[y, x])
    np.testing.assert_array_equal(overlay[2, 2], [100, 100, 100])  # background keeps the image


def test_overlay_paints_later_classes_on_top():
  image = np.zeros((2, 2, 3), np.uint8)
  masks = np.zeros((2, 2, 4), bool)
  masks[0, 0] = [True, True, False, False]  # EX + HE -> HE green
  masks[0, 1] = [True, False, True, True]  # -> MA blue
  masks[1, 0, 2] = True  # SE yellow
  out = visualize.overlay(image, masks, 'fill', alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [64, 128, 0])  # red at 0.5, then green at 0.5 on top
  np.testing.assert_array_equal(out[0, 1], [96, 64, 128])  # red, yellow, then blue
  np.testing.assert_array_equal(out[1, 0], [128, 128, 0])
  np.testing.assert_array_equal(out[1, 1], [0, 0, 0])


@pytest.mark.slow
def test_cli_rejects_an_empty_checkpoint(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.predict', '--config=configs/idrid_c.py', '--checkpoint=',
       f'--output={tmp_path}', 'x.png'], capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': ''})
  assert result.returncode != 0
  assert '--checkpoint is required' in result.stderr


class RampModel(nnx.Module):
  """Logits that depend on the position inside the input (a ramp), so windows disagree where they overlap."""

  def __call__(self, x):
    n, h, w, _ = x.shape
    ramp = jnp.arange(h)[:, None, None] * 0.1 - jnp.arange(w)[None, :, None] * 0.05 + jnp.arange(4) * 0.2
    return jnp.broadcast_to(ramp, (n, h, w, 4)) + x[..., :1]


def test_sliding_window_averages_logits_of_overlapping_windows():
  data = data_config((36, 24))
  image = np.random.default_rng(5).integers(0, 255, (23, 30, 3), dtype=np.uint8)
  window, stride = (10, 12), (6, 7)
  got = predict.Predictor(RampModel(), data, batch_size=3).sliding(image, window, stride)
  x = (image[..., :1].astype(np.float64) - data.mean[0]) / data.std[0]
  total, hits = np.zeros((23, 30, 4)), np.zeros((23, 30, 1))
  for y in range(0, 23, stride[0]):  # mmseg: starts i * stride, the last window moved inside
    for x0 in range(0, 30, stride[1]):
      y1, x1 = min(y, 23 - window[0]), min(x0, 30 - window[1])
      ys, xs = np.arange(window[0])[:, None, None], np.arange(window[1])[None, :, None]
      ramp = ys * 0.1 - xs * 0.05 + np.arange(4) * 0.2
      total[y1:y1 + window[0], x1:x1 + window[1]] += ramp + x[y1:y1 + window[0], x1:x1 + window[1]]
      hits[y1:y1 + window[0], x1:x1 + window[1]] += 1
      if x0 + window[1] >= 30:
        break
    if y + window[0] >= 23:
      break
  np.testing.assert_allclose(got, 1 / (1 + np.exp(-total / hits)), atol=1e-5)


def test_read_image_is_mmcv_imread(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / 'a.jpg', quality=90)
  Image.fromarray(rng.integers(0, 65536, (20, 30), np.uint16)).save(tmp_path / 'b.png')  # 16-bit grey
  for name in ('a.jpg', 'b.png'):
    # mmcv.imread(path, 'color') = cv2.imread(IMREAD_COLOR), BGR; ours is RGB.
    expected = cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(predict.read_image(tmp_path / name), expected)
  with pytest.raises(ValueError, match='missing.png'):
    predict.read_image(tmp_path / 'missing.png')
