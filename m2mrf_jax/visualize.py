"""Pictures: lesion overlays in the paper's colours, side-by-side evaluation pictures, PR curves."""
import cv2
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from data_pipelines.lesions import CLASSES

# The paper's figures (Figs. 1, 5, 6) delineate EX red, HE green, SE yellow, MA blue (channel order
# EX, HE, SE, MA).
COLORS = np.array([(255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255)], np.uint8)
STYLES = ('contour', 'fill')
MA = CLASSES.index('MA')
HEADER = 22  # rows of the title strip above each column of a picture
GAP = 4  # white pixels between the columns of a picture, and between the two zoom squares
WHITE = (255, 255, 255)


def overlay(image: np.ndarray, masks: np.ndarray, style: str = 'contour', alpha: float = 0.5) -> np.ndarray:
  """Lesion masks drawn on an image: uint8 (H, W, 3) and bool (H, W, 4) -> uint8 (H, W, 3).

  style 'contour' (default, as the paper's figures delineate lesions): every lesion's outline, the
  mask pixels with a 4-neighbour outside the mask (or the image), 1 px in the class colour
  (cv2.findContours / drawContours); the photograph stays visible inside. 'fill': the class colour
  blended at opacity `alpha`, (1 - alpha) * pixel + alpha * colour (1 = solid). Classes are drawn in
  the order EX, HE, SE, MA, so where they meet the later one shows (as the official label merge).
  """
  if image.shape[:2] != masks.shape[:2] or masks.shape[-1] != len(COLORS):
    raise ValueError(f'overlay needs an image (H, W, 3) and masks (H, W, 4), got {image.shape} and '
                     f'{masks.shape}')
  if style not in STYLES:
    raise ValueError(f'overlay style must be one of {STYLES}, got {style!r}')
  if style == 'fill':
    out = image.astype(np.float32)
    for c, color in enumerate(COLORS):
      where = masks[..., c]
      out[where] = (1 - alpha) * out[where] + alpha * color
    return np.round(out).astype(np.uint8)
  out = np.array(image, np.uint8, order='C')
  for c, color in enumerate(COLORS):
    contours, _ = cv2.findContours(masks[..., c].astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color.tolist(), 1)
  return out


def any_pool(masks: np.ndarray, size) -> np.ndarray:
  """bool (H, W, ...) -> (h, w, ...): True where any pixel of the cell is, so no tiny lesion vanishes.

  Cell (i, j) covers rows floor(i H / h) .. floor((i + 1) H / h) - 1 (at least one row; upscaling
  is then OpenCV's nearest rule), and likewise the columns.
  """
  rows = np.arange(size[0] + 1) * masks.shape[0] // size[0]
  # Row by row: np.logical_or.reduceat along axis 0 is ~8x slower on a (2848, 4288, 4) mask.
  pooled = np.stack([masks[a:max(b, a + 1)].any(0) for a, b in zip(rows[:-1], rows[1:])])
  return np.logical_or.reduceat(pooled, np.arange(size[1]) * masks.shape[1] // size[1], axis=1)


def largest_cluster(mask: np.ndarray, radius: int):
  """The box (y, x, h, w) of the largest cluster of a bool (H, W) mask, or None if it is empty.

  A cluster is an 8-connected component of the mask dilated by a (2 radius + 1)-pixel square
  (cv2.connectedComponentsWithStats), so mask pixels at most 2 radius + 1 apart in rows and in columns
  join one; the largest holds the most mask pixels (ties: the first in row-major order). The box is that dilated
  component's bounding box (the cluster's pixels grown by `radius`, clipped to the image).
  """
  if not mask.any():
    return None
  kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
  _, labels, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(mask.astype(np.uint8), kernel),
                                                         connectivity=8)
  best = np.argmax(np.bincount(labels[mask], minlength=len(stats))[1:]) + 1
  x, y, w, h = stats[best, :4]
  return int(y), int(x), int(h), int(w)


