"""evaluator: the evaluation pass (padded rows dropped before the metrics) and scalar_metrics."""

import jax
import numpy as np
import optax
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.models import scoring
from privattnet_jax.training import evaluator
from privattnet_jax.training import train_state
from privattnet_jax.training import train_steps
from tests.conftest import make_task


def test_eval_reports_attribute_ap_by_id_without_padding_rows():
  """Through the real eval step and `evaluate`: a 67-column (PrivAttNet_MLC) head, AP by hand."""
  ids = attributes.ATTRIBUTE_IDS
  probabilities = np.full((6, 67), 0.5, np.float32)
  labels = np.zeros((6, 68), np.float32)
  labels[[0, 3], 0] = 1  # a0_safe: not among the 67 columns, must not shift them.
  # a1 (column 1 of the labels, 0 of the head), ranked pos, neg, pos, neg, neg: AP (1 + 2/3) / 2.
  probabilities[:, 0] = [0.9, 0.8, 0.7, 0.6, 0.1, 0.95]
  labels[:, 1] = [1, 0, 1, 0, 0, 0]
  # a2 ranked neg, pos, pos, neg, neg: AP (1/2 + 2/3) / 2.
  probabilities[:, 1] = [0.2, 0.9, 0.4, 0.3, 0.8, 0.99]
  labels[:, 2] = [0, 0, 1, 0, 1, 1]
  mask = np.array(
    [1, 1, 1, 1, 1, 0], np.float32
  )  # Row 5 is padding: counted, it would change both APs.
  logits = np.log(probabilities / (1 - probabilities))
  batches = [
    {
      "image": logits[i : i + 3],
      "score": np.zeros((3, 1), np.float32),
      "labels": labels[i : i + 3],
      "mask": mask[i : i + 3],
    }
    for i in (0, 3)
  ]
  state = train_state.TrainState.create(
    apply_fn=lambda variables, images, **kwargs: {"attribute_logits": images},
    params={},
    batch_stats={},
    tx=optax.identity(),
    rng=jax.random.PRNGKey(0),
  )
  task = make_task("attributes", np.ones((68, 1), np.float32))
  mesh = train_steps.create_mesh()
  result = evaluator.evaluate(
    state, train_steps.parallel_eval_step(mesh, task), batches, mesh, task
  )
  ap = result.metrics["attribute_ap"]
  assert tuple(ap) == ids[1:]
  assert ap["a1_age_approx"] == pytest.approx((1 + 2 / 3) / 2)
  assert ap["a2_weight_approx"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert all(ap[attribute_id] is None for attribute_id in ids[3:])  # No positive example.
  assert result.metrics["attribute_map"] == pytest.approx(
    ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
  )
  assert result.metrics["n"] == 5


def _regression_state():
  """A model whose score outputs are its images: (B, P) "images" are the normalised scores."""
  return train_state.TrainState.create(
    apply_fn=lambda variables, images, **kwargs: {"score": images},
    params={},
    batch_stats={},
    tx=optax.identity(),
    rng=jax.random.PRNGKey(0),
  )


def test_padded_rows_change_no_metric_and_leave_no_row_in_the_results():
  """A per-profile regression (P = 2) with the paper-table row; the padding holds wild values."""
  rng = np.random.default_rng(0)
  outputs = rng.normal(size=(6, 2)).astype(np.float32)
  targets = rng.uniform(0, 3, (6, 2)).astype(np.float32)
  labels = (rng.random((6, 68)) < 0.2).astype(np.float32)
  mask = np.float32([1, 1, 1, 1, 1, 0])
  outputs[5], targets[5], labels[5] = 1e6, -1e6, 1.0
  image_ids = np.array([f"2017_{i}" for i in range(6)])
  batches = [
    {
      "image": outputs[i : i + 3],
      "score": targets[i : i + 3],
      "labels": labels[i : i + 3],
      "mask": mask[i : i + 3],
      "image_id": image_ids[i : i + 3],
    }
    for i in (0, 3)
  ]
  table = attributes.preference_table("profiles_mean", missing_value=0.0)
  task = scoring.Task(
    kind="regression",
    target_mean=np.float32([1.0, 2.0]),
    preferences=np.ones((68, 2), np.float32),
    pooling="max",
    attention_gamma=0.0,
    attention_tau=0.0,
    table_preferences=table,
  )
  mesh = train_steps.create_mesh()
  result = evaluator.evaluate(
    _regression_state(), train_steps.parallel_eval_step(mesh, task), batches, mesh, task
  )
  predictions = outputs[:5] / 2 + task.target_mean
  np.testing.assert_allclose(result.predictions, predictions, rtol=1e-6)
  np.testing.assert_array_equal(result.targets, targets[:5])
  np.testing.assert_array_equal(result.extras["image_id"], image_ids[:5])
  np.testing.assert_array_equal(result.extras["labels"], labels[:5])
  metrics = result.metrics
  assert metrics["n"] == 5 and len(metrics["per_profile"]) == 2
  assert metrics["l1"] == pytest.approx(np.abs(predictions - targets[:5]).mean(), rel=1e-5)
  table_target = attributes.privacy_score(labels[:5] > 0, table, "max")[:, 0]
  assert metrics["table"]["n"] == 5
  assert metrics["table"]["l1"] == pytest.approx(
    np.abs(predictions.mean(1) - table_target).mean(), rel=1e-5
  )
  scalars = evaluator.scalar_metrics(metrics)
  assert scalars == {
    **{key: metrics[key] for key in ("l1", "mse", "pearson", "spearman", "n")},
    **{f"table/{key}": value for key, value in metrics["table"].items()},
  }


def test_scalar_metrics_keep_the_numbers_and_flatten_the_table_row():
  metrics = {
    "l1": 0.5,
    "n": 12,
    "attribute_map": 0.25,
    "per_profile": [{"l1": 0.5}],
    "attribute_ap": {"a1_age_approx": 0.5},
    "table": {"l1": 0.75, "n": 12},
  }
  assert evaluator.scalar_metrics(metrics) == {
    "l1": 0.5,
    "n": 12,
    "attribute_map": 0.25,
    "table/l1": 0.75,
    "table/n": 12,
  }
