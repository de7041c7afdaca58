"""What a run's model outputs mean: the score definition (`Task`), outputs -> privacy scores.

Shared by training, evaluation and inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from privattnet_jax.data import attributes
from privattnet_jax.models import registry


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """What turns model outputs into a loss and into privacy scores; constant for a run."""

  kind: str  # The variant's: "regression" (a score head) or "attributes" (a multi-label head).
  target_mean: np.ndarray  # (P,), the training split's mean raw score, per column.
  preferences: np.ndarray  # (68, P)
  pooling: str
  attention_gamma: float
  attention_tau: float
  # (68, 1) profile-mean table of the paper's table row, with `score.per_profile` (else None).
  table_preferences: np.ndarray | None = None
  attribute_rule: str = "expected"  # Probabilities -> score (attributes.pooled_soft_score).

  def _key(self) -> tuple:
    """The fields by value (numpy arrays as shape and bytes): equal tasks share their steps."""
    return tuple(
      (value.shape, value.tobytes()) if isinstance(value, np.ndarray) else value
      for value in (getattr(self, field.name) for field in dataclasses.fields(self))
    )

  def __eq__(self, other):
    return isinstance(other, Task) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


def make_task(model_config, score_config, loss_config, target_mean, preferences) -> Task:
  """The run's Task; `preferences` (68, P) is the score's table.

  Built once (by the run, or from a checkpoint's metadata) and passed to the loaders, the steps,
  evaluation and predict.
  """
  # Checkpoints from before the field scored with the product rule: they keep their scores.
  attribute_rule = score_config.get("attribute_rule", "product")
  if attribute_rule not in attributes.ATTRIBUTE_RULES:
    raise ValueError(
      f"score.attribute_rule must be one of {attributes.ATTRIBUTE_RULES}, got {attribute_rule!r}"
    )
  return Task(
    kind=registry.lookup(model_config).kind,
    target_mean=np.asarray(target_mean, np.float32).reshape(-1),
    preferences=np.asarray(preferences, np.float32),
    pooling=score_config.pooling,
    attention_gamma=loss_config.attention_gamma,
    attention_tau=loss_config.attention_tau_per_step * model_config.attention.steps,
    table_preferences=attributes.preference_table(
      "profiles_mean", missing_value=score_config.missing_value
    )
    if score_config.per_profile
    else None,
    attribute_rule=attribute_rule,
  )


def attribute_scores(probabilities, preferences, pooling: str, rule: str = "expected"):
  """Scores (..., P) pooled from attribute probabilities (..., K) and a (68, P) preference table.

  K = 68 (AP-PR) or 67 (PrivAttNet_MLC, no `a0_safe` column): the table's last K rows are used.
  numpy or jax arrays, as `attributes.pooled_soft_score`.
  """
  offset = attributes.NUM_ATTRIBUTES - probabilities.shape[-1]
  return attributes.pooled_soft_score(probabilities, preferences[offset:], pooling, rule)


def predicted_scores(outputs: dict, task: Task) -> jax.Array:
  """Raw privacy scores (B, P) from the model outputs: the per-column normalisation undone."""
  if task.kind == "regression":
    return outputs["score"].astype(jnp.float32) / 2 + task.target_mean
  probabilities = jax.nn.sigmoid(outputs["attribute_logits"].astype(jnp.float32))
  return attribute_scores(
    probabilities, jnp.asarray(task.preferences), task.pooling, task.attribute_rule
  )


def table_scores(
  predictions: np.ndarray, probabilities: np.ndarray | None, labels: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
  """The paper-table row of a per-profile run: (N,) scalar predictions and targets.

  The target is the other rows' ground truth: the preferences averaged over the 30 profiles,
  then pooled over the image's attributes (`task.table_preferences`). Attribute models pool
  their probabilities with that same table (exactly what the checkpoint gives with
  per_profile=False). Regression models (PR-CNN) average their 30 profile predictions; under
  max pooling that estimates mean_p max_a, which is >= the target max_a mean_p, so even exact
  profile scores miss it (equal under sum and mean pooling, which are linear in the preferences).
  """
  target = attributes.privacy_score(labels > 0, task.table_preferences, task.pooling)[:, 0]
  if task.kind == "regression":
    return predictions.mean(axis=1), target
  scores = attribute_scores(
    probabilities, task.table_preferences, task.pooling, task.attribute_rule
  )
  return scores[:, 0], target


def inference_outputs(outputs: dict, task: Task) -> dict:
  """Model outputs -> what users see, the same for evaluation, predict and the exported predictor.

  Raw `score` (B, P), raw `step_scores` (B, T, P), `attention` (B, T, L), `attribute_probabilities`
  (B, K); each where the model has it. All three go through here, so they agree.
  """
  result = {"score": predicted_scores(outputs, task)}
  if "step_scores" in outputs:
    result["step_scores"] = outputs["step_scores"].astype(jnp.float32) / 2 + task.target_mean
  if "attention" in outputs:
    result["attention"] = outputs["attention"].astype(jnp.float32)
  if "attribute_logits" in outputs:
    result["attribute_probabilities"] = jax.nn.sigmoid(
      outputs["attribute_logits"].astype(jnp.float32)
    )
  return result
