"""The official lesion metrics (mmseg `my_metrics.sigmoid_metrics`), as exact streaming counts.

Protocol, per lesion class (EX, HE, SE, MA), with counts pooled over every pixel of every image:

* IoU = TP / (P + FN) and F1 = 2 TP / (P + TP + FN), predicting `prob > 0.5` (strict), where P is the
  number of predicted-positive pixels;
* AUPR: at the 11 thresholds t = linspace(0, 1, 11), predicting `prob > t`, precision = TP / P (1 where
  P = 0) and recall = TP / (TP + FN) (0 where undefined); the area is the trapezoid rule in threshold
  order (`sklearn.metrics.auc`); t = 1 gives the (recall 0, precision 1) end point. It is not average
  precision. The same curve at `fine_thresholds` thresholds (1001 by default) is reported as `aupr_fine`;
* per-class values have NaN replaced by 0 and the means are over the four classes.

Probabilities are float32 and compared with float32 thresholds, as in the official code (a float32 sigmoid
output against NumPy float64 scalars, which NumPy < 1.24 compares in float32).

Counting: each pixel falls in one bin, the number of thresholds strictly below its probability; a jitted
update scatter-adds the pixels of a batch into a histogram (negative/positive, class, bin) of uint32 (one
update must hold fewer than 2**32 pixels) and adds it to an on-device total of two uint32 words per bin
(low word plus carry into the high word), i.e. exact 64-bit counts without `jax_enable_x64` (IDRiD's
test split has 27 x 12.2 M pixels per class). The host reads the total once and works in int64.
Memory is the histogram, 2 x 4 x 1002 bins, whatever the number or size of the images.
"""
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines.lesions import CLASSES
from m2mrf_jax import layers
NUM_THRESHOLDS = 11  # the official curve: t = 0, 0.1, ..., 1
MAX_PIXELS_PER_UPDATE = 2**32 - 1


def thresholds(num: int) -> np.ndarray:
  """The official float64 thresholds `linspace(0, 1, num)`, shape (num,)."""
  return np.linspace(0.0, 1.0, num)


def float32_thresholds(num: int) -> np.ndarray:
  """The thresholds as the official comparison sees them, float32 (num,).

  `my_metrics.py` compares a float32 probability array with a float64 NumPy scalar; under the
  NumPy < 1.24 it requires (value-based casting) that comparison runs in float32, i.e. against the
  threshold rounded to the nearest float32 (NumPy >= 2 would compare in float64 instead).
  """
  return thresholds(num).astype(np.float32)


def check_fine_thresholds(num: int) -> int:
  """Checks that the official 11 thresholds are among `num` fine ones (num - 1 a multiple of 10)."""
  if num < NUM_THRESHOLDS or (num - 1) % (NUM_THRESHOLDS - 1):
    raise ValueError(f'aupr_fine_thresholds must be 10 k + 1 >= 11 (e.g. 1001) so that the official '
                     f'11 thresholds are among them, got {num}')
  return num


def bin_index(probs: jax.Array, edges: jax.Array) -> jax.Array:
  """Number of `edges` strictly below each probability (NaN -> 0), same shape as probs, int32.

  XLA flushes subnormal floats to zero, so a probability below 1.2e-38 (a logit below -87) counts as 0,
  not above t = 0 as in NumPy.

  Args:
    probs: float32 array of any shape.
    edges: (T,) float32 thresholds from `float32_thresholds(T)` (near-uniform on [0, 1]).
  """
  num = edges.shape[0]
  estimate = jnp.ceil(probs * (num - 1))
  k = jnp.clip(jnp.where(jnp.isnan(estimate), 0, estimate), 0, num).astype(jnp.int32)
  # The estimate is at most one bin off: correct it against the exact edges.
  inf = jnp.full((1,), jnp.inf, edges.dtype)
  padded = jnp.concatenate([-inf, edges, inf])
  # padded[k] = edges[k - 1], padded[k + 1] = edges[k]; 0 <= k <= T, so the gathers need no bounds
  # handling (promise_in_bounds: ~3x faster on CPU than the default clamp).
  lower = padded.at[k].get(mode='promise_in_bounds')
  upper = padded.at[k + 1].get(mode='promise_in_bounds')
  k = k - (lower >= probs).astype(jnp.int32) + (upper < probs).astype(jnp.int32)
  return jnp.where(jnp.isnan(probs), 0, jnp.clip(k, 0, num))


