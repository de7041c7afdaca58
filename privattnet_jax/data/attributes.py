"""The 68 VISPR privacy attributes, user preference tables and the privacy score.

Pure numpy: the input pipeline computes the target from an image's attribute
labels and a preference table, so one dataset build serves every definition of
the score (VISPR's max pooling, sum, mean; one profile, the profile average, a
user study, a user's own ratings, or all 30 profiles at once).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import numpy as np

from privattnet_jax.data import text_files

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data"
ATTRIBUTES_TSV = DATA_DIR / "attributes.tsv"
USER_STUDIES_DIR = DATA_DIR / "user_studies"
SPLITS_DIR = DATA_DIR / "splits"

SAFE_ATTRIBUTE = "a0_safe"
POOLINGS = ("max", "sum", "mean")
# How attribute models turn probabilities into a score (`pooled_soft_score`).
ATTRIBUTE_RULES = ("expected", "product")
PREFERENCE_SOURCES = ("profiles_mean", "profile", "user_study_1", "file")
NUM_PROFILES = 30


@dataclasses.dataclass(frozen=True)
class Attribute:
  index: int
  attribute_id: str
  group: str
  description: str


@functools.lru_cache(maxsize=None)
def load_attributes(path: str | pathlib.Path = ATTRIBUTES_TSV) -> tuple[Attribute, ...]:
  """Reads `attributes.tsv` (idx, attribute_id, group, description), in idx order."""
  lines = pathlib.Path(path).read_text().splitlines()
  attributes = []
  for line in lines[1:]:
    if not line.strip():
      continue
    idx, attribute_id, group, description = line.split("\t")
    attributes.append(Attribute(int(idx), attribute_id, group, description))
  if [a.index for a in attributes] != list(range(len(attributes))):
    raise ValueError(f"{path}: attribute indices are not 0..{len(attributes) - 1} in order")
  if attributes[0].attribute_id != SAFE_ATTRIBUTE:
    raise ValueError(f"{path}: the first attribute must be {SAFE_ATTRIBUTE}")
  return tuple(attributes)


ATTRIBUTE_IDS: tuple[str, ...] = tuple(a.attribute_id for a in load_attributes())
NUM_ATTRIBUTES = len(ATTRIBUTE_IDS)  # 68, a0_safe first.
ATTRIBUTE_INDEX: dict[str, int] = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}


def multi_hot(labels: Sequence[str]) -> np.ndarray:
  """(68,) bool vector for a list of attribute ids; raises KeyError on an unknown id."""
  vector = np.zeros(NUM_ATTRIBUTES, dtype=bool)
  for label in labels:
    if label not in ATTRIBUTE_INDEX:
      raise KeyError(
        f"unknown attribute id {label!r} (not among the {NUM_ATTRIBUTES} in attributes.tsv)"
      )
    vector[ATTRIBUTE_INDEX[label]] = True
  return vector


def read_preference_tsv(path: str | pathlib.Path) -> tuple[list[str], np.ndarray]:
  """Reads a preference table: rows of attribute_id, attribute_name, then one column per rater.

  A header row (first field `attribute_id`) is optional; VISPR's control rows
  (`a105_control_*` .. `a109_control_*`) are dropped. Values must be numbers in 1..5.
  A byte-order mark, CRLF line ends and spaces around fields are tolerated (`text_files`).
  Returns the attribute ids and a float (rows, raters) array.
  """
  ids, rows = [], []
  for line_number, line in enumerate(text_files.read_lines(path), start=1):
    fields = [field.strip() for field in line.split("\t")]
    if not line.strip() or fields[0] == "attribute_id":
      continue
    if "_control_" in fields[0]:
      continue
    values = [f for f in fields[2:] if f.strip()]
    if not values:
      raise ValueError(f"{path}:{line_number}: {fields[0]!r} has no preference values")
    try:
      row = [float(v) for v in values]
    except ValueError as e:
      raise ValueError(
        f"{path}:{line_number}: non-numeric preference for {fields[0]!r}: {e}"
      ) from None
    if not all(1 <= v <= 5 for v in row):  # Also refuses nan and inf.
      raise ValueError(f"{path}:{line_number}: preferences for {fields[0]!r} must lie in 1..5")
    ids.append(fields[0])
    rows.append(row)
  if not rows:
    raise ValueError(f"{path}: no preference rows")
  if len({len(r) for r in rows}) != 1:
    raise ValueError(f"{path}: rows have different numbers of raters")
  unknown = [a for a in ids if a not in ATTRIBUTE_INDEX]
  if unknown:
    raise ValueError(f"{path}: unknown attribute ids {unknown}")
  if SAFE_ATTRIBUTE in ids:
    raise ValueError(f"{path}: {SAFE_ATTRIBUTE} has no preference (it scores 0)")
  return ids, np.asarray(rows, dtype=np.float64)


def preference_table(
  source: str = "profiles_mean",
  *,
  profile_index: int = 0,
  preferences_file: str = "",
  per_profile: bool = False,
  missing_value: float = 0.0,
  user_studies_dir: str | pathlib.Path = USER_STUDIES_DIR,
) -> np.ndarray:
  """The (68, P) preference matrix in attribute order; row 0 (`a0_safe`) is 0.

  source: `profiles_mean` (the 30 profiles of user_profiles.tsv averaged),
  `profile` (column `profile_index` of it), `user_study_1` (mean over its 305
  users), `file` (a user's own TSV of the same shape, averaged over its columns).
  per_profile: P = 30, one column per profile (only with the profile table).
  missing_value: the preference of an attribute the table does not rate.
  """
  user_studies_dir = pathlib.Path(user_studies_dir)
  if source not in PREFERENCE_SOURCES:
    raise ValueError(f"score.source must be one of {PREFERENCE_SOURCES}, got {source!r}")
  if per_profile and source not in ("profiles_mean", "profile"):
    raise ValueError("per_profile targets need the profile table (source profiles_mean or profile)")
  if source in ("profiles_mean", "profile"):
    ids, values = read_preference_tsv(user_studies_dir / "user_profiles.tsv")
    if per_profile:
      pass
    elif source == "profile":
      if not 0 <= profile_index < values.shape[1]:
        raise ValueError(
          f"score.profile_index must be in 0..{values.shape[1] - 1}, got {profile_index}"
        )
      values = values[:, [profile_index]]
    else:
      values = values.mean(axis=1, keepdims=True)
  elif source == "user_study_1":
    ids, values = read_preference_tsv(user_studies_dir / "user_study_1.tsv")
    values = values.mean(axis=1, keepdims=True)
  else:
    if not preferences_file:
      raise ValueError("score.source='file' needs score.preferences_file")
    ids, values = read_preference_tsv(preferences_file)
    values = values.mean(axis=1, keepdims=True)
  table = np.full((NUM_ATTRIBUTES, values.shape[1]), missing_value, dtype=np.float64)
  table[0] = 0.0
  for attribute_id, row in zip(ids, values):
    table[ATTRIBUTE_INDEX[attribute_id]] = row
  return table.astype(np.float32)


def privacy_score(labels: np.ndarray, preferences: np.ndarray, pooling: str = "max") -> np.ndarray:
  """score(image, profile) = pool over the image's attributes of the profile's preference.

  labels: (..., 68) multi-hot; preferences: (68, P). Returns (..., P) float32.
  `a0_safe` has preference 0, so a safe image scores 0 under every pooling.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"score.pooling must be one of {POOLINGS}, got {pooling!r}")
  present = np.asarray(labels, dtype=bool)[..., :, None]  # (..., 68, 1)
  values = np.where(present, preferences, 0.0)  # (..., 68, P)
  if pooling == "max":
    score = values.max(axis=-2)
  elif pooling == "sum":
    score = values.sum(axis=-2)
  else:
    count = np.maximum(present.sum(axis=-2), 1)
    score = values.sum(axis=-2) / count
  return score.astype(np.float32)


