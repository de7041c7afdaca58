"""scoring: Task equality (equal runs share their steps), and model outputs to privacy scores."""

import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.models import scoring
from tests.conftest import make_tiny_config


def _task(config=None, target_mean=(0.5,), preferences=None):
  config = config or make_tiny_config("/nonexistent")
  if preferences is None:
    preferences = np.arange(68, dtype=np.float32).reshape(68, 1) % 5 + 1
  return scoring.make_task(config.model, config.score, config.loss, list(target_mean), preferences)


def test_equal_tasks_are_equal_and_hash_equal_and_any_field_tells_them_apart():
  task = _task()
  same = _task(target_mean=np.float64([0.5]))  # Another array of equal values (made float32).
  assert same == task and hash(same) == hash(task) and {task: "steps"}[same] == "steps"
  table = np.arange(68, dtype=np.float32).reshape(68, 1) % 5 + 1
  table[9, 0] += 1
  assert _task(preferences=table) != task
  assert _task(preferences=table.reshape(1, 68)) != _task(preferences=table)  # Same bytes.
  assert _task(target_mean=(0.25,)) != task
  config = make_tiny_config("/nonexistent")
  config.score.per_profile = True  # Adds the profile-mean table row.
  assert _task(config) != task
  config.score.per_profile, config.score.pooling = False, "sum"
  assert _task(config) != task
  assert task != "task"


def test_make_task_reads_the_kind_and_the_attention_constants_from_the_config():
  config = make_tiny_config("/nonexistent")
  config.loss.attention_gamma, config.loss.attention_tau_per_step = 0.5, 0.2
  task = _task(config)
  assert task.kind == "regression" and task.table_preferences is None
  assert task.attention_gamma == 0.5
  assert task.attention_tau == pytest.approx(0.2 * config.model.attention.steps)
  for name in ("ap_pr", "privattnet_mlc"):
    assert _task(make_tiny_config("/nonexistent", name)).kind == "attributes"


def test_regression_outputs_become_raw_scores_per_column():
  config = make_tiny_config("/nonexistent")
  config.score.per_profile = True
  task = _task(config, target_mean=(1.0, 3.0), preferences=np.ones((68, 2), np.float32))
  outputs = {
    "score": jnp.array([[0.0, 2.0]], jnp.bfloat16),
    "step_scores": jnp.array([[[2.0, -2.0], [4.0, 0.0]]]),  # (B, T, P)
    "attention": jnp.array([[[0.25, 0.75], [1.0, 0.0]]], jnp.bfloat16),
  }
  result = scoring.inference_outputs(outputs, task)
  assert set(result) == {"score", "step_scores", "attention"}
  assert all(value.dtype == jnp.float32 for value in result.values())
  np.testing.assert_array_equal(result["score"], [[1.0, 4.0]])  # score / 2 + the column's mean.
  np.testing.assert_array_equal(result["step_scores"], [[[2.0, 2.0], [3.0, 3.0]]])
  np.testing.assert_array_equal(result["attention"], outputs["attention"].astype(jnp.float32))
  np.testing.assert_array_equal(scoring.predicted_scores(outputs, task), result["score"])


@pytest.mark.parametrize("num_logits", [68, 67])
def test_attribute_outputs_give_probabilities_and_the_score_predict_and_evaluation_share(
  num_logits,
):
  task = _task(make_tiny_config("/nonexistent", "ap_pr"))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, num_logits)), jnp.float32)
  result = scoring.inference_outputs({"attribute_logits": logits}, task)
  assert set(result) == {"score", "attribute_probabilities"}
  np.testing.assert_allclose(
    result["attribute_probabilities"], 1 / (1 + np.exp(-logits)), rtol=1e-6
  )
  assert result["score"].shape == (2, 1)
  np.testing.assert_array_equal(
    result["score"], scoring.predicted_scores({"attribute_logits": logits}, task)
  )


def _per_profile_task(kind_model="privattnet", pooling="max"):
  config = make_tiny_config("/nonexistent", kind_model)
  config.score.per_profile, config.score.pooling = True, pooling
  return _task(config, target_mean=np.zeros(30), preferences=np.ones((68, 30), np.float32))


def test_table_row_of_a_regression_model_is_its_profile_mean_against_the_profile_mean_score():
  task = _per_profile_task()
  face, passport = (attributes.ATTRIBUTE_INDEX[a] for a in ("a9_face_complete", "a31_passport"))
  labels = np.zeros((2, 68), np.float32)
  labels[0, [face, passport]] = 1
  labels[1, 0] = 1  # a0_safe: a safe image scores 0.
  predictions = np.stack([np.arange(30.0), np.full(30, 2.0)])
  scalar, target = scoring.table_scores(predictions, None, labels, task)
  np.testing.assert_allclose(scalar, [14.5, 2.0])
  table = task.table_preferences[:, 0]
  np.testing.assert_allclose(target, [max(table[face], table[passport]), 0.0], rtol=1e-6)


@pytest.mark.parametrize("pooling", attributes.POOLINGS)
def test_table_row_of_an_attribute_model_is_the_hard_score_for_certain_probabilities(pooling):
  """Probabilities of exactly 0 and 1 pool to the score of those labels, under every pooling."""
  task = _per_profile_task("ap_pr", pooling)
  labels = (np.random.default_rng(1).random((4, 68)) < 0.1).astype(np.float32)
  labels[:, 0] = 0
  scalar, target = scoring.table_scores(np.zeros((4, 30)), labels, labels, task)
  assert scalar.shape == target.shape == (4,)
  np.testing.assert_allclose(scalar, target, rtol=1e-6)
  np.testing.assert_allclose(
    target, attributes.privacy_score(labels > 0, task.table_preferences, pooling)[:, 0]
  )
