"""Lesion maps for fundus images.

  python -m m2mrf_jax.predict --config=configs/idrid_c.py --checkpoint=DIR INPUT... --output=DIR

An INPUT is an image file (JPEG, PNG, TIFF, any size), a folder (its image files, by suffix, sorted; not
recursive; hidden files left out) or a glob pattern, expanded here so that a quoted one works too (`**`
matches folders recursively). Per image `NAME.ext` the output folder gets
  NAME_prob_{EX,HE,SE,MA}.png   16-bit probability maps (value / 65535), at the original size;
  NAME_mask_{EX,HE,SE,MA}.png   binary masks, prob > 0.5 (0 / 255);
  NAME_overlay.png              the lesion outlines on the image: EX red, HE green, SE yellow, MA blue;
  NAME_probs.npz                with --save_probabilities: `probabilities` float16 (H, W, 4), `classes`.
Inference is whole-image at the config's test scale (as the official test), the logits resized to the
original size; or, with `--window=H,W --stride=H,W`, sliding windows at full resolution whose logits
are blended where they overlap: averaged (mmseg slide inference) or, with `--blend=gaussian`, weighted by
MONAI's Gaussian importance map. `--tta=flip` also runs the left-right mirror and averages the logits
(`inference.logits`). Images of one size are batched at the test scale; the full-resolution probability
map of one image at a time is made, written and dropped. An unreadable input is reported by name and
skipped; the exit status is 1 if any input failed.
"""
import glob
import os
import sys

from absl import app
from absl import flags
from absl import logging
import cv2
from etils import epath
from flax import nnx
import jax
import numpy as np
from ml_collections import config_flags
from PIL import Image
import tqdm

from data_pipelines import transforms
from data_pipelines.lesions import CLASSES
from m2mrf_jax import inference
from m2mrf_jax import layers
from m2mrf_jax import visualize
from m2mrf_jax import xla_options

FLAGS = flags.FLAGS
BLEND_MODES = ('mean', 'gaussian')  # how overlapping windows are blended (`blend_weights`)
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (model and test scale).')
flags.DEFINE_string('checkpoint', None, 'An orbax checkpoint directory (training workdir or converted).')
flags.DEFINE_string('output', None, 'Folder for the probability maps, masks and overlays.')
flags.DEFINE_list('window', [], 'Sliding-window size H,W at full resolution (default: whole image '
                  'at the test scale).')
flags.DEFINE_list('stride', [], 'Sliding-window stride H,W (default: half the window).')
flags.DEFINE_enum('blend', 'mean', list(BLEND_MODES), 'How overlapping windows are blended: mean '
                  '(mmseg) or gaussian (MONAI, sigma = 1/8 of the window).')
flags.DEFINE_enum('tta', None, list(inference.TTA_MODES), 'Test-time augmentation: none or flip '
                  '(left-right mirror, logits averaged); default: the config\'s `tta`.')
flags.DEFINE_bool('save_probabilities', False, 'Also write NAME_probs.npz: float16 (H, W, 4) '
                  'probabilities and the class names.')
flags.DEFINE_integer('batch_size', 4, 'Images (or windows) per forward pass.')
flags.DEFINE_string('jit_cache_dir', xla_options.CACHE_DIR, xla_options.CACHE_HELP)

THRESHOLD = 0.5
# What OpenCV's imread decodes (by file name suffix, lower case): the files taken from a folder.
IMAGE_SUFFIXES = ('.bmp', '.dib', '.jpeg', '.jpg', '.jpe', '.jp2', '.png', '.webp', '.pbm', '.pgm',
                  '.ppm', '.pxm', '.pnm', '.sr', '.ras', '.tiff', '.tif', '.exr', '.hdr', '.pic')


