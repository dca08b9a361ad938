"""visualize: fills against a NumPy alpha blend, contours against a NumPy erosion, the cluster finder on
planted clusters, the side-by-side picture's layout."""
import cv2
import numpy as np
import pytest

from m2mrf_jax import visualize


def boundary(mask):
  """NumPy: the mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
  p = np.pad(mask, 1)
  inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


def blobs(rng, size, count, radius=6, noise=0.0):
  """bool (h, w): filled ellipses (some touching the border), plus isolated pixels at rate `noise`."""
  mask = np.zeros(size, np.uint8)
  for _ in range(count):
    centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
    axes = (int(rng.integers(0, radius)), int(rng.integers(0, radius)))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
  return mask.astype(bool) | (rng.random(size) < noise)


def test_fill_is_the_alpha_blend():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  label = rng.integers(0, 5, (30, 40))  # 0: none, k: class k - 1; no overlaps
  masks = np.stack([label == k for k in range(1, 5)], -1)
  got = visualize.overlay(image, masks, 'fill', alpha=0.25)  # exact in float32 and float64
  colour = np.concatenate([[[0, 0, 0]], visualize.COLORS]).astype(np.float64)[label]
  want = np.where(label[..., None] > 0, np.round(0.75 * image + 0.25 * colour), image)
  np.testing.assert_array_equal(got, want)


def test_contours_lie_on_the_mask_boundary_and_keep_the_inside():
  rng = np.random.default_rng(1)
  for trial in range(20):
    size = tuple(rng.integers(8, 50, 2))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    masks = np.stack([blobs(rng, size, 4, noise=0.05 * (trial % 2)) for _ in range(4)], -1)
    want = image.copy()
    for c in range(4):  # later classes on top
      want[boundary(masks[..., c])] = visualize.COLORS[c]
    np.testing.assert_array_equal(visualize.overlay(image, masks), want)
  inside = np.zeros((9, 9, 4), bool)
  inside[2:7, 2:7, 3] = True
  out = visualize.overlay(np.full((9, 9, 3), 50, np.uint8), inside)
  np.testing.assert_array_equal(out[3:6, 3:6], 50)  # the retina shows inside a lesion
  np.testing.assert_array_equal(out[2, 2:7], [visualize.COLORS[3]] * 5)


def test_overlay_rejects_a_bad_style_or_shape():
  with pytest.raises(ValueError, match="style must be one of.*'solid'"):
    visualize.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 4), bool), 'solid')
  with pytest.raises(ValueError, match=r'\(3, 2, 4\)'):
    visualize.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2, 4), bool))


def test_any_pool_keeps_every_lesion_pixel():
  rng = np.random.default_rng(2)
  masks = rng.random((47, 61, 4)) < 0.01
  got = visualize.any_pool(masks, (7, 9))
  want = np.zeros((7, 9, 4), bool)
  for i in range(7):
    for j in range(9):
      cell = masks[i * 47 // 7:(i + 1) * 47 // 7, j * 61 // 9:(j + 1) * 61 // 9]
      want[i, j] = cell.any(axis=(0, 1))
  np.testing.assert_array_equal(got, want)
  one = np.zeros((60, 60), bool)
  one[31, 17] = True  # a one-pixel microaneurysm survives a 6x reduction (nearest would drop it)
  assert visualize.any_pool(one, (10, 10))[5, 2] and visualize.any_pool(one, (10, 10)).sum() == 1
  assert not cv2.resize(one.astype(np.uint8), (10, 10), interpolation=cv2.INTER_NEAREST).any()
  # Upscaling is OpenCV's nearest.
  np.testing.assert_array_equal(
      visualize.any_pool(masks[..., 0], (100, 130)),
      cv2.resize(masks[..., 0].astype(np.uint8), (130, 100), interpolation=cv2.INTER_NEAREST) > 0)


def dots(mask, centres, side=2):
  for y, x in centres:
    mask[y:y + side, x:x + side] = True


def test_largest_cluster_finds_a_planted_cluster():
  mask = np.zeros((200, 300), bool)
  scattered = [(10, 10), (10, 100), (10, 200), (60, 280), (190, 20), (190, 150), (120, 20)]
  dots(mask, scattered)  # isolated 2x2 microaneurysms, >= 40 px apart
  cluster = [(100, 150), (104, 158), (110, 152), (98, 162), (106, 146)]  # 5 x 4 px, 6-10 px apart
  dots(mask, cluster)
  dots(mask, [(160, 240)], side=4)  # one isolated 16 px lesion: larger than any dot, smaller than 20
  y, x, h, w = visualize.largest_cluster(mask, radius=4)
  assert (y, x, h, w) == (98 - 4, 146 - 4, 112 - 98 + 8, 164 - 146 + 8)  # the dots' box grown by 4
  assert mask[y:y + h, x:x + w].sum() == 20  # the cluster, nothing else
  # Without dilation every dot is its own cluster: the 4x4 lesion is the largest.
  assert visualize.largest_cluster(mask, radius=0) == (160, 240, 4, 4)
  assert visualize.largest_cluster(np.zeros((5, 5), bool), radius=2) is None
  pair = np.zeros((20, 30), bool)
  pair[5, [5, 12, 20]] = True  # 7 = 2 radius + 1 apart joins, 8 does not
  assert visualize.largest_cluster(pair, radius=3) == (2, 2, 7, 14)


def test_zoom_box_falls_back_to_the_prediction_then_the_centre():
  truth = np.zeros((100, 120, 4), bool)
  predicted = np.zeros_like(truth)
  assert visualize.zoom_box(truth, predicted, 20) == (40, 50, 20, 20)  # nothing: the centre
  dots(predicted[..., 3], [(30, 30), (33, 34)])
  truth[..., 0] = True  # other classes do not count
  assert visualize.zoom_box(truth, predicted, 20) == (22, 23, 20, 20)  # box rows 28-36, cols 28-37
  dots(truth[..., 3], [(1, 115)])
  assert visualize.zoom_box(truth, predicted, 20) == (0, 100, 20, 20)  # truth first, moved inside
  assert visualize.zoom_box(truth[:10], predicted[:10], 20) == (0, 100, 10, 20)  # clipped


def test_picture_layout_views_and_zoom():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)  # the test scale: half the original
  truth = np.stack([blobs(rng, (120, 180), 5) for _ in range(4)], -1)
  truth[..., 3] = False
  dots(truth[..., 3], [(80, 40), (84, 45), (79, 47)])  # the microaneurysm cluster
  predicted = np.stack([blobs(rng, (120, 180), 5) for _ in range(4)], -1)
  got = visualize.picture(image, truth, predicted, title='IDRiD_01', width=45, zoom=3)
  gap, header = visualize.GAP, visualize.HEADER
  view, side = (30, 45), (30 - gap) // 2  # width 45: views of a quarter of the original; 13 px squares
  crop = side // 3  # 4 original pixels, shown 12 x 12
  assert got.shape == (header + 30, 3 * 45 + side + 3 * gap, 3)
  y, x, h, w = visualize.zoom_box(truth, predicted, crop)
  assert (h, w) == (4, 4) and truth[y:y + h, x:x + w, 3].any()
  body = got[header:]
  small = cv2.resize(image, (45, 30), interpolation=cv2.INTER_AREA)
  rect = np.zeros(view, bool)  # the zoom's place on the views: the original box / 4, rounded outward
  rect[y // 4:-(-(y + h) // 4), x // 4:-(-(x + w) // 4)] = True
  edge = boundary(rect)
  for k, masks in enumerate([None, truth, predicted]):
    tile = body[:, k * (45 + gap):k * (45 + gap) + 45]
    want = small if masks is None else visualize.overlay(small, visualize.any_pool(masks, view))
    np.testing.assert_array_equal(tile[~edge], want[~edge])
    np.testing.assert_array_equal(tile[edge], np.full((edge.sum(), 3), 255))
    np.testing.assert_array_equal(body[:, k * (45 + gap) + 45:(k + 1) * (45 + gap)], 255)  # the gap
  column = body[:, 3 * (45 + gap):]
  full = cv2.resize(image, (180, 120), interpolation=cv2.INTER_LINEAR)[y:y + h, x:x + w]
  full = full.repeat(3, 0).repeat(3, 1)
  for top, masks in [(0, truth), (side + gap, predicted)]:
    square = column[top:top + side]
    want = visualize.overlay(full, masks[y:y + h, x:x + w].repeat(3, 0).repeat(3, 1))
    np.testing.assert_array_equal(square[:12, :12], want)
    np.testing.assert_array_equal(square[12:], 0)  # the 13th row and column stay black
    np.testing.assert_array_equal(square[:, 12:], 0)
  np.testing.assert_array_equal(column[side:side + gap], 255)
  assert got[:header].max() > 0  # the titles are written


def test_picture_views_are_never_upscaled():
  image = np.zeros((16, 24, 3), np.uint8)
  masks = np.zeros((32, 48, 4), bool)
  got = visualize.picture(image, masks, masks, width=640)
  assert got.shape == (visualize.HEADER + 16, 3 * 24 + 6 + 3 * visualize.GAP, 3)