def log_prior_odds(labels: np.ndarray) -> np.ndarray:
  """(68,) log(f / (1 - f)) of each attribute's frequency f in (N, 68) labels.

  f = (count + 1/2) / (N + 1), so an attribute never (or always) seen stays finite. An attribute
  model's output bias starts here (`model.attribute_bias_init`), as detection heads do.
  """
  labels = np.asarray(labels, dtype=bool)
  frequency = (labels.sum(axis=0) + 0.5) / (len(labels) + 1.0)
  return np.log(frequency / (1.0 - frequency)).astype(np.float32)


def pooled_soft_score(probabilities, preferences, pooling: str = "max", rule: str = "expected"):
  """The privacy score from predicted attribute probabilities (attribute models).

  rule `expected` (the default): the expectation of `privacy_score` when each attribute is
  present independently with its probability (`expected_privacy_score`). rule `product`, the
  earlier reading, kept for comparison: each attribute contributes its preference times its
  probability; `max` takes the largest product, `sum` adds them (the same as `expected`),
  `mean` divides the sum by the expected number of present attributes. Both give the ground
  truth for probabilities of 0 and 1. Works on numpy and jax arrays alike (and under jit).
  probabilities: (..., K) in [0, 1]; preferences: (K, P). Returns (..., P).
  """
  if pooling not in POOLINGS:
    raise ValueError(f"score.pooling must be one of {POOLINGS}, got {pooling!r}")
  if rule == "expected":
    return expected_privacy_score(probabilities, preferences, pooling)
  if rule != "product":
    raise ValueError(f"score.attribute_rule must be one of {ATTRIBUTE_RULES}, got {rule!r}")
  xp = _array_module(probabilities)
  weighted = probabilities[..., :, None] * preferences
  if pooling == "max":
    return weighted.max(axis=-2)
  if pooling == "sum":
    return weighted.sum(axis=-2)
  return weighted.sum(axis=-2) / xp.maximum(probabilities[..., None].sum(axis=-2), 1.0)


