import numpy as np
import pytest
import scipy.stats

from privattnet_jax.evaluation import metrics


def test_regression_metrics_by_hand():
  predictions = np.array([1.0, 2.0, 4.0, 3.0])
  targets = np.array([1.0, 3.0, 3.0, 5.0])
  m = metrics.regression_metrics(predictions, targets)
  assert m["l1"] == pytest.approx((0 + 1 + 1 + 2) / 4)
  assert m["mse"] == pytest.approx((0 + 1 + 1 + 4) / 4)
  assert m["n"] == 4
  # Targets tie (3, 3): average ranks 2.5, 2.5; prediction ranks 1, 2, 4, 3.
  pr, tr = np.array([1, 2, 4, 3.0]), np.array([1, 2.5, 2.5, 4])
  expected_spearman = np.corrcoef(pr, tr)[0, 1]
  assert m["spearman"] == pytest.approx(expected_spearman)
  assert m["pearson"] == pytest.approx(np.corrcoef(predictions, targets)[0, 1])


def test_constant_predictions_have_no_correlation():
  m = metrics.regression_metrics(np.ones(5), np.arange(5.0))
  assert np.isnan(m["pearson"]) and np.isnan(m["spearman"])
  assert m["l1"] == pytest.approx(np.abs(1 - np.arange(5.0)).mean())


def test_per_profile_metrics_average_the_profiles():
  rng = np.random.default_rng(0)
  targets = rng.normal(size=(50, 3))
  predictions = targets + rng.normal(scale=[0.1, 0.5, 1.0], size=(50, 3))
  m = metrics.score_metrics(predictions, targets)
  assert len(m["per_profile"]) == 3
  for key in ("l1", "mse", "pearson", "spearman"):
    assert m[key] == pytest.approx(np.mean([p[key] for p in m["per_profile"]]))
  assert m["per_profile"][0]["spearman"] == pytest.approx(
    scipy.stats.spearmanr(predictions[:, 0], targets[:, 0]).statistic
  )
  assert m["per_profile"][0]["l1"] < m["per_profile"][2]["l1"]


def test_average_precision_by_hand():
  # Ranked: pos, neg, pos, neg -> precision at the positives: 1/1, 2/3.
  scores = np.array([0.9, 0.8, 0.7, 0.1])
  positives = np.array([True, False, True, False])
  assert metrics.average_precision(scores, positives) == pytest.approx((1 + 2 / 3) / 2)
  assert np.isnan(metrics.average_precision(scores, np.zeros(4, bool)))
  labels = np.stack([positives, ~positives, np.zeros(4, bool)], axis=1)
  result = metrics.mean_average_precision(np.stack([scores, scores, scores], axis=1), labels)
  # Column 1: ranked neg, pos, neg, pos -> 1/2, 2/4.
  assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 4) / 2) / 2)
  assert np.isnan(result["per_attribute_ap"][2])


def test_per_attribute_ap_with_known_answers():
  """One column per case: perfect ranking, a single positive ranked 4th, positives
  ranked 2nd and 3rd of five; the mAP averages the columns that have a positive."""
  scores = np.array(
    [
      [0.9, 0.9, 0.9, 0.5],
      [0.8, 0.8, 0.8, 0.4],
      [0.7, 0.7, 0.7, 0.3],
      [0.1, 0.1, 0.6, 0.2],
      [0.05, 0.05, 0.5, 0.1],
    ]
  )
  labels = np.array(
    [
      [1, 0, 0, 0],
      [1, 0, 1, 0],
      [0, 0, 1, 0],
      [0, 1, 0, 0],
      [0, 0, 0, 0],
    ],
    bool,
  )
  result = metrics.mean_average_precision(scores, labels)
  expected = [1.0, 1 / 4, (1 / 2 + 2 / 3) / 2]
  np.testing.assert_allclose(result["per_attribute_ap"][:3], expected)
  assert np.isnan(result["per_attribute_ap"][3])
  assert result["map"] == pytest.approx(np.mean(expected))
