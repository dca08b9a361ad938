"""Pictures: lesion overlays in the paper's colours and precision-recall curves."""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from data_pipelines.lesions import CLASSES

# The paper's figures: EX red, HE green, SE yellow, MA blue (channel order EX, HE, SE, MA).
COLORS = np.array([(255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255)], np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 1.0) -> np.ndarray:
  """Paints lesion masks on an image: uint8 (H, W, 3) and bool (H, W, 4) -> uint8 (H, W, 3).

  Classes are painted in the order EX, HE, SE, MA, so on overlaps the later one shows (as the official
  label merge). `alpha` is the opacity of the colour (1 = solid, best for tiny lesions).
  """
  if image.shape[:2] != masks.shape[:2] or masks.shape[-1] != len(COLORS):
    raise ValueError(f'overlay needs an image (H, W, 3) and masks (H, W, 4), got {image.shape} and '
                     f'{masks.shape}')
  out = image.astype(np.float32)
  for c, color in enumerate(COLORS):
    where = masks[..., c]
    out[where] = (1 - alpha) * out[where] + alpha * color
  return np.round(out).astype(np.uint8)


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
