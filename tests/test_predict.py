"""predict: files written, overlay colours at lesion pixels, a corrupt input skipped, sliding windows
(mean and Gaussian blending), flip TTA, float16 probabilities, folder and glob inputs, one map at a time."""
import os
import subprocess
import sys
import weakref

import cv2
from flax import nnx
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import stats

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
  (whole,) = predictor.whole([image])
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


@pytest.mark.slow
def test_cli_round_trip_with_a_folder_a_quoted_glob_and_the_new_options(tmp_path):
  """The W18 demo model saved as a checkpoint; predict from the command line with every new flag."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import checkpoints, models  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  checkpoints.save_model(tmp_path / 'ckpt', models.build(config.model, nnx.Rngs(0)), config)
  for folder, name, seed in [('photos', 'a.jpg', 1), ('photos', 'b.png', 2), ('more/deep', 'c.png', 3)]:
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(marked_image((80, 120), seed)[0]).save(tmp_path / folder / name)
  (tmp_path / 'photos' / 'broken.png').write_bytes(b'not a png')
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.predict', '--config=configs/demo.py',
       f'--checkpoint={tmp_path / "ckpt"}', f'--output={tmp_path / "out"}', '--window=64,96',
       '--blend=gaussian', '--tta=flip', '--save_probabilities', '--batch_size=2',
       f'--jit_cache_dir={tmp_path / "jit"}', str(tmp_path / 'photos'), f'{tmp_path}/more/**/*.png'],
      capture_output=True, text=True, timeout=600,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',  # plumbing
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'})
  assert result.returncode == 1, result.stderr  # the broken file
  assert list((tmp_path / 'jit').glob('jit__forward-*'))  # --jit_cache_dir reached JAX
  assert 'broken.png' in result.stderr and '1 of 4 inputs failed' in result.stderr
  for stem in ('a', 'b', 'c'):
    with np.load(tmp_path / 'out' / f'{stem}_probs.npz') as saved:
      assert saved['probabilities'].shape == (80, 120, 4) and saved['probabilities'].dtype == np.float16
    assert (tmp_path / 'out' / f'{stem}_overlay.png').exists()
  assert not list((tmp_path / 'out').glob('broken*'))


class RampModel(nnx.Module):
  """Logits that depend on the position inside the input (a ramp), so windows disagree where they overlap."""

  def __call__(self, x):
    n, h, w, _ = x.shape
    ramp = jnp.arange(h)[:, None, None] * 0.1 - jnp.arange(w)[None, :, None] * 0.05 + jnp.arange(4) * 0.2
    return jnp.broadcast_to(ramp, (n, h, w, 4)) + x[..., :1]


def ramp_windows(image, data, window, stride, weights=None):
  """RampModel's probabilities by sliding windows, written out in NumPy (mmseg's window loop), each
  window's logits weighted by `weights` (window_h, window_w, 1) (default ones: mmseg's mean)."""
  h, w = image.shape[:2]
  weights = np.ones((*window, 1)) if weights is None else weights
  x = (image[..., :1].astype(np.float64) - data.mean[0]) / data.std[0]
  total, norm = np.zeros((h, w, 4)), np.zeros((h, w, 1))
  for y in range(0, h, stride[0]):  # mmseg: starts i * stride, the last window moved inside
    for x0 in range(0, w, stride[1]):
      y1, x1 = min(y, h - window[0]), min(x0, w - window[1])
      ys, xs = np.arange(window[0])[:, None, None], np.arange(window[1])[None, :, None]
      ramp = ys * 0.1 - xs * 0.05 + np.arange(4) * 0.2
      box = np.s_[y1:y1 + window[0], x1:x1 + window[1]]
      total[box] += weights * (ramp + x[box])
      norm[box] += weights
      if x0 + window[1] >= w:
        break
    if y + window[0] >= h:
      break
  return 1 / (1 + np.exp(-total / norm))


def test_sliding_window_averages_logits_of_overlapping_windows():
  data = data_config((36, 24))
  image = np.random.default_rng(5).integers(0, 255, (23, 30, 3), dtype=np.uint8)
  window, stride = (10, 12), (6, 7)
  got = predict.Predictor(RampModel(), data, batch_size=3).sliding(image, window, stride)
  np.testing.assert_allclose(got, ramp_windows(image, data, window, stride), atol=1e-5)


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


def monai_gaussian(size, sigma_scale=0.125):
  """MONAI's importance map restated with scipy: normal densities about the window centre, sigma =
  sigma_scale * n, scaled to 1 at the centre, their outer product floored at max(min, 1e-3)."""
  axes = [stats.norm.pdf(np.arange(n), loc=(n - 1) / 2, scale=sigma_scale * n) /
          stats.norm.pdf(0, scale=sigma_scale * n) for n in size]
  weights = axes[0][:, None] * axes[1][None, :]
  return np.maximum(weights, max(weights.min(), 1e-3))[..., None]


def test_gaussian_blend_weights_are_monais_importance_map():
  for size in [(10, 12), (7, 7), (64, 48), (1, 5)]:
    got = predict.blend_weights(size, 'gaussian')
    assert got.shape == (*size, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, monai_gaussian(size), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(predict.blend_weights((7, 7), 'gaussian')[3, 3], 1)  # the centre
  # sigma = 1/8 of the window: the border is ~4 sigma out (exp(-7.75) per axis), floored at 1e-3.
  weights = predict.blend_weights((64, 64), 'gaussian')[..., 0]
  np.testing.assert_allclose(weights[[0, 0, 31], [0, 32, 0]], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(weights[8, 32], np.exp(-(23.5 / 8) ** 2 / 2) * np.exp(-(0.5 / 8) ** 2 / 2),
                             rtol=1e-5)
  np.testing.assert_array_equal(predict.blend_weights((3, 4)), np.ones((3, 4, 1), np.float32))
  with pytest.raises(ValueError, match="blend must be one of mean, gaussian, got 'median'"):
    predict.Predictor(RampModel(), data_config((36, 24)), blend='median')


class ConstantModel(nnx.Module):
  def __call__(self, x):
    return jnp.zeros(x.shape[:3] + (4,)) + jnp.array([-3.0, -0.5, 0.25, 2.0])


def test_gaussian_blending_of_windows():
  data = data_config((36, 24))
  image = np.random.default_rng(6).integers(0, 255, (23, 30, 3), dtype=np.uint8)
  window, stride = (10, 12), (6, 7)
  predictor = predict.Predictor(RampModel(), data, batch_size=3, blend='gaussian')
  got = predictor.sliding(image, window, stride)
  np.testing.assert_allclose(got, ramp_windows(image, data, window, stride, monai_gaussian(window)),
                             atol=1e-5)
  mean = predict.Predictor(RampModel(), data, batch_size=3).sliding(image, window, stride)
  assert np.abs(got - mean).max() > 1e-3  # the weights matter where windows disagree
  # Weights cancel for a model that says the same everywhere: the constant comes back.
  constant = predict.Predictor(ConstantModel(), data, blend='gaussian').sliding(image, window, stride)
  np.testing.assert_allclose(constant, np.broadcast_to(1 / (1 + np.exp([3, 0.5, -0.25, -2])), got.shape),
                             atol=1e-6)


def test_flip_tta_in_whole_and_sliding_inference():
  data = data_config((30, 20))  # a 20 x 30 image is already at the test scale
  image = np.random.default_rng(7).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  x = (image[..., :1].astype(np.float64) - data.mean[0]) / data.std[0]
  rows, cols = np.arange(20)[:, None, None], np.arange(30)[None, :, None]
  ramp = rows * 0.1 - cols * 0.05 + np.arange(4) * 0.2
  mirrored = rows * 0.1 - cols[:, ::-1] * 0.05 + np.arange(4) * 0.2
  want = 1 / (1 + np.exp(-(x + (ramp + mirrored) / 2)))  # x is mirror-equivariant, the ramp is averaged
  predictor = predict.Predictor(RampModel(), data, tta='flip')
  (whole,) = predictor.whole([image])
  np.testing.assert_allclose(whole, want, atol=1e-5)
  np.testing.assert_allclose(predictor.sliding(image, (20, 30), (20, 30)), want, atol=1e-5)
  (plain,) = predict.Predictor(RampModel(), data).whole([image])
  np.testing.assert_allclose(plain, 1 / (1 + np.exp(-(x + ramp))), atol=1e-5)  # tta='none'


def test_save_probabilities_float16_npz_matches_the_png_maps(tmp_path):
  data = data_config((96, 64))
  image, _ = marked_image((32, 48), 4)
  Image.fromarray(image).save(tmp_path / 'eye.png')
  out = tmp_path / 'out'
  assert predict.run(RampModel(), data, [str(tmp_path / 'eye.png')], out, save_probabilities=True) == []
  with np.load(out / 'eye_probs.npz') as saved:
    probs = saved['probabilities']
    assert list(saved['classes']) == list(CLASSES)
  assert probs.dtype == np.float16 and probs.shape == (32, 48, 4)
  for c, name in enumerate(CLASSES):
    png = np.asarray(Image.open(out / f'eye_prob_{name}.png'), np.float64) / 65535
    # float16 keeps 11 significant bits (error <= 2^-12 below 1); the PNG rounds to 1 / 65535.
    np.testing.assert_allclose(probs[..., c], png, atol=2.0 ** -12 + 0.5 / 65535)
  assert len(np.unique(probs)) > 300  # a spread of values, not saturated ones
  predict.run(RampModel(), data, [str(tmp_path / 'eye.png')], tmp_path / 'plain')
  assert not list((tmp_path / 'plain').glob('*.npz'))  # only when asked


def test_expand_inputs_folders_globs_and_files(tmp_path):
  for name in ['b.JPG', 'a.png', 'c.tif', '.hidden.png', 'notes.txt', 'sub/d.jpg', 'sub/e.png',
               'other/f.bmp']:
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'empty').mkdir()

  def p(*names):
    return [os.path.join(tmp_path, n) for n in names]

  assert predict.expand_inputs([tmp_path]) == p('a.png', 'b.JPG', 'c.tif')  # sorted, not recursive
  assert predict.expand_inputs([f'{tmp_path}/sub/*.jpg']) == p('sub/d.jpg')  # a quoted glob
  assert predict.expand_inputs([f'{tmp_path}/**/*.png']) == p('a.png', 'sub/e.png')  # ** recurses
  assert predict.expand_inputs([f'{tmp_path}/s*']) == p('sub/d.jpg', 'sub/e.png')  # a folder matched
  # Order kept, each file once, the literal file as given; no match and no images stay, to be reported.
  assert predict.expand_inputs([f'{tmp_path}/other/f.bmp', tmp_path, f'{tmp_path}/./a.png',
                                f'{tmp_path}/*.gif', f'{tmp_path}/empty']) == (
      p('other/f.bmp', 'a.png', 'b.JPG', 'c.tif', '*.gif', 'empty'))
  with pytest.raises(ValueError, match='empty: a folder with no image files'):
    predict.read_image(tmp_path / 'empty')
  with pytest.raises(ValueError, match=r'\*\.gif'):
    predict.read_image(f'{tmp_path}/*.gif')


def test_run_holds_one_full_resolution_map_at_a_time(tmp_path, monkeypatch):
  """When an image's maps are written, no earlier image's probability map (nor the buffer it was cut
  from) is still alive: a batch keeps its logits at the test scale, not N full-resolution maps."""
  data = data_config((24, 16))
  paths = []
  for i in range(4):
    Image.fromarray(marked_image((64, 96), i)[0]).save(tmp_path / f'{i}.png')
    paths.append(str(tmp_path / f'{i}.png'))
  alive, written = [], []

  def spy(folder, stem, image, probs, save_probabilities=False):
    del folder, image, save_probabilities
    assert probs.shape == (64, 96, 4)
    assert [r() for r in alive] == [None] * len(alive), f'{stem}: an earlier map is still held'
    root = probs
    while isinstance(root, np.ndarray) and root.base is not None:
      root = root.base  # np.asarray of a jax array on CPU: a view of a memoryview of the device buffer
    alive.append(weakref.ref(root))
    written.append(stem)

  monkeypatch.setattr(predict, 'write_outputs', spy)
  assert predict.run(RampModel(), data, paths, tmp_path / 'out', batch_size=4) == []
  assert written == ['0', '1', '2', '3']