def expand_inputs(args) -> list[str]:
  """Command-line inputs -> image paths, in order, each once.

  A folder gives its files whose suffix is in IMAGE_SUFFIXES (any case), sorted, not recursive, hidden
  ones left out; a glob pattern that names no existing file gives its matches, sorted (`**` recursive),
  folders among them expanded as above. Anything else, a pattern matching nothing or a folder without
  images included, is kept as it is, for `read_image` to report by name.
  """
  paths = []
  for arg in args:
    arg = str(arg)
    if not os.path.exists(arg) and any(c in arg for c in '*?['):
      matches = sorted(glob.glob(arg, recursive=True)) or [arg]
    else:
      matches = [arg]
    for match in matches:
      images = folder_images(match) if os.path.isdir(match) else []
      paths += images or [match]
  return list(dict.fromkeys(os.path.normpath(p) for p in paths))


def folder_images(folder) -> list[str]:
  """The image files directly inside `folder` (by suffix, hidden ones left out), sorted."""
  return sorted(entry.path for entry in os.scandir(folder)
                if entry.is_file() and not entry.name.startswith('.')
                and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)


def read_image(path) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), as the official mmcv.imread (cv2, IMREAD_COLOR: grey and
  16-bit files become 8-bit colour, EXIF orientation applied); raises ValueError naming the file."""
  if os.path.isdir(path):
    raise ValueError(f'cannot read image {path}: a folder with no image files directly inside '
                     '(.jpg, .png, .tif, ... by suffix)')
  try:
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
  except (OSError, cv2.error) as e:
    raise ValueError(f'cannot read image {path}: {e}') from e
  if image is None:
    raise ValueError(f'cannot read image {path}: not an image OpenCV can decode')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)


def parse_pair(values, name):
  """'H,W' flag values -> (H, W) positive ints."""
  try:
    pair = tuple(int(v) for v in values)
  except ValueError:
    pair = ()
  if len(pair) != 2 or min(pair) < 1:
    raise ValueError(f'--{name} must be two positive integers H,W, got {",".join(values)!r}')
  return pair


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Window starts along one axis as mmseg slide inference: the last window ends at the border."""
  if stride > window:
    raise ValueError(f'sliding-window stride {stride} is larger than the window {window}: pixels '
                     'between windows would get no prediction')
  window = min(window, length)
  count = max(length - window + stride - 1, 0) // stride + 1
  return sorted({min(i * stride, length - window) for i in range(count)})


def blend_weights(size, blend: str = 'mean', sigma_scale: float = 0.125) -> np.ndarray:
  """Weights (h, w, 1) float32 of one window's logits where windows overlap.

  mean: ones (mmseg). gaussian: MONAI's `compute_importance_map(mode='gaussian')`, the product over the
  axes of exp(-d^2 / (2 sigma^2)), d the distance to the window centre ((n - 1) / 2), sigma =
  sigma_scale * n, not normalised, raised to at least max(its minimum, 1e-3) so that corner pixels
  covered by one window only still get a finite blend.
  """
  if blend not in BLEND_MODES:
    raise ValueError(f'blend must be one of {", ".join(BLEND_MODES)}, got {blend!r}')
  if blend == 'mean':
    return np.ones((*size, 1), np.float32)
  axes = [np.exp(-(np.arange(n) - (n - 1) / 2) ** 2 / (2 * (sigma_scale * n) ** 2)) for n in size]
  weights = np.outer(*axes).astype(np.float32)
  return np.maximum(weights, max(weights.min(), np.float32(1e-3)))[..., None]


