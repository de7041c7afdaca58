"""user_scores: whose score a predictor answers for (a profile column, or a user's preferences
pooled over attribute probabilities), checked before any image is read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.data import input_pipeline
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.inference import user_scores
from privattnet_jax.models import scoring
from tests.conftest import make_tiny_config


def _info(model_name: str, per_profile: bool = False) -> dict:
  """The predictor JSON (`predictor_lib.predictor_info`) of a tiny `model_name` checkpoint."""
  config = make_tiny_config("/nonexistent", model_name)
  config.score.per_profile = per_profile
  preferences = input_pipeline.score_preferences(config.score)
  task = scoring.make_task(
    config.model, config.score, config.loss, np.zeros(preferences.shape[1]), preferences
  )
  shapes = {"score": jax.ShapeDtypeStruct((1, preferences.shape[1]), jnp.float32)}
  if task.kind == "attributes":
    width = attributes.NUM_ATTRIBUTES - (model_name == "privattnet_mlc")
    shapes["attribute_probabilities"] = jax.ShapeDtypeStruct((1, width), jnp.float32)
  return predictor_lib.predictor_info(config.to_dict(), task, 2, shapes)


@pytest.fixture(scope="module")
def profile_info():
  """A per-profile PrivAttNet's (30 profile scores)."""
  return _info("privattnet", per_profile=True)


@pytest.fixture(scope="module")
def attribute_info():
  """An AP-PR's (68 attribute probabilities)."""
  return _info("ap_pr")


def test_profile_of_a_single_score_model_is_refused_with_the_reason(profile_info):
  single = dict(
    profile_info,
    num_scores=1,
    score=dict(profile_info["score"], per_profile=False, source="profiles_mean"),
  )
  with pytest.raises(predictor_lib.PredictError, match="single score.*per_profile=True"):
    user_scores.resolve_user(single, profile=2)
  one_profile = dict(single, score=dict(single["score"], source="profile", profile_index=2))
  assert (
    user_scores.resolve_user(one_profile, profile=2).column == 0
  )  # Trained on exactly that profile.
  with pytest.raises(predictor_lib.PredictError, match="single score"):
    user_scores.resolve_user(one_profile, profile=3)
  with pytest.raises(predictor_lib.PredictError, match="not both"):
    user_scores.resolve_user(single, profile=2, preferences_file="x.tsv")


@pytest.mark.parametrize(
  "content, message",
  [
    ("a31_passport\tpassport\t4\na999_nope\tnope\t3\n", "unknown attribute ids"),
    ("a31_passport\tpassport\t7\n", r"1\.\.5"),
    ("a31_passport\tpassport\tsix\n", "non-numeric"),
    ("a31_passport\tpassport\t4\t5\n", "2 rating columns"),
    ("a31_passport\t4\n", "no preference values"),
    ("", "no preference rows"),
  ],
)
def test_malformed_preference_files_are_clear_errors(attribute_info, tmp_path, content, message):
  path = tmp_path / "ratings.tsv"
  path.write_text(content)
  with pytest.raises(predictor_lib.PredictError, match=message):
    user_scores.resolve_user(attribute_info, preferences_file=str(path))


def test_missing_preference_file(attribute_info, tmp_path):
  with pytest.raises(predictor_lib.PredictError, match="no such file"):
    user_scores.resolve_user(attribute_info, preferences_file=str(tmp_path / "absent.tsv"))


def test_without_a_profile_or_preferences_the_models_own_score_is_used(profile_info):
  assert user_scores.resolve_user(profile_info) is None


def test_a_profile_of_a_per_profile_model_reads_its_column_and_steps(profile_info):
  user = user_scores.resolve_user(profile_info, profile=11)
  assert user.label == "profile 11" and user.column == 11
  scores = np.arange(2 * 30, dtype=np.float32).reshape(2, 30)
  steps = np.arange(2 * 3 * 30, dtype=np.float32).reshape(2, 3, 30)
  score, step_scores = user({"score": scores, "step_scores": steps})
  np.testing.assert_array_equal(score, scores[:, 11])
  np.testing.assert_array_equal(step_scores, steps[:, :, 11])
  assert user({"score": scores})[1] is None  # A model without steps.


@pytest.mark.parametrize("model_name", ["ap_pr", "privattnet_mlc"])
def test_an_attribute_model_pools_the_profiles_preferences_over_its_columns(model_name):
  info = _info(model_name)
  width = len(info["attribute_ids"])
  user = user_scores.resolve_user(info, profile=3)
  assert user.label == "profile 3" and user.offset == attributes.NUM_ATTRIBUTES - width
  rng = np.random.default_rng(0)
  labels = rng.random((4, attributes.NUM_ATTRIBUTES)) < 0.1
  labels[:, 0] = False
  # Certain probabilities (exactly 0 or 1): the score is the profile's score of those labels.
  score, steps = user({"attribute_probabilities": labels[:, -width:].astype(np.float32)})
  expected = attributes.privacy_score(
    labels, attributes.preference_table("profile", profile_index=3), info["score"]["pooling"]
  )[:, 0]
  np.testing.assert_allclose(score, expected, rtol=1e-6)
  assert steps is None


def test_a_users_ratings_file_becomes_their_table_with_the_missing_value_elsewhere(
  attribute_info, tmp_path
):
  path = tmp_path / "ratings.tsv"
  path.write_text("attribute_id\tattribute_name\tmine\na31_passport\tpassport\t4\n")
  user = user_scores.resolve_user(attribute_info, preferences_file=str(path))
  assert user.label == f"preferences {path}"
  passport = attributes.ATTRIBUTE_INDEX["a31_passport"]
  expected = np.full((attributes.NUM_ATTRIBUTES, 1), attribute_info["score"]["missing_value"])
  expected[passport] = 4
  np.testing.assert_array_equal(user.preferences, expected)
  probabilities = np.zeros((2, attributes.NUM_ATTRIBUTES), np.float32)
  probabilities[0, passport] = 1.0
  np.testing.assert_allclose(user({"attribute_probabilities": probabilities})[0], [4.0, 0.0])
