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
update scatter-adds the pixels of a batch into a histogram (image, negative/positive, class, bin) of
uint32 (one update must hold fewer than 2**32 pixels) and adds its sum over the images to an on-device
total of two uint32 words per bin (low word plus carry into the high word), i.e. exact 64-bit counts
without `jax_enable_x64` (IDRiD's test split has 27 x 12.2 M pixels per class). The host reads the total
once and works in int64. The per-image histograms (`image_scores`: the same formulas on one image's
pixels) stay on device until the end, 2 x 4 x 1002 uint32 (32 KB) an image; the pooled numbers are
their sum.
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
  # The nearest edge: a probability is at least half a bin (1 / (2 (T - 1))) above the edges below that
  # one and below the edges above it, far beyond float32 rounding, so only the comparison with the
  # nearest edge is in doubt, and it is made exactly (one gather; 0 <= nearest < T, so the gather needs
  # no bounds handling: promise_in_bounds is ~3x faster on CPU than the default clamp).
  scaled = jnp.round(probs * (num - 1))
  nearest = jnp.clip(jnp.where(jnp.isnan(scaled), 0, scaled), 0, num - 1).astype(jnp.int32)
  below = jnp.asarray(edges).at[nearest].get(mode='promise_in_bounds') < probs
  return jnp.where(jnp.isnan(probs), 0, nearest + below.astype(jnp.int32))


def _histogram(probs, masks, keep, edges):
  """`histogram` counting only the pixels where `keep` (broadcast to probs' shape) is True."""
  n, c = probs.shape[0], probs.shape[-1]
  bins = edges.shape[0] + 1
  k = bin_index(probs.astype(jnp.float32), edges)
  image = jnp.arange(n, dtype=jnp.int32)[:, None, None, None]
  index = ((image * 2 + masks.astype(jnp.int32)) * c + jnp.arange(c, dtype=jnp.int32)) * bins + k
  size = n * 2 * c * bins
  index = jnp.where(keep, index, size).ravel()  # dropped pixels go to an extra bin
  # An array of ones, not a scalar: XLA:CPU's scatter of a broadcast scalar measured slower.
  counts = jnp.zeros((size + 1,), jnp.uint32).at[index].add(
      jnp.ones(index.shape, jnp.uint32), mode='promise_in_bounds')
  return counts[:size].reshape(n, 2, c, bins)


def histogram(probs: jax.Array, masks: jax.Array, valid: jax.Array, edges: jax.Array) -> jax.Array:
  """Pixel counts per (image, negative/positive, class, bin) of one batch, uint32 (N, 2, C, T + 1).

  Args:
    probs: (N, H, W, C) probabilities.
    masks: (N, H, W, C) bool ground truth.
    valid: (N,) bool; False rows (batch padding) are not counted (their counts are 0).
    edges: (T,) float32 thresholds.
  """
  _check_pixels(probs.shape)
  return _histogram(probs, masks, valid[:, None, None, None], edges)


def _check_pixels(shape):
  n, h, w, _ = shape
  if n * h * w > MAX_PIXELS_PER_UPDATE:
    raise ValueError(f'one update counts at most 2**32 - 1 pixels per class, got {n}x{h}x{w}')


def band_windows(in_rows: int, out_rows: int, band_rows: int):
  """The row bands of a resize from `in_rows` to `out_rows` rows, and the input rows each one reads.

  Returns:
    (rows, window): `rows` = min(band_rows, out_rows) output rows per band, and the number of
    consecutive input rows that contains both taps of every band's rows.
  """
  rows = min(band_rows, out_rows)
  i0, i1, _, _ = layers.linear_taps(in_rows, out_rows)
  starts = np.minimum(np.arange(-(-out_rows // rows)) * rows, out_rows - rows)
  window = max(int(i1[s + rows - 1] - i0[s]) + 1 for s in starts)
  return rows, window


def resized_probs(logits: jax.Array, size, start, rows: int, window: int) -> jax.Array:
  """Rows [start, start + rows) of sigmoid(resize_bilinear(logits, size)): (N, rows, W, C) float32.

  Equal to `layers.resize_bilinear_rows` (the same taps, weights and order of operations), but each
  input row is widened once: the band's `window` input rows (`band_windows`) are resized along the
  width, then the output rows are interpolated from them.
  """
  h, w = size
  in_rows = logits.shape[1]
  taps = layers.linear_taps(in_rows, h)
  i0, i1, w0, w1 = (jnp.asarray(t) for t in taps)
  first = jnp.minimum(i0[start], in_rows - window)
  wide = layers.resize_bilinear(jax.lax.dynamic_slice_in_dim(logits, first, window, axis=1), (window, w))
  top, bottom = (jnp.take(wide, jax.lax.dynamic_slice_in_dim(i, start, rows) - first, axis=1)
                 for i in (i0, i1))
  w0, w1 = (jax.lax.dynamic_slice_in_dim(v, start, rows)[None, :, None, None] for v in (w0, w1))
  return jax.nn.sigmoid(top * w0 + bottom * w1)


def pack_masks(masks) -> np.ndarray:
  """(..., C) bool masks as uint8 bits (...), bit c for class c (C <= 8): what `count_resized` takes.

  A quarter of the bytes of the bool masks (IDRiD: 12 MB an image instead of 49 MB) to copy to the
  device and to hold there.
  """
  masks = np.asarray(masks, bool)
  if masks.shape[-1] > 8:
    raise ValueError(f'pack_masks packs at most 8 classes into a byte, got {masks.shape[-1]}')
  bits = np.zeros(masks.shape[:-1], np.uint8)
  for c in range(masks.shape[-1]):  # ~5x faster than np.packbits along a last axis of 4
    bits |= masks[..., c].view(np.uint8) << np.uint8(c)
  return bits


def unpack_masks(bits: jax.Array, num_classes: int) -> jax.Array:
  """`pack_masks` undone: uint8 bits (...) -> bool (..., num_classes)."""
  return (bits[..., None] >> jnp.arange(num_classes, dtype=jnp.uint8)) & 1 > 0


def resized_histogram(logits: jax.Array, mask_bits: jax.Array, valid: jax.Array, edges: jax.Array,
                      band_rows: int = 32) -> jax.Array:
  """`histogram` of sigmoid(resize_bilinear(logits, the masks' size)), `band_rows` rows at a time.

  The full-resolution probabilities never exist at once: each band of rows is interpolated from the
  logits, passed through the sigmoid and counted in one loop step (memory O(band_rows W C), not O(H W C);
  bands of 32 rows keep a band's temporaries in the CPU's cache).

  Args:
    logits: (N, h, w, C) logits at the network's input size.
    mask_bits: (N, H, W) uint8 ground truth at the original size, `pack_masks` of (N, H, W, C) masks.
    valid: (N,) bool; False rows are not counted.
    edges: (T,) float32 thresholds.

  Returns:
    (N, 2, C, T + 1) uint32, as `histogram`.
  """
  n, h, w = mask_bits.shape
  c = logits.shape[-1]
  _check_pixels((n, h, w, c))
  rows, window = band_windows(logits.shape[1], h, band_rows)
  logits = logits.astype(jnp.float32)

  def band(b, hist):
    start = jnp.minimum(b * rows, h - rows)  # the last band is shifted up to stay inside the map
    probs = resized_probs(logits, (h, w), start, rows, window)
    fresh = start + jnp.arange(rows) >= b * rows  # rows the previous band has not counted
    keep = valid[:, None, None, None] & fresh[None, :, None, None]
    band_masks = unpack_masks(jax.lax.dynamic_slice_in_dim(mask_bits, start, rows, axis=1), c)
    return hist + _histogram(probs, band_masks, keep, edges)

  zeros = jnp.zeros((n, 2, c, edges.shape[0] + 1), jnp.uint32)
  return jax.lax.fori_loop(0, -(-h // rows), band, zeros)


def add_counts(total: jax.Array, hist: jax.Array) -> jax.Array:
  """Adds a uint32 histogram to a two-word total (2, ...) = (low, high) uint32, with carry."""
  low = total[0] + hist
  high = total[1] + (low < hist).astype(jnp.uint32)
  return jnp.stack([low, high])


def count(total: jax.Array, probs: jax.Array, masks: jax.Array, valid: jax.Array, edges: jax.Array,
          axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds a batch to a two-word total (2, 2, C, T + 1); inside shard_map, sums over `axis_name` first.

  Args:
    total: the running two-word total.
    probs, masks, valid, edges: as `histogram` (this device's rows inside shard_map).
    axis_name: the mesh axis the batch is split over, or None.

  Returns:
    (the new total, the batch's per-image histograms (N, 2, C, T + 1) uint32 of `histogram`).
  """
  hist = histogram(probs, masks, valid, edges)
  return _add(total, hist, probs.shape, axis_name), hist


def count_resized(total: jax.Array, logits: jax.Array, mask_bits: jax.Array, valid: jax.Array,
                  edges: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """`count` of sigmoid(resize_bilinear(logits, the masks' size)) through `resized_histogram`.

  mask_bits: (N, H, W) uint8, `pack_masks` of the (N, H, W, C) bool masks.
  """
  hist = resized_histogram(logits, mask_bits, valid, edges)
  return _add(total, hist, mask_bits.shape, axis_name), hist


def _add(total, hist, shape, axis_name):
  """Adds the per-image histograms of a batch of `shape` to `total`, summed over `axis_name` first."""
  hist = jnp.sum(hist, axis=0, dtype=jnp.uint32)  # fewer than 2**32 pixels per update: exact
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
  """TP, P and FN at every threshold from an int64 histogram (..., 2, C, T + 1); each (T, ..., C) int64.

  hist is pooled (2, C, T + 1), giving (T, C), or per image (N, 2, C, T + 1), giving (T, N, C).
  """
  suffix = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]  # suffix[..., b] = sum over bins >= b
  tp = np.moveaxis(suffix[..., 1, :, 1:], -1, 0)  # bin b > k <=> prob > t_k
  predicted = np.moveaxis(suffix[..., 0, :, 1:] + suffix[..., 1, :, 1:], -1, 0)
  fn = suffix[..., 1, :, 0][None] - tp
  return tp, predicted, fn


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Trapezoid area under y(x) along axis 0, positive for monotonic x either way (sklearn auc)."""
  area = np.sum(np.diff(x, axis=0) * (y[1:] + y[:-1]) / 2, axis=0)
  return np.abs(area)


def _official(tp, predicted, fn) -> dict:
  """The official formulas on counts (T, ..., C) at T = 10 k + 1 thresholds; 0/0 left as NaN.

  Returns the curves `precision` (1 where P = 0) and `recall` (0 where undefined) (T, ..., C), and
  `aupr` (11 thresholds), `aupr_fine` (all T), `iou`, `f1`, `ppv`, `sensitivity` (at t = 0.5) (..., C).
  """
  tp, predicted, fn = (np.asarray(a, np.float64) for a in (tp, predicted, fn))
  num = check_fine_thresholds(tp.shape[0])
  every = (num - 1) // (NUM_THRESHOLDS - 1)
  t, p, f = tp[(num - 1) // 2], predicted[(num - 1) // 2], fn[(num - 1) // 2]
  with np.errstate(invalid='ignore', divide='ignore'):
    precision = np.nan_to_num(tp / predicted, nan=1.0)
    recall = np.nan_to_num(tp / (tp + fn), nan=0.0)
    return dict(precision=precision, recall=recall,
                aupr=trapezoid_area(recall[::every], precision[::every]),
                aupr_fine=trapezoid_area(recall, precision),
                iou=t / (p + f), f1=2 * t / (p + t + f), ppv=t / p, sensitivity=t / (t + f))


def scores(tp: np.ndarray, predicted: np.ndarray, fn: np.ndarray) -> dict:
  """The official scores from pooled counts (T, C) at T = 10 k + 1 thresholds linspace(0, 1, T).

  Returns:
    A dict of NumPy values: `aupr`, `iou`, `f1`, `ppv`, `sensitivity` (C,) at the official 11 thresholds
    and t = 0.5 (0/0 -> 0), their means `mAUPR`, `mIoU`, `mF1`; `aupr_fine` (C,) and `mAUPR_fine` on
    all T; the curves `precision`, `recall` (11, C) and `precision_fine`, `recall_fine` (T, C);
    `thresholds` (11,).
  """
  out = _official(tp, predicted, fn)
  iou, f1, ppv, sensitivity = (np.nan_to_num(out[k]) for k in ('iou', 'f1', 'ppv', 'sensitivity'))
  aupr, aupr_fine, precision, recall = (out[k] for k in ('aupr', 'aupr_fine', 'precision', 'recall'))
  every = (len(precision) - 1) // (NUM_THRESHOLDS - 1)
  return dict(
      aupr=aupr, iou=iou, f1=f1, ppv=ppv, sensitivity=sensitivity,
      mAUPR=float(aupr.mean()), mIoU=float(iou.mean()), mF1=float(f1.mean()),
      aupr_fine=aupr_fine, mAUPR_fine=float(aupr_fine.mean()),
      precision=precision[::every], recall=recall[::every],
      precision_fine=precision, recall_fine=recall,
      thresholds=thresholds(NUM_THRESHOLDS))


def image_scores(hist: np.ndarray) -> dict:
  """The official formulas on each image's own pixels, from per-image int64 histograms (N, 2, C, T + 1).

  Returns:
    (N, C) arrays: float64 `aupr` (11 thresholds), `aupr_fine` (all T), `iou` and `f1` (at prob > 0.5;
    F1 = 2 TP / (2 TP + FP + FN) is the image's Dice), int64 `predicted` (pixels with prob > 0.5) and
    `true` (ground-truth pixels). Where the pooled scores write 0 for 0/0, these are NaN: the AUPR of a
    class the image has no pixel of (recall undefined at every threshold), and IoU and F1 where it has
    none and none is predicted.
  """
  tp, predicted, fn = counts_from_histogram(hist)
  out = _official(tp, predicted, fn)
  half = (len(tp) - 1) // 2
  true = tp[0] + fn[0]
  aupr, aupr_fine = (np.where(true > 0, out[k], np.nan) for k in ('aupr', 'aupr_fine'))
  return dict(aupr=aupr, aupr_fine=aupr_fine, iou=out['iou'], f1=out['f1'],
              predicted=predicted[half], true=true)


class PooledCounts:
  """Streaming counts on device, pooled and per image; `update` per batch, `result` at the end.

  With a mesh (of this process's devices), batches are split over its 'data' axis (rows padded to a
  multiple of its size), each device counts its rows and the histograms are summed with a psum. Across
  processes, `counts`, `result` and `per_image` gather every process's counts (each process counts its
  own images, any number of them; all processes must call them).
  """

  def __init__(self, num_classes: int = 4, fine_thresholds: int = 1001,
               mesh: jax.sharding.Mesh | None = None):
    self.num_classes = num_classes
    self.edges = jnp.asarray(float32_thresholds(check_fine_thresholds(fine_thresholds)))
    self.mesh = mesh
    self.images = []  # (ids, per-image histograms (N, 2, C, T + 1) uint32 on device, valid (N,))
    shape = (2, 2, num_classes, fine_thresholds + 1)
    if mesh is None:
      self.total = jnp.zeros(shape, jnp.uint32)
      self._update = jax.jit(self._local_update, donate_argnums=0)
    else:
      self.total = jax.device_put(jnp.zeros(shape, jnp.uint32), NamedSharding(mesh, P()))
      sharded = jax.shard_map(self._sharded_update, mesh=mesh,
                              in_specs=(P(), P('data'), P('data'), P('data')),
                              out_specs=(P(), P('data')))
      self._update = jax.jit(sharded, donate_argnums=0)

  def _local_update(self, total, probs, masks, valid):
    return count(total, probs, masks, valid, self.edges)

  def _sharded_update(self, total, probs, masks, valid):
    return count(total, probs, masks, valid, self.edges, 'data')

  def update(self, probs, masks, valid=None, ids=None) -> None:
    """Counts one batch: probs (N, H, W, C) float, masks (N, H, W, C) bool, valid (N,) bool or None.

    `ids` name the valid rows, in order (default: their numbers in the order counted).
    """
    probs = jnp.asarray(probs, jnp.float32)
    masks = jnp.asarray(masks, bool)
    if probs.ndim != 4 or probs.shape[-1] != self.num_classes or masks.shape != probs.shape:
      raise ValueError(f'expected probabilities and masks of one shape (N, H, W, {self.num_classes}), '
                       f'got {probs.shape} and {masks.shape}')
    valid = np.ones(probs.shape[:1], bool) if valid is None else np.asarray(valid, bool)
    if self.mesh is not None:
      pad = -probs.shape[0] % self.mesh.shape['data']
      widths = [(0, pad)] + [(0, 0)] * 3
      probs, masks, valid = jnp.pad(probs, widths), jnp.pad(masks, widths), np.pad(valid, [(0, pad)])
      rows = NamedSharding(self.mesh, P('data'))
      probs, masks, valid = (jax.device_put(a, rows) for a in (probs, masks, valid))
    self.total, hist = self._update(self.total, probs, masks, valid)
    self.add_images(hist, valid, ids)

  def add_images(self, hist: jax.Array, valid, ids=None) -> None:
    """Keeps the per-image histograms `hist` (N, 2, C, T + 1) of the `valid` (N,) rows, named `ids`."""
    valid = np.asarray(valid, bool)
    counted = sum(int(v.sum()) for _, _, v in self.images)
    ids = [str(counted + i) for i in range(int(valid.sum()))] if ids is None else list(ids)
    if len(ids) != valid.sum():
      raise ValueError(f'{len(ids)} ids for {int(valid.sum())} valid rows')
    self.images.append((ids, hist, valid))

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

  def per_image(self) -> tuple[list[str], np.ndarray]:
    """The ids and int64 histograms (N, 2, C, T + 1) of every image counted, over all processes.

    Images come in the order counted; with several processes, image j of every process (in process
    order) before image j + 1 of any: the split's order for `pipeline.eval_dataset`'s shares.
    """
    ids = [i for batch_ids, _, _ in self.images for i in batch_ids]
    shape = (0, 2, self.num_classes, self.edges.shape[0] + 1)
    hist = np.concatenate([np.zeros(shape, np.int64)] + [
        np.asarray(jax.device_get(h))[v].astype(np.int64) for _, h, v in self.images])
    if jax.process_count() == 1:
      return ids, hist
    return _interleave_processes(ids, hist)

  def image_result(self) -> dict:
    """`image_scores` of every image counted (over all processes), with their `ids`."""
    ids, hist = self.per_image()
    return dict(ids=ids, **image_scores(hist))


def _interleave_processes(ids, hist):
  """Every process's (ids, hist (n, ...)), image j of each process before image j + 1 of any."""
  sizes = multihost_utils.process_allgather(np.array(len(ids)))
  encoded = [i.encode() for i in ids]
  width = int(multihost_utils.process_allgather(np.array(max(map(len, encoded), default=0))).max())
  most = int(sizes.max())
  names = np.zeros((most, width), np.uint8)
  for row, name in enumerate(encoded):
    names[row, :len(name)] = np.frombuffer(name, np.uint8)
  padded = np.zeros((most,) + hist.shape[1:], np.int64)
  padded[:len(hist)] = hist
  all_names = multihost_utils.process_allgather(names)  # (processes, most, width)
  all_hist = multihost_utils.process_allgather(padded)
  order = [(p, j) for j in range(most) for p in range(len(sizes)) if j < sizes[p]]
  return ([bytes(all_names[p, j]).rstrip(b'\0').decode() for p, j in order],
          np.stack([all_hist[p, j] for p, j in order]) if order else hist[:0])


def score_maps(probs: Iterable, masks: Iterable, *, fine_thresholds: int = 1001) -> dict:
  """Scores probability maps against masks with the official protocol (see the module docstring).

  Args:
    probs: iterable of (H, W, 4) probability maps, channels EX, HE, SE, MA (any float dtype; used as
      float32).
    masks: iterable of (H, W, 4) boolean masks, the same sizes, in the same order.
    fine_thresholds: thresholds of the extra fine-grained AUPR column.

  Returns:
    The dict of `scores`: `aupr`, `iou`, `f1` (arrays of 4, fractions), `mAUPR`, `mIoU`, `mF1`,
    `aupr_fine`, `mAUPR_fine`, and the curves; and `per_image`, the dict of `image_scores` with `ids`
    (the images' numbers in order, '0', '1', ...).
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
  return dict(counts.result(), per_image=counts.image_result())

