"""Lesion maps for fundus images.

  python -m m2mrf_jax.predict --config=configs/idrid_c.py --checkpoint=DIR IMAGE... --output=DIR

Per input image `NAME.ext` (JPEG, PNG, TIFF, any size) the output folder gets
  NAME_prob_{EX,HE,SE,MA}.png   16-bit probability maps (value / 65535), at the original size;
  NAME_mask_{EX,HE,SE,MA}.png   binary masks, prob > 0.5 (0 / 255);
  NAME_overlay.png              the masks painted on the image: EX red, HE green, SE yellow, MA blue.
Inference is whole-image at the config's test scale (as the official test), the logits resized to the
original size; or, with `--window=H,W --stride=H,W`, sliding windows at full resolution whose logits
are averaged where they overlap (mmseg slide inference). Images of one size are batched. An unreadable
input is reported by name and skipped; the exit status is 1 if any input failed.
"""
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
from m2mrf_jax import layers
from m2mrf_jax import visualize

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (model and test scale).')
flags.DEFINE_string('checkpoint', None, 'An orbax checkpoint directory (training workdir or converted).')
flags.DEFINE_string('output', None, 'Folder for the probability maps, masks and overlays.')
flags.DEFINE_list('window', [], 'Sliding-window size H,W at full resolution (default: whole image '
                  'at the test scale).')
flags.DEFINE_list('stride', [], 'Sliding-window stride H,W (default: half the window).')
flags.DEFINE_integer('batch_size', 4, 'Images (or windows) per forward pass.')

THRESHOLD = 0.5


def read_image(path) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), as the official mmcv.imread (cv2, IMREAD_COLOR: grey and
  16-bit files become 8-bit colour, EXIF orientation applied); raises ValueError naming the file."""
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


class Predictor:
  """Sigmoid probabilities of a segmentor, whole-image at the test scale or by sliding windows."""

  def __init__(self, model: nnx.Module, data_config, batch_size: int = 4):
    eval_model = nnx.clone(model)
    eval_model.eval()
    self.graphdef, self.state = nnx.split(eval_model)
    self.data_config = data_config
    self.batch_size = batch_size
    self._logits = jax.jit(self._forward, static_argnums=2)

  def _forward(self, state, images, size):
    logits = nnx.merge(self.graphdef, state)(images)
    return layers.resize_bilinear(logits, size)

  def _normalize(self, image):
    return transforms.normalize(image, self.data_config.mean, self.data_config.std)

  def whole(self, images: list[np.ndarray]) -> np.ndarray:
    """Images uint8 (H, W, 3) of one size -> probabilities (N, H, W, 4) at that size."""
    size = images[0].shape[:2]
    inputs = np.stack([self._normalize(transforms.rescale_keep_ratio(im, self.data_config.img_scale))
                       for im in images])
    return np.asarray(jax.nn.sigmoid(self._logits(self.state, inputs, size)))

  def sliding(self, image: np.ndarray, window, stride) -> np.ndarray:
    """One uint8 (H, W, 3) image -> probabilities (H, W, 4), logits averaged over windows."""
    h, w = image.shape[:2]
    wh, ww = min(window[0], h), min(window[1], w)
    boxes = [(y, x) for y in window_starts(h, window[0], stride[0])
             for x in window_starts(w, window[1], stride[1])]
    normalized = self._normalize(image)
    total = np.zeros((h, w, len(CLASSES)), np.float32)
    hits = np.zeros((h, w, 1), np.float32)
    for i in range(0, len(boxes), self.batch_size):
      chunk = boxes[i:i + self.batch_size]
      crops = [normalized[y:y + wh, x:x + ww] for y, x in chunk]
      crops += crops[-1:] * (self.batch_size - len(crops))  # one batch shape, one compilation
      logits = np.asarray(self._logits(self.state, np.stack(crops), (wh, ww)))
      for (y, x), logit in zip(chunk, logits):
        total[y:y + wh, x:x + ww] += logit
        hits[y:y + wh, x:x + ww] += 1
    return np.asarray(jax.nn.sigmoid(total / hits))


def write_outputs(folder, stem: str, image: np.ndarray, probs: np.ndarray) -> None:
  """Writes the 16-bit probability maps, the binary masks and the overlay of one image."""
  folder = epath.Path(folder)
  masks = probs > THRESHOLD
  for c, name in enumerate(CLASSES):
    prob16 = np.round(np.clip(probs[..., c], 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(prob16).save(folder / f'{stem}_prob_{name}.png')
    Image.fromarray(masks[..., c].astype(np.uint8) * 255).save(folder / f'{stem}_mask_{name}.png')
  Image.fromarray(visualize.overlay(image, masks)).save(folder / f'{stem}_overlay.png')


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
        batch_size: int = 4) -> list[str]:
  """Predicts every input into `output`; returns the inputs that could not be read.

  Args:
    model: the segmentor (used in eval mode).
    data_config: `config.data` (img_scale, mean, std).
    inputs: image paths.
    output: the output folder (created).
    window: (H, W) for sliding-window inference at full resolution, or None for whole-image.
    stride: (H, W) window stride; half the window if None.
    batch_size: images (whole) or windows (sliding) per forward pass.
  """
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  predictor = Predictor(model, data_config, batch_size)
  if window is not None and stride is None:
    stride = (max(window[0] // 2, 1), max(window[1] // 2, 1))
  stems = [epath.Path(p).stem for p in inputs]
  duplicates = {s for s in stems if stems.count(s) > 1}
  if duplicates:
    raise ValueError(f'inputs share the names {sorted(duplicates)}: their outputs would collide')
  failed = []
  pending = []  # (path, image) of one size, waiting for a full batch

  def flush():
    probs = predictor.whole([image for _, image in pending])
    for (path, image), prob in zip(pending, probs):
      write_outputs(output, epath.Path(path).stem, image, prob)
    progress.update(len(pending))
    pending.clear()

  with tqdm.tqdm(total=len(inputs), unit='image', file=sys.stderr) as progress:
    for path, image in _readable(inputs, failed, progress):
      if window is not None:
        write_outputs(output, epath.Path(path).stem, image, predictor.sliding(image, window, stride))
        progress.update(1)
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
  inputs = argv[1:]
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
  config = FLAGS.config
  checkpoints.checked_card(FLAGS.checkpoint, config)
  model = checkpoints.restore_model(FLAGS.checkpoint, config.model)
  failed = run(model, config.data, inputs, FLAGS.output, window=window, stride=stride,
               batch_size=FLAGS.batch_size)
  logging.info('wrote %d of %d images to %s', len(inputs) - len(failed), len(inputs), FLAGS.output)
  if failed:
    print(f'{len(failed)} of {len(inputs)} inputs failed: {", ".join(failed)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