def expected_privacy_score(probabilities, preferences, pooling: str = "max"):
  """E[privacy_score(x)] for independent attributes x_k ~ Bernoulli(p_k); exact, no sampling.

  The ground truth pools the preferences of the attributes present, so a score of uncertain
  probabilities should be its expectation rather than a pooled product p * pref, which for max
  pooling sits far below it. As in `privacy_score`, no attribute present scores 0, max pooling
  counts absent attributes as 0, and every present attribute (a0_safe too) counts in the mean.
  - max: rank the attributes by preference, highest first (ties in any order);
    E = sum_k pref_k p_k prod_{j<k} (1 - p_j): attribute k sets the max when it is present and
    none ranked above it is.
  - sum: sum_k p_k pref_k (linear).
  - mean: sum_k pref_k p_k E[1 / (1 + N_-k)], N_-k the count of the other attributes present.
    With 1 / (1 + n) = int_0^1 t^n dt, E[1 / (1 + N_-k)] = int_0^1 prod_{j != k} (1 - p_j + p_j t)
    dt, a polynomial of degree < K, which Gauss-Legendre quadrature with ceil(K / 2) nodes
    integrates exactly; the products are taken in log space (many near-zero factors).
  probabilities: (..., K); preferences: (K, P). Returns (..., P), numpy or jax as the input.
  """
  xp = _array_module(probabilities)
  probabilities = xp.asarray(probabilities)
  preferences = xp.asarray(preferences, dtype=probabilities.dtype)
  if pooling == "sum":
    return probabilities @ preferences
  if pooling == "max":
    values = xp.maximum(preferences, 0.0)
    order = xp.argsort(-values, axis=0, stable=True)  # (K, P)
    ranked_values = xp.take_along_axis(values, order, axis=0)
    ranked = probabilities[..., order]  # (..., K, P)
    none_above = xp.cumprod(1.0 - ranked, axis=-2)
    none_above = xp.concatenate([xp.ones_like(none_above[..., :1, :]), none_above[..., :-1, :]], -2)
    return (ranked_values * ranked * none_above).sum(axis=-2)
  if pooling == "mean":
    nodes, node_weights = _unit_interval_quadrature((probabilities.shape[-1] + 1) // 2)
    nodes = xp.asarray(nodes, probabilities.dtype)
    node_weights = xp.asarray(node_weights, probabilities.dtype)
    # log(1 - p_j + p_j t_q): (..., Q, K); the nodes lie strictly inside (0, 1), so no log(0).
    log_factors = xp.log1p(probabilities[..., None, :] * (nodes[:, None] - 1.0))
    others = xp.exp(log_factors.sum(axis=-1, keepdims=True) - log_factors)
    inverse_count = (node_weights[:, None] * others).sum(axis=-2)  # (..., K)
    return (probabilities * inverse_count) @ preferences
  raise ValueError(f"score.pooling must be one of {POOLINGS}, got {pooling!r}")


@functools.cache
def _unit_interval_quadrature(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Legendre nodes and weights on [0, 1]: exact for polynomials of degree < 2 * num_nodes."""
  nodes, weights = np.polynomial.legendre.leggauss(max(num_nodes, 1))
  return (nodes + 1.0) / 2.0, weights / 2.0


def _array_module(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jnp