def zoom_box(truth: np.ndarray, predicted: np.ndarray, crop: int):
  """Where a picture zooms in: (y, x, h, w) in original pixels, a `crop`-sided square (clipped to the image).

  Centred on the box of the largest ground-truth microaneurysm cluster (`largest_cluster` with radius
  crop // 8), else of the predicted one, else the image centre; moved inside the image.
  """
  size = truth.shape[:2]
  h, w = min(crop, size[0]), min(crop, size[1])
  radius = max(1, crop // 8)
  box = largest_cluster(truth[..., MA], radius) or largest_cluster(predicted[..., MA], radius)
  centre = (size[0] // 2, size[1] // 2) if box is None else (box[0] + box[2] // 2, box[1] + box[3] // 2)
  return (int(np.clip(centre[0] - h // 2, 0, size[0] - h)), int(np.clip(centre[1] - w // 2, 0, size[1] - w)),
          h, w)


def picture(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, *, title: str = '',
            width: int = 640, zoom: int = 3) -> np.ndarray:
  """Image | ground truth | prediction | zoom, under a title strip: uint8 (HEADER + h', 3 w' + s + 3 GAP, 3).

  The views are `image` resized to (h', w') (cv2.INTER_AREA; w' = min(w, `width`), h' keeps the aspect)
  with the masks `any_pool`ed to that size drawn as contours, and a white rectangle where the zoom is.
  The zoom column holds two squares of side s = (h' - GAP) // 2, ground truth above and prediction
  below: a crop of s // zoom original pixels (`zoom_box`, around the largest microaneurysm cluster) of
  the image resized to the original size (bilinear), each pixel a zoom x zoom block (nearest), contours
  drawn at that scale.

  Args:
    image: uint8 (h, w, 3), the photograph at any size (evaluation: the test scale).
    truth: bool (H, W, 4) ground-truth masks at the original size.
    predicted: bool (H, W, 4) predicted masks (prob > 0.5) at the original size.
    title: the first column's title (e.g. the image id), followed by the colour legend.
    width: the largest view width w'.
    zoom: the zoom's upscale factor.
  """
  if truth.shape != predicted.shape or truth.shape[-1] != len(COLORS):
    raise ValueError(f'picture needs truth and predicted masks (H, W, 4), got {truth.shape} and '
                     f'{predicted.shape}')
  size = truth.shape[:2]
  view_w = min(image.shape[1], width)
  view = (max(1, round(image.shape[0] * view_w / image.shape[1])), view_w)
  side = max(1, (view[0] - GAP) // 2)
  box = zoom_box(truth, predicted, max(1, side // zoom))
  small = cv2.resize(image, view[::-1], interpolation=cv2.INTER_AREA)
  views = [small, overlay(small, any_pool(truth, view)), overlay(small, any_pool(predicted, view))]
  y, x, h, w = box
  corners = ((x * view[1] // size[1], y * view[0] // size[0]),
             (-(-(x + w) * view[1] // size[1]) - 1, -(-(y + h) * view[0] // size[0]) - 1))
  for v in views:
    cv2.rectangle(v, *corners, WHITE, 1)

  full = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)[y:y + h, x:x + w]
  full = full.repeat(zoom, 0).repeat(zoom, 1)
  zoom_column = np.full((max(view[0], 2 * side + GAP), side, 3), 255, np.uint8)
  for row, masks in zip((0, side + GAP), (truth, predicted)):
    drawn = overlay(full, masks[y:y + h, x:x + w].repeat(zoom, 0).repeat(zoom, 1))[:side, :side]
    zoom_column[row:row + side] = 0
    zoom_column[row:row + drawn.shape[0], :drawn.shape[1]] = drawn
  zoom_column = zoom_column[:view[0]]

  titles = [[(title or 'image', WHITE)] + [(n, c.tolist()) for n, c in zip(CLASSES, COLORS)],
            [('ground truth', WHITE)], [('prediction', WHITE)], [(f'zoom x{zoom}', WHITE)]]
  columns = []
  for body, words in zip(views + [zoom_column], titles):
    strip = np.zeros((HEADER, body.shape[1], 3), np.uint8)
    left = 4
    for text, color in words:
      cv2.putText(strip, text, (left, HEADER - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
      left += cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] + 8
    columns += [np.concatenate([strip, body]), np.full((HEADER + view[0], GAP, 3), 255, np.uint8)]
  return np.concatenate(columns[:-1], 1)


def pr_curves(scores: dict) -> Figure:
  """One figure with a precision-recall panel per class (official 11 points and the fine curve).

  Args:
    scores: the dict of `metrics.scores` (needs the curves and `aupr`, `aupr_fine`).
  """
  fig = Figure(figsize=(4 * len(CLASSES), 4.2))
  axes = fig.subplots(1, len(CLASSES))
  for c, (ax, name) in enumerate(zip(axes, CLASSES)):
    color = COLORS[c] / 255 * 0.8
    ax.plot(scores['recall_fine'][:, c], scores['precision_fine'][:, c], '-', color=color, lw=1,
            alpha=0.6, label=f'{len(scores["recall_fine"])} thresholds: {100 * scores["aupr_fine"][c]:.2f}')
    ax.plot(scores['recall'][:, c], scores['precision'][:, c], 'o-', color='k', ms=3, lw=1,
            label=f'official 11 thresholds: {100 * scores["aupr"][c]:.2f}')
    ax.set(title=f'{name}  AUPR {100 * scores["aupr"][c]:.2f}%', xlabel='recall', xlim=(0, 1),
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc='lower left', fontsize=8, title='AUPR (%)', title_fontsize=8)
  axes[0].set_ylabel('precision')
  fig.tight_layout()
  return fig


def to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
  """A matplotlib figure rendered as uint8 RGB (H, W, 3)."""
  fig.set_dpi(dpi)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
