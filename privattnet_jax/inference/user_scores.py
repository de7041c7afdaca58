"""Whose score: the model's, a profile's column, or a user's preferences pooled over attributes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from privattnet_jax import safe_files
from privattnet_jax.data import attributes
from privattnet_jax.inference import predictor as predictor_lib


@dataclasses.dataclass(frozen=True)
class UserScore:
  """One user's score from a predictor's outputs: a profile column, or pooled probabilities."""

  label: str
  column: int | None = None  # Score column (per-profile or single-profile regression models).
  preferences: np.ndarray | None = None  # (68, 1), attribute models.
  pooling: str = "max"
  rule: str = "expected"  # attributes.ATTRIBUTE_RULES
  offset: int = (
    0  # Attribute columns the model lacks at the front (1: a0_safe, for privattnet_mlc).
  )

  def __call__(self, outputs: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(B,) scores and (B, T) per-step scores (None where the model has none for this user)."""
    if self.column is not None:
      steps = outputs.get("step_scores")
      return outputs["score"][:, self.column], None if steps is None else steps[:, :, self.column]
    probabilities = np.asarray(outputs["attribute_probabilities"], np.float64)
    scores = attributes.pooled_soft_score(
      probabilities, self.preferences[self.offset :], self.pooling, self.rule
    )
    return scores[:, 0], None


def _user_preference_table(path, missing_value: float) -> np.ndarray:
  """A user's ratings file (one column) -> (68, 1); attributes left out get `missing_value`."""
  try:
    safe_files.regular_file(path)
    if os.path.getsize(path) > safe_files.MAX_LIST_BYTES:
      raise safe_files.UnsafeFileError(
        "file_too_large", path, f"over {safe_files.MAX_LIST_BYTES} bytes"
      )
  except safe_files.UnsafeFileError as e:
    raise predictor_lib.PredictError(
      f"--preferences={path}: {'no such file' if e.reason == 'missing' else e.message}"
    ) from None
  try:
    _, values = attributes.read_preference_tsv(path)
  except ValueError as error:
    raise predictor_lib.PredictError(
      f"--preferences: {error}. Expected lines 'attribute_id<TAB>attribute_name<TAB>rating' (rating 1..5; "
      "optional header line starting with attribute_id), as in data/user_studies/user_profiles.tsv"
    ) from None
  if values.shape[1] != 1:
    raise predictor_lib.PredictError(
      f"--preferences={path}: {values.shape[1]} rating columns; give one user's ratings "
      "(one column after attribute_id and attribute_name)"
    )
  return attributes.preference_table(
    "file", preferences_file=str(path), missing_value=missing_value
  )


def resolve_user(
  info: dict, profile: int | None = None, preferences_file: str | None = None
) -> UserScore | None:
  """Checks that the predictor can answer for this user, before any image is read."""
  if profile is None and not preferences_file:
    return None
  if profile is not None and preferences_file:
    raise predictor_lib.PredictError("give --profile or --preferences, not both")
  model, score = info["model"], info["score"]
  if profile is not None and not 0 <= profile < attributes.NUM_PROFILES:
    raise predictor_lib.PredictError(
      f"--profile must lie in 0..{attributes.NUM_PROFILES - 1}, got {profile}"
    )
  if info["kind"] == "attributes":
    if profile is not None:
      table, label = (
        attributes.preference_table("profile", profile_index=profile),
        f"profile {profile}",
      )
    else:
      table, label = (
        _user_preference_table(preferences_file, score["missing_value"]),
        f"preferences {preferences_file}",
      )
    return UserScore(
      label,
      preferences=table.astype(np.float64),
      pooling=score["pooling"],
      rule=score.get("attribute_rule", "product"),  # Absent: a checkpoint from before the field.
      offset=attributes.NUM_ATTRIBUTES - len(info["attribute_ids"]),
    )
  trained_on = f"score.source={score['source']!r}" + (
    f", profile_index={score['profile_index']}" if score["source"] == "profile" else ""
  )
  if preferences_file:
    raise predictor_lib.PredictError(
      f"{model} regresses the score it was trained on ({trained_on}, per_profile={score['per_profile']}); it "
      "cannot score new preferences. --preferences needs an attribute model (privattnet_mlc, ap_pr)"
      + (", or use --profile=K with this per-profile model" if info["num_scores"] > 1 else "")
    )
  if info["num_scores"] > 1:
    return UserScore(f"profile {profile}", column=profile)
  if score["source"] == "profile" and score["profile_index"] == profile:
    return UserScore(f"profile {profile}", column=0)
  raise predictor_lib.PredictError(
    f"{model} predicts a single score ({trained_on}, per_profile=False) and has no output for profile "
    f"{profile}. Train with --config.score.per_profile=True for all 30 profiles, or use an attribute model "
    "(privattnet_mlc, ap_pr) for any user's preferences"
  )