def _histogram(probs, masks, keep, edges):
  """`histogram` counting only the pixels where `keep` (broadcast to probs' shape) is True."""
  c = probs.shape[-1]
  bins = edges.shape[0] + 1
  k = bin_index(probs.astype(jnp.float32), edges)
  index = (masks.astype(jnp.int32) * c + jnp.arange(c, dtype=jnp.int32)) * bins + k
  size = 2 * c * bins
  index = jnp.where(keep, index, size)  # dropped pixels go to an extra bin
  counts = jnp.zeros((size + 1,), jnp.uint32).at[index.ravel()].add(
      jnp.uint32(1), mode='promise_in_bounds')
  return counts[:size].reshape(2, c, bins)


def histogram(probs: jax.Array, masks: jax.Array, valid: jax.Array, edges: jax.Array) -> jax.Array:
  """Pixel counts per (negative/positive, class, bin) of one batch, uint32 (2, C, T + 1).

  Args:
    probs: (N, H, W, C) probabilities.
    masks: (N, H, W, C) bool ground truth.
    valid: (N,) bool; False rows (batch padding) are not counted.
    edges: (T,) float32 thresholds.
  """
  _check_pixels(probs.shape)
  return _histogram(probs, masks, valid[:, None, None, None], edges)


def _check_pixels(shape):
  n, h, w, _ = shape
  if n * h * w > MAX_PIXELS_PER_UPDATE:
    raise ValueError(f'one update counts at most 2**32 - 1 pixels per class, got {n}x{h}x{w}')