class Predictor:
  """Sigmoid probabilities of a segmentor, whole-image at the test scale or by sliding windows."""

  def __init__(self, model: nnx.Module, data_config, batch_size: int = 4, *, tta: str = 'none',
               blend: str = 'mean'):
    eval_model = nnx.clone(model)
    eval_model.eval()
    self.graphdef, self.state = nnx.split(eval_model)
    self.data_config = data_config
    self.batch_size = batch_size
    self.tta = inference.check_tta(tta)
    self.blend = blend
    blend_weights((1, 1), blend)  # a bad name fails here, not after the first image
    self._logits = jax.jit(self._forward)
    self._probabilities = jax.jit(self._resize_sigmoid, static_argnums=1)

  def _forward(self, state, images):
    return inference.logits(nnx.merge(self.graphdef, state), images, self.tta)

  @staticmethod
  def _resize_sigmoid(logits, size):
    return jax.nn.sigmoid(layers.resize_bilinear(logits[None], size)[0])

  def _normalize(self, image):
    return transforms.normalize(image, self.data_config.mean, self.data_config.std)

  def whole(self, images: list[np.ndarray]):
    """Images uint8 (H, W, 3) of one size -> an iterator of their probabilities (H, W, 4) float32.

    The batch runs at the test scale and its logits stay there; each image's map is resized to the
    original size only when the iterator reaches it, so one full-resolution map exists at a time.
    """
    size = images[0].shape[:2]
    inputs = np.stack([self._normalize(transforms.rescale_keep_ratio(im, self.data_config.img_scale))
                       for im in images])
    logits = self._logits(self.state, inputs)
    for i in range(len(images)):
      yield np.asarray(self._probabilities(logits[i], size))

  def sliding(self, image: np.ndarray, window, stride) -> np.ndarray:
    """One uint8 (H, W, 3) image -> probabilities (H, W, 4), window logits blended (`blend_weights`)."""
    h, w = image.shape[:2]
    wh, ww = min(window[0], h), min(window[1], w)
    weights = blend_weights((wh, ww), self.blend)
    boxes = [(y, x) for y in window_starts(h, window[0], stride[0])
             for x in window_starts(w, window[1], stride[1])]
    normalized = self._normalize(image)
    total = np.zeros((h, w, len(CLASSES)), np.float32)
    norm = np.zeros((h, w, 1), np.float32)
    for i in range(0, len(boxes), self.batch_size):
      chunk = boxes[i:i + self.batch_size]
      crops = [normalized[y:y + wh, x:x + ww] for y, x in chunk]
      crops += crops[-1:] * (self.batch_size - len(crops))  # one batch shape, one compilation
      logits = np.asarray(self._logits(self.state, np.stack(crops)))
      for (y, x), logit in zip(chunk, logits):
        total[y:y + wh, x:x + ww] += logit * weights
        norm[y:y + wh, x:x + ww] += weights
    total /= norm
    np.negative(total, out=total)  # the sigmoid in place: no second full-resolution map
    with np.errstate(over='ignore'):  # exp(large) = inf -> probability 0, as it should
      np.exp(total, out=total)
    total += 1
    return np.reciprocal(total, out=total)


