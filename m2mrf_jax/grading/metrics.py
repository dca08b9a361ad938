"""DR grading metrics (pure NumPy): accuracy, quadratic weighted kappa, macro F1, the confusion
matrix, and the AUC of referable DR (grade >= 2).

Shapes: grades (N,) ints in [0, K), probabilities (N, K) rows summing to 1.
"""
import numpy as np

GRADES = ('none', 'mild', 'moderate', 'severe', 'proliferative')
UNGRADABLE = 'ungradable'  # DDR's grade 5
REFERABLE = 2  # referable DR: moderate NPDR or worse


def confusion_matrix(true, pred, num_classes):
  """(K, K) int64 counts, rows the true grade, columns the predicted one (sklearn's layout)."""
  true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
  for name, g in (('true', true), ('predicted', pred)):
    if g.size and (g.min() < 0 or g.max() >= num_classes):
      raise ValueError(f'{name} grades must lie in [0, {num_classes}), got {g.min()}..{g.max()}')
  return np.bincount(true * num_classes + pred, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def accuracy(confusion):
  return float(np.trace(confusion) / max(confusion.sum(), 1))


def quadratic_kappa(confusion):
  """Cohen's kappa with weights (i - j)^2 over all K grades (the Kaggle DR metric).

  1 - sum(w O) / sum(w E), E the outer product of the marginals scaled to N; NaN when undefined
  (every true and predicted grade the same).
  """
  k = confusion.shape[0]
  observed = confusion.astype(np.float64)
  expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
  weights = np.subtract.outer(np.arange(k), np.arange(k)).astype(np.float64) ** 2
  denominator = (weights * expected).sum()
  return float(1.0 - (weights * observed).sum() / denominator) if denominator else float('nan')


def f1_per_class(confusion):
  """(K,) F1 per grade; 0 where a grade is neither true nor predicted."""
  tp = np.diag(confusion).astype(np.float64)
  denominator = confusion.sum(0) + confusion.sum(1)
  return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(confusion):
  """Mean F1 over the grades that occur as true or predicted (sklearn `f1_score(average='macro')`)."""
  present = (confusion.sum(0) + confusion.sum(1)) > 0
  return float(f1_per_class(confusion)[present].mean()) if present.any() else 0.0


def roc_auc(labels, scores):
  """Area under the ROC curve of binary `labels` ranked by `scores` (ties count one half).

  The Mann-Whitney statistic with average ranks; NaN when only one class is present.
  """
  labels = np.asarray(labels, bool)
  scores = np.asarray(scores, np.float64)
  positives, negatives = labels.sum(), (~labels).sum()
  if not positives or not negatives:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  sorted_scores = scores[order]
  ranks = np.empty(len(scores))
  # Average rank (1-based) of each run of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(scores)]
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def referable_auc(true, probs):
  """ROC AUC of referable DR: label grade >= 2, score the probability mass on grades 2..4."""
  probs = np.asarray(probs, np.float64)
  score = probs[:, REFERABLE:len(GRADES)].sum(1)
  return roc_auc(np.asarray(true) >= REFERABLE, score)


def scores(true, probs):
  """Every grading metric of `true` (N,) grades against `probs` (N, K) class probabilities.

  The prediction is the most probable grade. Returns accuracy, kappa, macro_f1, f1 (per grade),
  referable_auc, confusion (K x K nested lists) and num_images.
  """
  true = np.asarray(true, np.int64)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or len(probs) != len(true):
    raise ValueError(f'probs must be (N, K) for {len(true)} grades, got shape {probs.shape}')
  confusion = confusion_matrix(true, probs.argmax(1), probs.shape[1])
  return {
      'accuracy': accuracy(confusion),
      'kappa': quadratic_kappa(confusion),
      'macro_f1': macro_f1(confusion),
      'f1': f1_per_class(confusion).tolist(),
      'referable_auc': referable_auc(true, probs),
      'confusion': confusion.tolist(),
      'num_images': int(len(true)),
  }
