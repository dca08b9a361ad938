"""The streaming metrics against an independent NumPy statement of the official my_metrics.py."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from sklearn.metrics import auc

from m2mrf_jax import layers
from m2mrf_jax import metrics


def official_metrics(probs, labels, num_thresholds=11):
  """my_metrics.sigmoid_metrics + metrics() for label maps {0 bg, 1 EX, 2 HE, 3 SE, 4 MA}.

  Thresholds compared in float32, as NumPy < 1.24 did for a float32 array against a float64 scalar.
  """
  threshs = np.linspace(0, 1, num_thresholds)
  tp = np.zeros((num_thresholds, 4))
  pos = np.zeros((num_thresholds, 4))
  fn = np.zeros((num_thresholds, 4))
  for k, thresh in enumerate(threshs):
    for prob, label in zip(probs, labels):
      for i in range(1, 5):
        pred = prob[..., i - 1] > np.float32(thresh)
        gt = label == i
        tp[k, i - 1] += np.sum(gt & pred)
        pos[k, i - 1] += np.sum(pred)
        fn[k, i - 1] += np.sum(gt) - np.sum(gt & pred)
  with np.errstate(invalid='ignore', divide='ignore'):
    ppv = np.nan_to_num(tp / pos, nan=1)
    sens = np.nan_to_num(tp / (tp + fn), nan=0)
    half = int(np.argmax(threshs == 0.5))
    iou = np.nan_to_num(tp[half] / (pos[half] + fn[half]), nan=0)
    f1 = np.nan_to_num(2 * tp[half] / (pos[half] + tp[half] + fn[half]), nan=0)
  aupr = np.array([auc(sens[:, c], ppv[:, c]) for c in range(4)])
  return dict(aupr=aupr, iou=iou, f1=f1)


def one_hot(label):
  return np.stack([label == i for i in range(1, 5)], axis=-1)


def random_case(seed, sizes):
  """Probability maps with values on and next to the thresholds; SE empty; MA predicted everywhere."""
  rng = np.random.default_rng(seed)
  probs, labels = [], []
  for h, w in sizes:
    prob = rng.random((h, w, 4), dtype=np.float32) ** 3
    grid = rng.random((h, w, 4)) < 0.3
    prob = np.where(grid, np.round(prob * 20).astype(np.float32) / np.float32(20), prob)  # on thresholds
    prob[..., 3] = 1.0  # all-positive predictions for MA (but not > 1)
    label = rng.choice([0, 1, 2, 4], size=(h, w), p=[0.85, 0.08, 0.05, 0.02])  # no SE anywhere
    probs.append(prob)
    labels.append(label)
  return probs, labels


def test_bin_index_is_exact_next_to_every_threshold():
  for num in (11, 1001):
    edges = metrics.float32_thresholds(num)
    up = np.nextafter(edges, np.float32(2))
    up[0] = np.finfo(np.float32).tiny  # XLA flushes subnormals to zero
    down = np.nextafter(edges, np.float32(-1))
    special = np.array([0, 1, -0.5, 1.5, 1e-30, np.inf, -np.inf], np.float32)
    rand = np.random.default_rng(0).random(5000, dtype=np.float32)
    probs = np.concatenate([edges, up, down, special, rand, [np.nan]]).astype(np.float32)
    expected = np.searchsorted(edges, probs, side='left')
    expected[-1] = 0  # NaN is never above a threshold
    got = np.asarray(metrics.bin_index(probs, edges))
    np.testing.assert_array_equal(got, expected)


def test_float32_thresholds_match_numpy_float32_comparison():
  edges = metrics.float32_thresholds(11)
  probs = np.random.default_rng(1).random(10000, dtype=np.float32)
  for t, t32 in zip(np.linspace(0, 1, 11), edges):
    np.testing.assert_array_equal(probs > t32, probs > np.float32(t))
  np.testing.assert_array_equal(edges, metrics.float32_thresholds(1001)[::100])


def test_evaluate_matches_official_protocol():
  probs, labels = random_case(0, [(17, 23), (20, 11), (9, 31)])
  got = metrics.score_maps(probs, [one_hot(l) for l in labels])
  want = official_metrics(probs, labels)
  for key in ('aupr', 'iou', 'f1'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0)
  assert got['mAUPR'] == pytest.approx(want['aupr'].mean(), rel=1e-12)
  assert got['mIoU'] == pytest.approx(want['iou'].mean(), rel=1e-12)
  assert got['mF1'] == pytest.approx(want['f1'].mean(), rel=1e-12)
  # The empty class: recall 0 at every threshold, so area 0; IoU and F1 0/0 -> 0.
  assert got['aupr'][2] == 0 and got['iou'][2] == 0 and got['f1'][2] == 0
  # MA predicted positive everywhere: IoU = positives / all pixels.
  num_pixels = sum(l.size for l in labels)
  num_ma = sum(np.sum(l == 4) for l in labels)
  assert got['iou'][3] == pytest.approx(num_ma / num_pixels, rel=1e-12)
  fine = official_metrics(probs, labels, num_thresholds=1001)
  np.testing.assert_allclose(got['aupr_fine'], fine['aupr'], rtol=1e-12)
  assert got['mAUPR_fine'] == pytest.approx(fine['aupr'].mean(), rel=1e-12)


def test_per_image_scores_match_the_official_formulas_on_each_image():
  probs, labels = random_case(11, [(17, 23), (20, 11), (9, 31), (12, 12)])
  probs[3][..., 2] = 0.25  # SE: no pixel anywhere, and none predicted in the last image
  labels[1][labels[1] == 2] = 0  # no HE in the second image (HE still predicted there)
  got = metrics.score_maps(probs, [one_hot(l) for l in labels])['per_image']
  assert got['ids'] == ['0', '1', '2', '3']
  for i, (prob, label) in enumerate(zip(probs, labels)):
    want, fine = official_metrics([prob], [label]), official_metrics([prob], [label], 1001)
    pred = prob > np.float32(0.5)
    truth = one_hot(label)
    tp, fp, fn = (np.sum(a, axis=(0, 1)) for a in (pred & truth, pred & ~truth, ~pred & truth))
    present = truth.any(axis=(0, 1))
    np.testing.assert_allclose(got['aupr'][i][present], want['aupr'][present], rtol=1e-12, atol=0)
    np.testing.assert_allclose(got['aupr_fine'][i][present], fine['aupr'][present], rtol=1e-12, atol=0)
    assert np.isnan(got['aupr'][i][~present]).all() and np.isnan(got['aupr_fine'][i][~present]).all()
    with np.errstate(invalid='ignore'):
      np.testing.assert_allclose(got['iou'][i], tp / (tp + fp + fn), rtol=1e-12, atol=0)
      np.testing.assert_allclose(got['f1'][i], 2 * tp / (2 * tp + fp + fn), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got['predicted'][i], pred.sum(axis=(0, 1)))
    np.testing.assert_array_equal(got['true'][i], truth.sum(axis=(0, 1)))
  assert not np.isnan(got['iou'][:3, 2]).any() and (got['iou'][:3, 2] == 0).all()  # SE predicted: 0
  assert np.isnan(got['iou'][3, 2]) and np.isnan(got['f1'][3, 2])  # nothing true, nothing predicted
  assert np.isnan(got['aupr'][1, 1]) and got['predicted'][1, 1] > 0 and got['iou'][1, 1] == 0


def test_pooled_counts_are_the_sum_of_the_per_image_counts():
  probs, labels = random_case(12, [(10, 14)] * 3)
  counter = metrics.PooledCounts()
  counter.update(np.stack(probs[:2]), np.stack([one_hot(l) for l in labels[:2]]), ids=['a', 'b'])
  counter.update(probs[2][None], one_hot(labels[2])[None], ids=['c'])
  ids, hist = counter.per_image()
  assert ids == ['a', 'b', 'c'] and hist.shape == (3, 2, 4, 1002) and hist.dtype == np.int64
  np.testing.assert_array_equal(hist.sum(axis=0), counter.counts())
  for i in range(3):  # each image's row is its own histogram
    alone = metrics.PooledCounts()
    alone.update(probs[i][None], one_hot(labels[i])[None])
    np.testing.assert_array_equal(hist[i], alone.counts())
  with pytest.raises(ValueError, match='1 ids for 2 valid rows'):
    counter.update(np.stack(probs[:2]), np.stack([one_hot(l) for l in labels[:2]]), ids=['d'])


def test_multilabel_masks_count_every_class():
  rng = np.random.default_rng(3)
  probs = [rng.random((12, 14, 4), dtype=np.float32) for _ in range(2)]
  masks = [rng.random((12, 14, 4)) < 0.2 for _ in range(2)]  # overlapping classes
  got = metrics.score_maps(probs, masks, fine_thresholds=11)
  for c in range(4):
    labels = [np.where(m[..., c], c + 1, 0) for m in masks]
    want = official_metrics(probs, labels)
    assert got['aupr'][c] == pytest.approx(want['aupr'][c], rel=1e-12)
    assert got['iou'][c] == pytest.approx(want['iou'][c], rel=1e-12)


def test_streaming_over_images_equals_all_pixels_at_once():
  probs, labels = random_case(5, [(16, 10), (16, 7), (16, 13), (16, 5)])
  masks = [one_hot(l) for l in labels]
  streamed = metrics.score_maps(probs, masks)
  at_once = metrics.score_maps([np.concatenate(probs, axis=1)], [np.concatenate(masks, axis=1)])
  del at_once['per_image'], streamed['per_image']  # four images against one
  for key, value in at_once.items():
    np.testing.assert_array_equal(streamed[key], value, err_msg=key)


def test_banded_resized_histogram_equals_resize_then_histogram():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 9, 13, 4)).astype(np.float32) * 3
  masks = rng.random((2, 24, 31, 4)) < 0.2
  valid = np.array([True, False])
  edges = metrics.float32_thresholds(101)
  probs = jax.nn.sigmoid(layers.resize_bilinear(logits, (24, 31)))
  expected = np.asarray(metrics.histogram(probs, masks, valid, edges)).astype(np.int64)
  bits = metrics.pack_masks(masks)
  np.testing.assert_array_equal(bits, np.sum(masks << np.arange(4), axis=-1))  # bit c: class c
  np.testing.assert_array_equal(metrics.unpack_masks(bits, 4), masks)
  for band_rows in (7, 24, 64):  # a shifted last band (rows 17-23, of which 21-23 new), one, clipped
    got = np.asarray(metrics.resized_histogram(logits, bits, valid, edges, band_rows))
    assert got.sum() == 24 * 31 * 4
    # float32 rounding of the fused interpolation may move a value across an edge
    assert np.abs(got.astype(np.int64) - expected).sum() <= 4, band_rows


@pytest.mark.parametrize('in_rows,out_rows,band_rows', [(9, 24, 7), (9, 24, 32), (31, 13, 4), (13, 13, 5)])
def test_windowed_band_equals_resize_bilinear_rows(in_rows, out_rows, band_rows):
  """Widening only a band's input rows gives layers.resize_bilinear_rows' values bit for bit."""
  logits = np.random.default_rng(4).normal(size=(2, in_rows, 6, 4)).astype(np.float32) * 4
  rows, window = metrics.band_windows(in_rows, out_rows, band_rows)
  assert window <= in_rows
  band = jax.jit(metrics.resized_probs, static_argnums=(1, 3, 4))
  reference = jax.jit(  # jitted as well: eager ops round the sigmoid differently (1 ulp)
      lambda x, start: jax.nn.sigmoid(layers.resize_bilinear_rows(x, (out_rows, 17), start, rows)))
  for start in sorted({min(b * rows, out_rows - rows) for b in range(-(-out_rows // rows))}):
    np.testing.assert_array_equal(band(logits, (out_rows, 17), start, rows, window),
                                  reference(logits, start))


def test_sharded_update_on_8_devices_equals_single_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',))
  probs, labels = random_case(7, [(12, 15)] * 5)  # 5 rows: padded to 8 on the mesh
  probs, masks = np.stack(probs), np.stack([one_hot(l) for l in labels])
  valid = np.array([True, True, False, True, True])
  single, sharded = metrics.PooledCounts(), metrics.PooledCounts(mesh=mesh)
  for counter in (single, sharded):
    counter.update(probs, masks, valid)
    counter.update(probs[:1], masks[:1])
  np.testing.assert_array_equal(sharded.counts(), single.counts())
  # And both equal the counts of the valid images alone.
  reference = metrics.PooledCounts()
  reference.update(probs[valid], masks[valid])
  reference.update(probs[:1], masks[:1])
  np.testing.assert_array_equal(single.counts(), reference.counts())
  assert single.counts().sum() == (4 + 1) * 12 * 15 * 4
  for got in (single.per_image(), sharded.per_image()):  # the 4 valid rows, then the first again
    assert got[0] == ['0', '1', '2', '3', '4']
    np.testing.assert_array_equal(got[1], reference.per_image()[1])


def test_two_word_counts_are_exact_past_32_bits():
  low = np.array([2**32 - 5, 7, 2**32 - 1], np.uint32)
  high = np.array([0, 3, 9], np.uint32)
  hist = np.array([10, 2**32 - 1, 1], np.uint32)
  total = metrics.add_counts(np.stack([low, high]), hist)
  expected = [int(lo) + (int(hi) << 32) + int(h) for lo, hi, h in zip(low, high, hist)]
  assert metrics.to_int64(total).tolist() == expected


def test_counts_from_histogram_matches_thresholding():
  rng = np.random.default_rng(2)
  probs = rng.random((1, 30, 40, 4), dtype=np.float32)
  masks = rng.random((1, 30, 40, 4)) < 0.3
  counter = metrics.PooledCounts(fine_thresholds=11)
  counter.update(probs, masks)
  tp, pos, fn = metrics.counts_from_histogram(counter.counts())
  edges = metrics.float32_thresholds(11)
  pred = probs[0][None] > edges[:, None, None, None]  # (11, H, W, 4)
  np.testing.assert_array_equal(tp, np.sum(pred & masks[0], axis=(1, 2)))
  np.testing.assert_array_equal(pos, np.sum(pred, axis=(1, 2)))
  np.testing.assert_array_equal(fn, np.sum(~pred & masks[0], axis=(1, 2)))


def test_bad_input_is_reported():
  prob = np.zeros((4, 5, 4), np.float32)
  with pytest.raises(ValueError, match='image 1'):
    metrics.score_maps([prob, prob], [prob > 0, np.zeros((4, 6, 4), bool)])
  with pytest.raises(ValueError, match='shorter|longer'):
    metrics.score_maps([prob, prob], [prob > 0])
  with pytest.raises(ValueError, match='no images'):
    metrics.score_maps([], [])
  with pytest.raises(ValueError, match='aupr_fine_thresholds'):
    metrics.PooledCounts(fine_thresholds=100)


def test_updates_past_2_to_the_32_pixels_are_refused():
  edges = metrics.float32_thresholds(11)
  big = jax.ShapeDtypeStruct((1, 70000, 70000, 4), np.float32)
  with pytest.raises(ValueError, match='2\\*\\*32'):
    jax.eval_shape(metrics.histogram, big, big.update(dtype=bool), jax.ShapeDtypeStruct((1,), bool), edges)
  # 8 devices of 25000 x 25000 pixels each: fine per device (6.3e8), too many after the psum (5e9).
  mesh = jax.make_mesh((8,), ('data',))
  split, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  total = jax.ShapeDtypeStruct((2, 2, 4, 12), np.uint32, sharding=replicated)
  rows = jax.ShapeDtypeStruct((8, 25000, 25000, 4), np.float32, sharding=split)
  valid = jax.ShapeDtypeStruct((8,), bool, sharding=split)
  update = jax.shard_map(lambda t, p, m, v: metrics.count(t, p, m, v, edges, 'data'), mesh=mesh,
                         in_specs=(P(), P('data'), P('data'), P('data')), out_specs=P())
  with pytest.raises(ValueError, match="over the 'data' axis"):
    jax.eval_shape(update, total, rows, rows.update(dtype=bool), valid)
