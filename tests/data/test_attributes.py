"""The privacy score: pooling, preference sources, the bundled tables and malformed TSVs.

Expected values are worked out by hand from small tables written here, or
read off the bundled TSVs with awk (not with the parser under test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from privattnet_jax.data import attributes
from privattnet_jax.data import input_pipeline

IDX = attributes.ATTRIBUTE_INDEX


def _labels(*ids):
  return attributes.multi_hot(list(ids))


def _write(path, rows, header=True):
  lines = (
    ["attribute_id\tattribute_name\t" + "\t".join(f"u{i}" for i in range(len(rows[0][2])))]
    if header
    else []
  )
  lines += [
    "\t".join([attribute_id, name] + [str(v) for v in values])
    for attribute_id, name, values in rows
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture
def studies_dir(tmp_path):
  """user_profiles.tsv with 3 profiles for three attributes; user_study_1.tsv with 4 users and a control row."""
  _write(
    tmp_path / "user_profiles.tsv",
    [
      ("a1_age_approx", "Age Group", [1, 2, 3]),
      ("a9_face_complete", "Face (Complete)", [5, 4, 3]),
      ("a30_credit_card", "Credit Card", [4, 5, 5]),
    ],
    header=False,
  )
  _write(
    tmp_path / "user_study_1.tsv",
    [
      ("a1_age_approx", "Age Group", [1, 1, 2, 4]),
      ("a9_face_complete", "Face (Complete)", [5, 5, 4, 2]),
      ("a105_control_snack", "Favourite Snack", [5, 5, 5, 5]),
    ],
  )
  return tmp_path


# --- Pooling ---------------------------------------------------------------

# P = 1 table: a1 = 2, a2 = 4, a9 = 5, every other attribute 0 (a0_safe is always 0).
_PREFS = np.zeros((attributes.NUM_ATTRIBUTES, 1), np.float32)
_PREFS[IDX["a1_age_approx"]] = 2
_PREFS[IDX["a2_weight_approx"]] = 4
_PREFS[IDX["a9_face_complete"]] = 5


@pytest.mark.parametrize("pooling, expected", [("max", 4.0), ("sum", 6.0), ("mean", 3.0)])
def test_pooling_of_two_attributes(pooling, expected):
  score = attributes.privacy_score(_labels("a1_age_approx", "a2_weight_approx"), _PREFS, pooling)
  assert score.dtype == np.float32 and score.shape == (1,)
  assert score[0] == pytest.approx(expected)


@pytest.mark.parametrize("pooling, expected", [("max", 5.0), ("sum", 11.0), ("mean", 11 / 3)])
def test_pooling_of_three_attributes(pooling, expected):
  labels = _labels("a1_age_approx", "a2_weight_approx", "a9_face_complete")
  assert attributes.privacy_score(labels, _PREFS, pooling)[0] == pytest.approx(expected)


@pytest.mark.parametrize("pooling", attributes.POOLINGS)
def test_safe_image_and_image_without_labels_score_zero(pooling):
  prefs = np.full((attributes.NUM_ATTRIBUTES, 2), 3.0, np.float32)
  prefs[0] = 0.0  # as preference_table builds it
  assert np.all(attributes.privacy_score(_labels("a0_safe"), prefs, pooling) == 0)
  assert np.all(
    attributes.privacy_score(np.zeros(attributes.NUM_ATTRIBUTES, bool), prefs, pooling) == 0
  )


def test_score_keeps_leading_dimensions_and_profiles():
  prefs = np.zeros((attributes.NUM_ATTRIBUTES, 2), np.float32)
  prefs[IDX["a1_age_approx"]] = [1, 5]
  prefs[IDX["a9_face_complete"]] = [3, 2]
  labels = np.stack(
    [
      np.stack(
        [
          _labels("a1_age_approx"),
          _labels("a9_face_complete"),
          _labels("a1_age_approx", "a9_face_complete"),
        ]
      ),
      np.stack([_labels("a0_safe"), _labels(), _labels("a9_face_complete")]),
    ]
  )  # (2, 3, 68)
  score = attributes.privacy_score(labels, prefs, "max")
  np.testing.assert_array_equal(score, [[[1, 5], [3, 2], [3, 5]], [[0, 0], [0, 0], [3, 2]]])


def test_unknown_pooling_and_label_raise():
  with pytest.raises(ValueError, match="pooling"):
    attributes.privacy_score(_labels(), _PREFS, "median")
  with pytest.raises(KeyError, match="a999_nope"):
    attributes.multi_hot(["a999_nope"])


@pytest.mark.parametrize("rule", attributes.ATTRIBUTE_RULES)
def test_soft_score_of_certain_predictions_is_the_hard_score(rule):
  for labels in (_labels("a1_age_approx", "a2_weight_approx"), _labels("a0_safe"), _labels()):
    for pooling in attributes.POOLINGS:
      soft = attributes.pooled_soft_score(labels.astype(np.float32), _PREFS, pooling, rule)
      hard = attributes.privacy_score(labels, _PREFS, pooling)
      np.testing.assert_allclose(soft, hard, rtol=1e-6, atol=1e-7)


def _enumerated_expectation(probabilities, preferences, pooling):
  """E[privacy_score] by brute force: every subset of the attributes with 0 < p < 1, weighted by
  its probability (the others are certainly present or absent)."""
  uncertain = np.flatnonzero((probabilities > 0) & (probabilities < 1))
  expectation = np.zeros(preferences.shape[1])
  for subset in range(2 ** len(uncertain)):
    present = probabilities >= 1
    chosen = np.array([(subset >> bit) & 1 for bit in range(len(uncertain))], bool)
    present[uncertain] = chosen
    weight = np.prod(np.where(chosen, probabilities[uncertain], 1 - probabilities[uncertain]))
    score = attributes.privacy_score(present, preferences, pooling).astype(np.float64)
    expectation += weight * score
  return expectation


def _random_case(seed, num_uncertain=7, num_profiles=3):
  """Probabilities on a few attributes (a0_safe among them, one certain), the rest 0; preferences
  with ties, a 0 and a negative `missing_value`-like entry, one column per profile."""
  rng = np.random.default_rng(seed)
  chosen = rng.choice(np.arange(1, attributes.NUM_ATTRIBUTES), num_uncertain, replace=False)
  probabilities = np.zeros(attributes.NUM_ATTRIBUTES)
  probabilities[chosen] = rng.uniform(0.02, 0.98, num_uncertain)
  probabilities[0] = rng.uniform(0.1, 0.9)  # a0_safe: preference 0, but it counts in the mean.
  probabilities[chosen[0]] = 1.0
  preferences = rng.choice([1.0, 2.0, 2.0, 3.5, 5.0], (attributes.NUM_ATTRIBUTES, num_profiles))
  preferences[0] = 0.0
  preferences[chosen[1]] = [2.0, 0.0, -1.0][:num_profiles]
  return probabilities, preferences


@pytest.mark.parametrize("pooling", attributes.POOLINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_score_is_the_mean_over_every_subset_of_attributes(pooling, seed):
  probabilities, preferences = _random_case(seed)
  expected = _enumerated_expectation(probabilities, preferences, pooling)
  ours = attributes.pooled_soft_score(probabilities, preferences, pooling)
  # privacy_score's float32 (the mean's division) bounds the agreement.
  np.testing.assert_allclose(ours, expected, rtol=1e-7, atol=1e-7)
  # float32 under jit (the eval step), with a leading batch dimension.
  jitted = jax.jit(attributes.expected_privacy_score, static_argnums=2)(
    jnp.asarray(np.stack([probabilities, np.zeros_like(probabilities)]), jnp.float32),
    jnp.asarray(preferences, jnp.float32),
    pooling,
  )
  np.testing.assert_allclose(jitted, [expected, np.zeros_like(expected)], rtol=2e-6, atol=2e-6)


def test_expected_score_of_thirty_profiles_and_every_attribute():
  """P = 30 profile columns over all 68 attributes: each column is the one-profile score."""
  rng = np.random.default_rng(3)
  probabilities = rng.uniform(0, 1, (4, attributes.NUM_ATTRIBUTES)) ** 3
  preferences = attributes.preference_table("profiles_mean", per_profile=True)
  assert preferences.shape == (attributes.NUM_ATTRIBUTES, attributes.NUM_PROFILES)
  for pooling in attributes.POOLINGS:
    scores = attributes.expected_privacy_score(probabilities, preferences, pooling)
    assert scores.shape == (4, attributes.NUM_PROFILES)
    for column in (0, 17, 29):
      single = attributes.expected_privacy_score(probabilities, preferences[:, [column]], pooling)
      np.testing.assert_allclose(scores[:, [column]], single, rtol=1e-6)


def test_expected_max_by_hand_and_against_the_product_rule():
  """Face (5) and age (2), each present with probability 1/2: the max is 5 half the time, 2 a
  quarter, 0 a quarter: 3. The product rule says max(2.5, 1) = 2.5."""
  probabilities = np.zeros(attributes.NUM_ATTRIBUTES)
  probabilities[[IDX["a9_face_complete"], IDX["a1_age_approx"]]] = 0.5
  assert attributes.pooled_soft_score(probabilities, _PREFS, "max")[0] == pytest.approx(3.0)
  assert attributes.pooled_soft_score(probabilities, _PREFS, "max", "product")[0] == pytest.approx(
    2.5
  )
  # The mean: {face} 5, {age} 2, {both} 3.5, {} 0, each 1/4.
  assert attributes.pooled_soft_score(probabilities, _PREFS, "mean")[0] == pytest.approx(2.625)
  with pytest.raises(ValueError, match="attribute_rule"):
    attributes.pooled_soft_score(probabilities, _PREFS, "max", "median")


# --- Preference sources (small tables written here) ------------------------


def test_profiles_mean_profile_and_per_profile(studies_dir):
  mean = attributes.preference_table("profiles_mean", user_studies_dir=studies_dir)
  assert mean.shape == (68, 1) and mean.dtype == np.float32
  assert mean[IDX["a1_age_approx"], 0] == pytest.approx(2.0)  # (1 + 2 + 3) / 3
  assert mean[IDX["a9_face_complete"], 0] == pytest.approx(4.0)  # (5 + 4 + 3) / 3
  assert mean[IDX["a30_credit_card"], 0] == pytest.approx(14 / 3)  # (4 + 5 + 5) / 3
  assert mean[0, 0] == 0

  profile = attributes.preference_table("profile", profile_index=2, user_studies_dir=studies_dir)
  assert profile.shape == (68, 1)
  assert profile[IDX["a1_age_approx"], 0] == 3 and profile[IDX["a9_face_complete"], 0] == 3
  assert profile[IDX["a30_credit_card"], 0] == 5

  per_profile = attributes.preference_table(
    "profile", per_profile=True, user_studies_dir=studies_dir
  )
  assert per_profile.shape == (68, 3)
  np.testing.assert_array_equal(per_profile[IDX["a9_face_complete"]], [5, 4, 3])
  np.testing.assert_array_equal(per_profile[0], [0, 0, 0])
  # Image with a1 and a9, per profile: max(1, 5), max(2, 4), max(3, 3).
  score = attributes.privacy_score(_labels("a1_age_approx", "a9_face_complete"), per_profile, "max")
  np.testing.assert_array_equal(score, [5, 4, 3])


def test_missing_attribute_takes_missing_value(studies_dir):
  table = attributes.preference_table(
    "profiles_mean", missing_value=2.5, user_studies_dir=studies_dir
  )
  assert table[IDX["a2_weight_approx"], 0] == 2.5  # not in the table
  assert table[0, 0] == 0  # a0_safe stays 0
  assert table[IDX["a1_age_approx"], 0] == pytest.approx(2.0)
  # Image with a1 (2.0) and the unrated a2 (2.5): max 2.5, sum 4.5, mean 2.25.
  labels = _labels("a1_age_approx", "a2_weight_approx")
  got = [attributes.privacy_score(labels, table, p)[0] for p in ("max", "sum", "mean")]
  np.testing.assert_allclose(got, [2.5, 4.5, 2.25])


def test_user_study_1_drops_control_rows(studies_dir):
  table = attributes.preference_table("user_study_1", user_studies_dir=studies_dir)
  assert table.shape == (68, 1)
  assert table[IDX["a1_age_approx"], 0] == pytest.approx(2.0)  # (1 + 1 + 2 + 4) / 4
  assert table[IDX["a9_face_complete"], 0] == pytest.approx(4.0)  # (5 + 5 + 4 + 2) / 4
  ids, values = attributes.read_preference_tsv(studies_dir / "user_study_1.tsv")
  assert ids == ["a1_age_approx", "a9_face_complete"] and values.shape == (2, 4)


def test_user_file_is_averaged_over_its_columns(tmp_path):
  path = _write(
    tmp_path / "mine.tsv", [("a49_phone", "Phone", [2, 3]), ("a31_passport", "Passport", [5, 4])]
  )
  table = attributes.preference_table("file", preferences_file=str(path))
  assert table[IDX["a49_phone"], 0] == pytest.approx(2.5)
  assert table[IDX["a31_passport"], 0] == pytest.approx(4.5)
  assert table[IDX["a9_face_complete"], 0] == 0  # missing_value default
  labels = _labels("a49_phone", "a31_passport")
  assert attributes.privacy_score(labels, table, "max")[0] == pytest.approx(4.5)
  assert attributes.privacy_score(labels, table, "sum")[0] == pytest.approx(7.0)


def test_source_argument_errors(studies_dir):
  with pytest.raises(ValueError, match="score.source"):
    attributes.preference_table("everyone", user_studies_dir=studies_dir)
  with pytest.raises(ValueError, match="profile_index"):
    attributes.preference_table("profile", profile_index=3, user_studies_dir=studies_dir)
  with pytest.raises(ValueError, match="per_profile"):
    attributes.preference_table("user_study_1", per_profile=True, user_studies_dir=studies_dir)
  with pytest.raises(ValueError, match="preferences_file"):
    attributes.preference_table("file")


# --- The bundled tables (expectations computed with awk from the TSVs) -------

_A9_PROFILES = [
  4.0,
  4.72727272727,
  1.22222222222,
  2.75,
  2.80952380952,
  1.66666666667,
  5.0,
  4.90909090909,
  2.83333333333,
  5.0,
  4.69565217391,
  2.0,
  3.14285714286,
  3.28571428571,
  2.66666666667,
  1.88888888889,
  2.28571428571,
  4.90909090909,
  4.77272727273,
  1.0,
  5.0,
  3.65,
  2.58333333333,
  4.85714285714,
  4.5,
  3.0,
  3.33333333333,
  3.2,
  5.0,
  2.0,
]


def test_bundled_profile_table():
  per_profile = attributes.preference_table("profiles_mean", per_profile=True)
  assert per_profile.shape == (68, attributes.NUM_PROFILES)
  np.testing.assert_allclose(per_profile[IDX["a9_face_complete"]], _A9_PROFILES, rtol=1e-6)
  assert np.all(per_profile[0] == 0) and np.all((per_profile[1:] >= 1) & (per_profile[1:] <= 5))
  mean = attributes.preference_table("profiles_mean")
  assert mean[IDX["a9_face_complete"], 0] == pytest.approx(3.4229743606, abs=1e-6)
  assert mean[IDX["a30_credit_card"], 0] == pytest.approx(4.0602212602, abs=1e-6)
  assert attributes.preference_table("profile", profile_index=6)[IDX["a9_face_complete"], 0] == 5.0
  # VISPR's own definition: the max over the image's attributes, per profile.
  score = attributes.privacy_score(_labels("a9_face_complete", "a30_credit_card"), mean, "max")
  assert score[0] == pytest.approx(4.0602212602, abs=1e-6)


def test_bundled_user_study_1():
  ids, values = attributes.read_preference_tsv(attributes.USER_STUDIES_DIR / "user_study_1.tsv")
  assert values.shape == (67, 305)
  assert not any("_control_" in i for i in ids)
  table = attributes.preference_table("user_study_1")
  assert table[IDX["a9_face_complete"], 0] == pytest.approx(3.6950819672, abs=1e-6)
  assert table[IDX["a31_passport"], 0] == pytest.approx(4.1704918033, abs=1e-6)
  assert table[0, 0] == 0


# --- Malformed TSVs --------------------------------------------------------


@pytest.mark.parametrize(
  "body, message",
  [
    ("a1_age_approx\tAge\t1\tx\n", "non-numeric"),
    ("a1_age_approx\tAge\t1\t6\n", "1..5"),
    ("a1_age_approx\tAge\t0\t2\n", "1..5"),
    ("a1_age_approx\tAge\t\t\n", "no preference values"),
    ("a1_age_approx\tAge\t1\t2\na2_weight_approx\tWeight\t3\n", "different numbers of raters"),
    ("a999_unknown\tNope\t1\t2\n", "unknown attribute"),
    ("a0_safe\tSafe\t1\t2\n", "a0_safe"),
    ("attribute_id\tattribute_name\tu0\n", "no preference rows"),
    ("", "no preference rows"),
  ],
)
def test_malformed_tsv_errors(tmp_path, body, message):
  path = tmp_path / "bad.tsv"
  path.write_text(body)
  with pytest.raises(ValueError, match=message):
    attributes.read_preference_tsv(path)
  with pytest.raises(ValueError, match=message):
    attributes.preference_table("file", preferences_file=str(path))


# --- The score in the pipeline's config helpers ------------------------------


def test_preferences_from_config_follows_config_score(tmp_path):
  config = default.get_config()
  np.testing.assert_array_equal(
    input_pipeline.score_preferences(config.score), attributes.preference_table("profiles_mean")
  )
  config.score.source, config.score.profile_index = "profile", 6
  assert input_pipeline.score_preferences(config.score)[IDX["a9_face_complete"], 0] == 5.0
  config.score.per_profile = True
  assert input_pipeline.score_preferences(config.score).shape == (68, 30)
  path = _write(tmp_path / "mine.tsv", [("a49_phone", "Phone", [2, 3])])
  config.score.update(
    source="file", preferences_file=str(path), per_profile=False, missing_value=1.5
  )
  table = input_pipeline.score_preferences(config.score)
  assert (
    table[IDX["a49_phone"], 0] == 2.5 and table[IDX["a31_passport"], 0] == 1.5 and table[0, 0] == 0
  )