def write_outputs(folder, stem: str, image: np.ndarray, probs: np.ndarray,
                  save_probabilities: bool = False) -> None:
  """Writes the 16-bit probability maps, the binary masks, the overlay (and NAME_probs.npz) of one image."""
  folder = epath.Path(folder)
  masks = probs > THRESHOLD
  for c, name in enumerate(CLASSES):
    prob16 = np.round(np.clip(probs[..., c], 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(prob16).save(folder / f'{stem}_prob_{name}.png')
    Image.fromarray(masks[..., c].astype(np.uint8) * 255).save(folder / f'{stem}_mask_{name}.png')
  Image.fromarray(visualize.overlay(image, masks)).save(folder / f'{stem}_overlay.png')
  if save_probabilities:
    with (folder / f'{stem}_probs.npz').open('wb') as f:
      np.savez_compressed(f, probabilities=probs.astype(np.float16), classes=np.array(CLASSES))


def _readable(paths, failed, progress):
  """(path, image) of each readable input; failures are reported on stderr by name and collected."""
  for path in paths:
    try:
      yield path, read_image(path)
    except ValueError as e:
      print(f'skipped: {e}', file=sys.stderr, flush=True)
      failed.append(str(path))
      progress.update(1)


def run(model: nnx.Module, data_config, inputs, output, *, window=None, stride=None,
        batch_size: int = 4, tta: str = 'none', blend: str = 'mean',
        save_probabilities: bool = False) -> list[str]:
  """Predicts every input into `output`; returns the inputs that could not be read.

  Args:
    model: the segmentor (used in eval mode).
    data_config: `config.data` (img_scale, mean, std).
    inputs: image paths (`expand_inputs` turns folders and glob patterns into these).
    output: the output folder (created).
    window: (H, W) for sliding-window inference at full resolution, or None for whole-image.
    stride: (H, W) window stride; half the window if None.
    batch_size: images (whole) or windows (sliding) per forward pass.
    tta: 'none' or 'flip' (`inference.logits`).
    blend: 'mean' or 'gaussian', how overlapping windows are blended (`blend_weights`).
    save_probabilities: also write NAME_probs.npz (float16 probabilities).
  """
  output = epath.Path(output)
  predictor = Predictor(model, data_config, batch_size, tta=tta, blend=blend)
  if window is not None and stride is None:
    stride = (max(window[0] // 2, 1), max(window[1] // 2, 1))
  stems = [epath.Path(p).stem for p in inputs]
  duplicates = {s for s in stems if stems.count(s) > 1}
  if duplicates:
    raise ValueError(f'inputs share the names {sorted(duplicates)}: their outputs would collide')
  output.mkdir(parents=True, exist_ok=True)
  failed = []
  pending = []  # (path, image) of one size, waiting for a full batch

  def write(path, image, probs):
    write_outputs(output, epath.Path(path).stem, image, probs, save_probabilities)
    progress.update(1)

  def flush():
    for (path, image), probs in zip(pending, predictor.whole([image for _, image in pending])):
      write(path, image, probs)
    pending.clear()

  with tqdm.tqdm(total=len(inputs), unit='image', file=sys.stderr) as progress:
    for path, image in _readable(inputs, failed, progress):
      if window is not None:
        write(path, image, predictor.sliding(image, window, stride))
        continue
      if pending and pending[0][1].shape != image.shape:
        flush()
      pending.append((path, image))
      if len(pending) == batch_size:
        flush()
    if pending:
      flush()
  return failed


def main(argv):
  from m2mrf_jax import checkpoints  # pylint: disable=g-import-not-at-top (slow import, after flags)
  from m2mrf_jax import console  # pylint: disable=g-import-not-at-top
  console.setup(FLAGS.verbosity)
  xla_options.use_compilation_cache(FLAGS.jit_cache_dir)
  inputs = expand_inputs(argv[1:])
  if not FLAGS.checkpoint:
    raise app.UsageError('--checkpoint is required: an orbax checkpoint directory written by training '
                         'or by m2mrf_jax.convert (got an empty value)')
  if not FLAGS.output:
    raise app.UsageError('--output is required: the folder for the maps and overlays')
  if not inputs:
    raise app.UsageError('no input images given')
  window = parse_pair(FLAGS.window, 'window') if FLAGS.window else None
  stride = parse_pair(FLAGS.stride, 'stride') if FLAGS.stride else None
  if stride and not window:
    raise app.UsageError('--stride needs --window')
  if FLAGS.blend != 'mean' and not window:
    raise app.UsageError(f'--blend={FLAGS.blend} needs --window (whole-image inference has no windows)')
  config = FLAGS.config
  checkpoints.checked_card(FLAGS.checkpoint, config)
  model = checkpoints.restore_model(FLAGS.checkpoint, config.model)
  failed = run(model, config.data, inputs, FLAGS.output, window=window, stride=stride,
               batch_size=FLAGS.batch_size, tta=FLAGS.tta or config.tta,
               blend=FLAGS.blend, save_probabilities=FLAGS.save_probabilities)
  logging.info('wrote %d of %d images to %s', len(inputs) - len(failed), len(inputs), FLAGS.output)
  if failed:
    print(f'{len(failed)} of {len(inputs)} inputs failed: {", ".join(failed)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
