"""Grading metrics against scikit-learn on random and edge-case gradings."""
import numpy as np
import pytest
from sklearn import metrics as skm

from m2mrf_jax.grading import metrics


def _case(seed, n=200, k=5, skew=False):
  rng = np.random.default_rng(seed)
  true = rng.choice(k, n, p=[0.5, 0.1, 0.25, 0.05, 0.1] if skew else None)
  logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[true] * rng.uniform(0, 1, (n, 1))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return true, probs


@pytest.mark.parametrize('seed,skew', [(0, False), (1, True), (2, True)])
def test_scores_match_sklearn(seed, skew):
  true, probs = _case(seed, skew=skew)
  pred = probs.argmax(1)
  got = metrics.scores(true, probs)
  labels = list(range(5))
  assert got['accuracy'] == pytest.approx(skm.accuracy_score(true, pred), abs=1e-12)
  assert got['kappa'] == pytest.approx(
      skm.cohen_kappa_score(true, pred, labels=labels, weights='quadratic'), abs=1e-12)
  assert got['macro_f1'] == pytest.approx(skm.f1_score(true, pred, average='macro'), abs=1e-12)
  np.testing.assert_allclose(got['f1'], skm.f1_score(true, pred, labels=labels, average=None,
                                                     zero_division=0), atol=1e-12)
  np.testing.assert_array_equal(got['confusion'], skm.confusion_matrix(true, pred, labels=labels))
  assert got['referable_auc'] == pytest.approx(
      skm.roc_auc_score(true >= 2, probs[:, 2:].sum(1)), abs=1e-12)
  assert got['num_images'] == len(true)


def test_missing_grades_ties_and_undefined():
  # Grade 3 never occurs, grade 4 only predicted: macro F1 over present grades, kappa over all five.
  true = np.array([0, 0, 1, 2, 2, 2, 0, 1])
  pred = np.array([0, 1, 1, 2, 4, 2, 0, 0])
  probs = np.eye(5)[pred] * 0.6 + 0.08
  got = metrics.scores(true, probs)
  assert got['macro_f1'] == pytest.approx(skm.f1_score(true, pred, average='macro'), abs=1e-12)
  assert got['kappa'] == pytest.approx(
      skm.cohen_kappa_score(true, pred, labels=range(5), weights='quadratic'), abs=1e-12)
  # Tied scores: half credit, as sklearn.
  labels, tied = np.array([0, 1, 0, 1, 1]), np.array([0.2, 0.2, 0.5, 0.5, 0.9])
  assert metrics.roc_auc(labels, tied) == pytest.approx(skm.roc_auc_score(labels, tied))
  assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
  assert np.isnan(metrics.quadratic_kappa(metrics.confusion_matrix([1, 1], [1, 1], 5)))
  with pytest.raises(ValueError, match=r'true grades must lie in \[0, 5\)'):
    metrics.confusion_matrix([0, 5], [0, 1], 5)