def resized_histogram(logits: jax.Array, masks: jax.Array, valid: jax.Array, edges: jax.Array,
                      band_rows: int = 128) -> jax.Array:
  """`histogram` of sigmoid(resize_bilinear(logits, masks' size)), `band_rows` rows at a time.

  The full-resolution probabilities never exist at once: each band of rows is interpolated from the
  logits, passed through the sigmoid and counted in one loop step (memory O(band_rows W C), not O(H W C)).

  Args:
    logits: (N, h, w, C) logits at the network's input size.
    masks: (N, H, W, C) bool ground truth at the original size.
    valid: (N,) bool; False rows are not counted.
    edges: (T,) float32 thresholds.
  """
  n, h, w, c = masks.shape
  _check_pixels(masks.shape)
  rows = min(band_rows, h)
  logits = logits.astype(jnp.float32)

  def band(b, hist):
    start = jnp.minimum(b * rows, h - rows)  # the last band is shifted up to stay inside the map
    probs = jax.nn.sigmoid(layers.resize_bilinear_rows(logits, (h, w), start, rows))
    fresh = start + jnp.arange(rows) >= b * rows  # rows the previous band has not counted
    keep = valid[:, None, None, None] & fresh[None, :, None, None]
    band_masks = jax.lax.dynamic_slice_in_dim(masks, start, rows, axis=1)
    return hist + _histogram(probs, band_masks, keep, edges)

  zeros = jnp.zeros((2, c, edges.shape[0] + 1), jnp.uint32)
  return jax.lax.fori_loop(0, -(-h // rows), band, zeros)


def add_counts(total: jax.Array, hist: jax.Array) -> jax.Array:
  """Adds a uint32 histogram to a two-word total (2, ...) = (low, high) uint32, with carry."""
  low = total[0] + hist
  high = total[1] + (low < hist).astype(jnp.uint32)
  return jnp.stack([low, high])


def count(total: jax.Array, probs: jax.Array, masks: jax.Array, valid: jax.Array, edges: jax.Array,
          axis_name: str | None = None) -> jax.Array:
  """Adds a batch to a two-word total (2, 2, C, T + 1); inside shard_map, sums over `axis_name` first.

  Args:
    total: the running two-word total.
    probs, masks, valid, edges: as `histogram` (this device's rows inside shard_map).
    axis_name: the mesh axis the batch is split over, or None.
  """
  return _add(total, histogram(probs, masks, valid, edges), probs.shape, axis_name)


def count_resized(total: jax.Array, logits: jax.Array, masks: jax.Array, valid: jax.Array,
                  edges: jax.Array, axis_name: str | None = None) -> jax.Array:
  """`count` of sigmoid(resize_bilinear(logits, masks' size)) through `resized_histogram`."""
  return _add(total, resized_histogram(logits, masks, valid, edges), masks.shape, axis_name)


def _add(total, hist, shape, axis_name):
  """Adds the histogram of a batch of `shape` to `total`, summed over `axis_name` first (shard_map)."""
  if axis_name is not None:
    pixels = jax.lax.axis_size(axis_name) * math.prod(shape[:3])
    if pixels > MAX_PIXELS_PER_UPDATE:
      raise ValueError(f'one update counts at most 2**32 - 1 pixels per class, got {pixels} over '
                       f'the {axis_name!r} axis: use smaller batches')
    hist = jax.lax.psum(hist, axis_name)
  return add_counts(total, hist)


def to_int64(total) -> np.ndarray:
  """The exact counts of a two-word total as int64 (drops the word axis)."""
  total = np.asarray(total).astype(np.int64)
  return total[0] + (total[1] << 32)


def counts_from_histogram(hist: np.ndarray):
  """TP, P and FN at every threshold from an int64 histogram (2, C, T + 1); each (T, C) int64."""
  suffix = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]  # suffix[..., b] = sum over bins >= b
  tp = suffix[1, :, 1:].T  # bin b > k <=> prob > t_k
  predicted = (suffix[0, :, 1:] + suffix[1, :, 1:]).T
  fn = suffix[1, :, 0][None, :] - tp
  return tp, predicted, fn


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Trapezoid area under y(x) along axis 0, positive for monotonic x either way (sklearn auc)."""
  area = np.sum(np.diff(x, axis=0) * (y[1:] + y[:-1]) / 2, axis=0)
  return np.abs(area)


def scores(tp: np.ndarray, predicted: np.ndarray, fn: np.ndarray) -> dict:
  """The official scores from counts (T, C) at T = 10 k + 1 thresholds linspace(0, 1, T).

  Returns:
    A dict of NumPy values: `aupr`, `iou`, `f1`, `ppv`, `sensitivity` (C,) at the official 11 thresholds
    and t = 0.5, their means `mAUPR`, `mIoU`, `mF1`; `aupr_fine` (C,) and `mAUPR_fine` on all T; the
    curves `precision`, `recall` (11, C) and `precision_fine`, `recall_fine` (T, C); `thresholds` (11,).
  """
  tp, predicted, fn = (np.asarray(a, np.float64) for a in (tp, predicted, fn))
  num = check_fine_thresholds(tp.shape[0])
  with np.errstate(invalid='ignore', divide='ignore'):
    precision = np.nan_to_num(tp / predicted, nan=1.0)
    recall = np.nan_to_num(tp / (tp + fn), nan=0.0)
    every = (num - 1) // (NUM_THRESHOLDS - 1)
    half = (num - 1) // 2
    t, p, f = tp[half], predicted[half], fn[half]
    iou = np.nan_to_num(t / (p + f))
    f1 = np.nan_to_num(2 * t / (p + t + f))
    ppv = np.nan_to_num(t / p)
    sensitivity = np.nan_to_num(t / (t + f))
  aupr = trapezoid_area(recall[::every], precision[::every])
  aupr_fine = trapezoid_area(recall, precision)
  return dict(
      aupr=aupr, iou=iou, f1=f1, ppv=ppv, sensitivity=sensitivity,
      mAUPR=float(aupr.mean()), mIoU=float(iou.mean()), mF1=float(f1.mean()),
      aupr_fine=aupr_fine, mAUPR_fine=float(aupr_fine.mean()),
      precision=precision[::every], recall=recall[::every],
      precision_fine=precision, recall_fine=recall,
      thresholds=thresholds(NUM_THRESHOLDS))


class PooledCounts:
  """Streaming pooled counts on device; `update` per batch, `result` at the end.

  With a mesh (of this process's devices), batches are split over its 'data' axis (rows padded to a
  multiple of its size), each device counts its rows and the histograms are summed with a psum. Across
  processes, `counts` and `result` sum the totals of every process (each process counts its own images,
  any number of them; all processes must call `result`).
  """

  def __init__(self, num_classes: int = 4, fine_thresholds: int = 1001,
               mesh: jax.sharding.Mesh | None = None):
    self.num_classes = num_classes
    self.edges = jnp.asarray(float32_thresholds(check_fine_thresholds(fine_thresholds)))
    self.mesh = mesh
    shape = (2, 2, num_classes, fine_thresholds + 1)
    if mesh is None:
      self.total = jnp.zeros(shape, jnp.uint32)
      self._update = jax.jit(self._local_update, donate_argnums=0)
    else:
      self.total = jax.device_put(jnp.zeros(shape, jnp.uint32), NamedSharding(mesh, P()))
      sharded = jax.shard_map(self._sharded_update, mesh=mesh,
                              in_specs=(P(), P('data'), P('data'), P('data')), out_specs=P())
      self._update = jax.jit(sharded, donate_argnums=0)

  def _local_update(self, total, probs, masks, valid):
    return count(total, probs, masks, valid, self.edges)

  def _sharded_update(self, total, probs, masks, valid):
    return count(total, probs, masks, valid, self.edges, 'data')

  def update(self, probs, masks, valid=None) -> None:
    """Counts one batch: probs (N, H, W, C) float, masks (N, H, W, C) bool, valid (N,) bool or None."""
    probs = jnp.asarray(probs, jnp.float32)
    masks = jnp.asarray(masks, bool)
    if probs.ndim != 4 or probs.shape[-1] != self.num_classes or masks.shape != probs.shape:
      raise ValueError(f'expected probabilities and masks of one shape (N, H, W, {self.num_classes}), '
                       f'got {probs.shape} and {masks.shape}')
    valid = jnp.ones(probs.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
    if self.mesh is not None:
      pad = -probs.shape[0] % self.mesh.shape['data']
      widths = [(0, pad)] + [(0, 0)] * 3
      probs, masks, valid = jnp.pad(probs, widths), jnp.pad(masks, widths), jnp.pad(valid, [(0, pad)])
      rows = NamedSharding(self.mesh, P('data'))
      probs, masks, valid = (jax.device_put(a, rows) for a in (probs, masks, valid))
    self.total = self._update(self.total, probs, masks, valid)

  def counts(self) -> np.ndarray:
    """The int64 histogram (2, C, T + 1), summed over all processes."""
    total = np.asarray(jax.device_get(self.total))
    if jax.process_count() == 1:
      return to_int64(total)
    stacked = multihost_utils.process_allgather(total)  # (processes, 2, 2, C, T + 1) uint32
    return sum(to_int64(t) for t in stacked)

  def result(self) -> dict:
    """The metrics dict of `scores` over everything counted so far."""
    return scores(*counts_from_histogram(self.counts()))


def score_maps(probs: Iterable, masks: Iterable, *, fine_thresholds: int = 1001) -> dict:
  """Scores probability maps against masks with the official protocol (see the module docstring).

  Args:
    probs: iterable of (H, W, 4) probability maps, channels EX, HE, SE, MA (any float dtype; used as
      float32).
    masks: iterable of (H, W, 4) boolean masks, the same sizes, in the same order.
    fine_thresholds: thresholds of the extra fine-grained AUPR column.

  Returns:
    The dict of `scores`: `aupr`, `iou`, `f1` (arrays of 4, fractions), `mAUPR`, `mIoU`, `mF1`,
    `aupr_fine`, `mAUPR_fine`, and the curves.
  """
  counts = PooledCounts(num_classes=len(CLASSES), fine_thresholds=fine_thresholds)
  num_images = 0
  for i, (prob, mask) in enumerate(zip(probs, masks, strict=True)):
    prob, mask = np.asarray(prob), np.asarray(mask)
    if prob.ndim != 3 or prob.shape[-1] != len(CLASSES) or mask.shape != prob.shape:
      raise ValueError(f'image {i}: expected a probability map and mask of one shape (H, W, 4), '
                       f'got {prob.shape} and {mask.shape}')
    counts.update(prob[None], mask[None] != 0)
    num_images += 1
  if not num_images:
    raise ValueError('score_maps() got no images')
  return counts.result()

