"""Evaluation metrics over a whole split: L1, MSE, Pearson, Spearman and attribute mAP.

Computed on the host from every example's prediction exactly once (padding
removed by the eval mask), so the correlations are those of the full split,
not averages of per-batch values.
"""

from __future__ import annotations

import importlib
import threading

import numpy as np

REGRESSION_METRICS = ("l1", "mse", "pearson", "spearman")


def import_in_background() -> None:
  """Starts importing scipy.stats on a daemon thread, so that its slow import delays nothing.

  The import then overlaps the first train steps, whose compiled programs release the GIL, instead
  of delaying the first validation (docs/benchmarks.md, "The demo's second run: first train
  step"). An import already under way makes `regression_metrics`'s own import wait for it.
  """
  threading.Thread(target=importlib.import_module, args=("scipy.stats",), daemon=True).start()


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """L1, MSE, Pearson and Spearman (average ranks for ties) of one score column."""
  predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
  targets = np.asarray(targets, dtype=np.float64).reshape(-1)
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ")
  errors = predictions - targets
  result = {
    "l1": float(np.abs(errors).mean()),
    "mse": float(np.square(errors).mean()),
    "n": int(targets.size),
  }
  # Imported here, not at start-up (see import_in_background).
  import scipy.stats  # pylint: disable=g-import-not-at-top

  constant = np.ptp(predictions) == 0 or np.ptp(targets) == 0
  # A constant column has no correlation; report NaN rather than a scipy warning.
  result["pearson"] = (
    float("nan") if constant else float(scipy.stats.pearsonr(predictions, targets).statistic)
  )
  result["spearman"] = (
    float("nan") if constant else float(scipy.stats.spearmanr(predictions, targets).statistic)
  )
  return result


def score_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict:
  """Metrics for (N, P) scores: for P > 1 per profile, and their average as the headline.

  The headline keys (`l1`, `mse`, `pearson`, `spearman`, `n`) are always present;
  with several profiles `per_profile` holds one dict per profile.
  """
  predictions = np.asarray(predictions).reshape(len(predictions), -1)
  targets = np.asarray(targets).reshape(len(targets), -1)
  if predictions.shape[1] == 1:
    return regression_metrics(predictions[:, 0], targets[:, 0])
  per_profile = [
    regression_metrics(predictions[:, p], targets[:, p]) for p in range(predictions.shape[1])
  ]
  result = {k: float(np.mean([m[k] for m in per_profile])) for k in REGRESSION_METRICS}
  result["n"] = int(len(targets))
  result["per_profile"] = per_profile
  return result


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """Non-interpolated average precision of one class (the mean precision at each positive).

  NaN when the class has no positive example (it is then left out of the mean AP).
  """
  scores = np.asarray(scores, dtype=np.float64)
  positives = np.asarray(positives, dtype=bool)
  num_positive = positives.sum()
  if num_positive == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  hits = positives[order]
  precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision_at_k[hits].sum() / num_positive)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict:
  """Macro mAP over attribute columns with at least one positive, plus per-column AP."""
  per_class = [average_precision(scores[:, k], labels[:, k]) for k in range(scores.shape[1])]
  valid = [ap for ap in per_class if not np.isnan(ap)]
  return {"map": float(np.mean(valid)) if valid else float("nan"), "per_attribute_ap": per_class}
