"""The baselines (AP-PR, PR-CNN) and personalised (30-profile) risk for every model.

Each model trains two steps with `score.per_profile=True` on the tiny synthetic data, once per
module (`runs`), and the tests read its eval_test.json and checkpoints. The rest are hand-made
cases of the evaluation plumbing and of the scores' dependence on the preferences.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.training import checkpoints
from privattnet_jax import data as data_lib
from privattnet_jax.data import input_pipeline
from privattnet_jax.evaluation import metrics as metrics_lib
from privattnet_jax.training import train
from privattnet_jax.training import train_steps
from privattnet_jax.models import scoring
from privattnet_jax.training import evaluator
from privattnet_jax.training import experiment as experiment_lib
from privattnet_jax import models
from privattnet_jax.training import loss as loss_lib
from privattnet_jax.training import restore, train_state
from tests.conftest import make_task, make_tiny_config

MODELS = ("privattnet", "privattnet_mlc", "privnet", "ap_pr", "pr_cnn")
NUM_PROFILES = attributes.NUM_PROFILES


def _config(data_dir, name, per_profile=True):
  config = make_tiny_config(data_dir, name)
  config.score.per_profile = per_profile
  config.num_train_steps = 2
  return config


@pytest.fixture(scope="module", autouse=True)
def quick_compilation():
  """XLA's cheapest compilation for this module: its runs are compile-bound (2 steps, 12 images
  per split), and the optimisations change no result these tests read."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory):
  """name -> (config, workdir, eval_test.json) of a per-profile run, trained on first use."""
  done = {}

  def get(name):
    if name not in done:
      config = _config(tiny_data_dir, name)
      workdir = tmp_path_factory.mktemp(name)
      train.train_and_evaluate(config, str(workdir))
      done[name] = (config, workdir, json.loads((workdir / "eval_test.json").read_text()))
    return done[name]

  return get


@pytest.mark.parametrize("name", MODELS)
def test_per_profile_run_reports_each_profile_their_mean_and_the_table_row(runs, name):
  config, workdir, metrics = runs(name)
  num_test = config.data.synthetic.num_test
  assert len(metrics["per_profile"]) == NUM_PROFILES
  assert all(profile["n"] == num_test for profile in metrics["per_profile"])
  for key in ("l1", "mse"):
    assert metrics[key] == pytest.approx(
      np.mean([profile[key] for profile in metrics["per_profile"]])
    )
  assert metrics["table"]["n"] == num_test and np.isfinite(metrics["table"]["l1"])
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  validation = [line for line in logged if "validation/l1" in line]
  assert validation and all("validation/table/l1" in line for line in validation)
  assert not any(isinstance(v, (dict, list)) for line in validation for v in line.values())
  # The checkpoint keeps one training mean per profile column: the mean of the 30 raw targets.
  manager = checkpoints.create_manager(workdir, keep=2, read_only=True)
  stored = checkpoints.restore_metadata(manager, manager.latest_step())["target_mean"]
  sources = data_lib.load_data_sources(config.data)
  expected = input_pipeline.split_scores(
    sources["train"], input_pipeline.score_preferences(config.score), config.score.pooling
  ).mean(axis=0)
  assert len(stored) == NUM_PROFILES and np.ptp(expected) > 0  # The profiles' means differ.
  np.testing.assert_allclose(stored, expected, rtol=1e-6)


@pytest.mark.parametrize(
  "name, ids",
  [("ap_pr", attributes.ATTRIBUTE_IDS), ("privattnet_mlc", attributes.ATTRIBUTE_IDS[1:])],
)
def test_attribute_models_report_ap_per_attribute_id(runs, name, ids):
  _, _, metrics = runs(name)
  assert tuple(metrics["attribute_ap"]) == ids
  present = [ap for ap in metrics["attribute_ap"].values() if ap is not None]
  assert present and all(0 <= ap <= 1 for ap in present)
  assert metrics["attribute_map"] == pytest.approx(np.mean(present))


@pytest.mark.parametrize("name", ["ap_pr", "privattnet_mlc"])
def test_attribute_models_start_at_the_training_labels_log_prior_odds(runs, name):
  """Two steps (the first at learning rate 0 of the warm-up) leave the output bias where
  `model.attribute_bias_init='prior'` put it."""
  config, workdir, _ = runs(name)
  labels = input_pipeline.split_labels(data_lib.load_data_sources(config.data)["train"])
  prior = attributes.log_prior_odds(labels)
  never_seen = np.log(0.5 / (len(labels) + 0.5))
  assert prior.shape == (68,) and np.isclose(prior, never_seen).sum() > 40
  head = jax.device_get(restore.restore_checkpoint(workdir).state.params["head"])
  if name == "ap_pr":
    bias, expected = head["output"]["bias"], prior
  else:
    bias, expected = head["steps"]["regressor"]["output"]["bias"], prior[1:]
  np.testing.assert_allclose(bias, expected, atol=1e-3)


def _planted_features(rng, num, directions, ids, grid=4):
  """Noise features (num, grid, grid, D) with, for each of `ids` present (p = 1/4 each), its
  direction added at one random cell; images with none are `a0_safe`."""
  features = rng.normal(size=(num, grid, grid, directions.shape[1])).astype(np.float32)
  labels = np.zeros((num, attributes.NUM_ATTRIBUTES), np.float32)
  present = rng.random((num, len(ids))) < 0.25
  labels[:, 0] = ~present.any(axis=1)
  for row, k in zip(*np.nonzero(present)):
    labels[row, ids[k]] = 1
    y, x = rng.integers(grid, size=2)
    features[row, y, x] += 2.0 * directions[k]
  return features, labels


def _mlc_map_after_training(tiny_data_dir, bias_init, steps=30, seed=0):
  """PrivAttNet_MLC's head, trained by the real train step on planted features, then its
  test mAP over the planted attributes and the chance level (their frequency)."""
  config = make_tiny_config(tiny_data_dir, "privattnet_mlc")
  config.input.image_size = 64  # A 4 x 4 grid.
  config.model.encoder.trainable = False
  config.model.attention.hidden_size = 32
  config.model.attention.regressor_hidden = 16
  config.optim.warmup_steps = 10
  rng = np.random.default_rng(seed)
  channels = models.encoder_output_channels(config.model.encoder, 3)
  ids = [
    attributes.ATTRIBUTE_INDEX[a]
    for a in ("a1_age_approx", "a9_face_complete", "a30_credit_card", "a49_phone")
  ]
  directions = rng.normal(size=(len(ids), channels))
  train_features, train_labels = _planted_features(rng, 256, directions, ids)
  test_features, test_labels = _planted_features(rng, 128, directions, ids)
  task = make_task("attributes", attributes.preference_table())
  model = models.create_model(config.model, 1, batchnorm_axis_name=train_steps.AXIS)
  prior = attributes.log_prior_odds(train_labels > 0)
  bias = (
    (lambda params: models.with_attribute_bias(params, config.model, prior))
    if (bias_init == "prior")
    else None
  )
  state = train_state.create_train_state(
    model,
    (64, 64, 3),
    config.model.encoder,
    config.optim,
    steps,
    jax.random.PRNGKey(seed),
    attribute_bias=bias,
  )
  mesh = train_steps.create_mesh()
  train_step = train_steps.parallel_train_step(mesh, task)

  def batch(features, labels):
    n = len(features)
    batch = {
      "features": features,
      "labels": labels,
      "score": np.zeros((n, 1), np.float32),
      "mask": np.ones(n, np.float32),
    }
    return train_steps.shard_batch(batch, mesh)

  for _ in range(steps):
    rows = rng.choice(len(train_features), 32, replace=False)
    state, _ = train_step(state, batch(train_features[rows], train_labels[rows]))
  outputs = train_steps.parallel_eval_step(mesh, task)(state, batch(test_features, test_labels))
  probabilities = np.asarray(outputs["attribute_probabilities"])[:, [i - 1 for i in ids]]
  mean_ap = metrics_lib.mean_average_precision(probabilities, test_labels[:, ids] > 0)["map"]
  return mean_ap, test_labels[:, ids].mean()


def test_mlc_learns_its_attributes_from_the_prior_bias_and_not_from_torch_init(tiny_data_dir):
  """With every logit near 0 at the start (PyTorch's init), the 63 attributes that never occur
  push the shared per-step head down for most of the run and the planted ones stay near chance;
  from their log prior odds it learns them (docs/benchmarks.md, "PrivAttNet_MLC")."""
  prior_map, chance = _mlc_map_after_training(tiny_data_dir, "prior")
  uniform_map, _ = _mlc_map_after_training(tiny_data_dir, "uniform")
  assert chance < 0.3
  assert prior_map > 0.75
  assert prior_map > uniform_map + 0.2


def test_pr_cnn_table_row_is_the_profile_mean_prediction_against_the_profile_mean_score(runs):
  config, workdir, metrics = runs("pr_cnn")
  experiment = experiment_lib.Experiment(config, workdir, need_train=False)
  state = experiment.restore(experiment.manager.best_step())
  result = evaluator.evaluate(
    state, experiment.eval_fn, experiment.feed.eval_batches("test"), experiment.mesh
  )
  assert (
    result.predictions.shape
    == result.targets.shape
    == (config.data.synthetic.num_test, NUM_PROFILES)
  )
  assert "table" not in result.metrics  # Without the task there is no table to pool with.
  labels = result.extras["labels"] > 0
  target = attributes.privacy_score(labels, attributes.preference_table("profiles_mean"), "max")[
    :, 0
  ]
  # Max pooling: the score of the averaged preferences is at most the average of the profile scores.
  assert np.all(target <= result.targets.mean(axis=1) + 1e-5)
  expected = metrics_lib.regression_metrics(result.predictions.mean(axis=1), target)
  for key in ("l1", "mse", "pearson", "spearman"):
    assert metrics["table"][key] == pytest.approx(expected[key], rel=1e-5)


def test_ap_pr_checkpoint_serves_the_scalar_table_and_its_row_is_the_table_row(runs, tmp_path):
  """AP-PR trains on attributes alone: per_profile=False evaluates the same checkpoint on the
  profile-mean score, and gives exactly the per-profile run's table row."""
  config, workdir, metrics = runs("ap_pr")
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  scalar_config = _config(config.data.data_dir, "ap_pr", per_profile=False)
  scalar = evaluator.evaluate_checkpoint(scalar_config, str(tmp_path), "test")
  assert "per_profile" not in scalar and "table" not in scalar
  # The same scores up to float32 rounding (the expected max's cumulative product, on the device
  # here, in numpy for the table row); after two steps they barely vary over the 12 images, so
  # the correlations carry that rounding in their 5th digit.
  for key in ("l1", "mse", "n"):
    assert scalar[key] == pytest.approx(metrics["table"][key], rel=1e-5)
  for key in ("pearson", "spearman"):
    assert scalar[key] == pytest.approx(metrics["table"][key], abs=1e-4)
  assert scalar["attribute_map"] == pytest.approx(metrics["attribute_map"])


def test_regression_checkpoint_refuses_another_number_of_score_columns(runs):
  config, workdir, _ = runs("pr_cnn")
  with pytest.raises(ValueError, match="predict 30 score column.*this config 1"):
    experiment_lib.Experiment(
      _config(config.data.data_dir, "pr_cnn", per_profile=False), workdir, need_train=False
    )


@pytest.mark.parametrize("pooling", attributes.POOLINGS)
@pytest.mark.parametrize("num_logits", [68, 67])  # AP-PR, PrivAttNet_MLC.
def test_personalised_attribute_scores_follow_the_preferences(pooling, num_logits):
  """Raising one profile's preference for faces raises that profile's score of the image with a
  face, and leaves the image without one and the other profile alone."""
  face, age = (
    attributes.ATTRIBUTE_INDEX["a9_face_complete"],
    attributes.ATTRIBUTE_INDEX["a1_age_approx"],
  )
  logits = np.full((2, attributes.NUM_ATTRIBUTES), -12.0, np.float32)
  logits[:, age] = 12.0  # Both images show an age cue; only image 0 a face.
  logits[0, face] = 12.0
  low = np.ones((attributes.NUM_ATTRIBUTES, 2), np.float32)
  low[0] = 0.0  # a0_safe
  low[face] = [2.0, 3.0]
  high = low.copy()
  high[face, 0] = 4.0

  def scores(preferences):
    task = make_task("attributes", preferences, pooling=pooling)
    return np.asarray(scoring.predicted_scores({"attribute_logits": logits[:, -num_logits:]}, task))

  before, after = scores(low), scores(high)
  # The hard score of the same images, which the soft score approaches as the logits grow.
  present = logits > 0
  np.testing.assert_allclose(before, attributes.privacy_score(present, low, pooling), atol=1e-2)
  np.testing.assert_allclose(after, attributes.privacy_score(present, high, pooling), atol=1e-2)
  assert after[0, 0] > before[0, 0] + 0.9  # max 2 -> 4, sum 3 -> 5, mean 1.5 -> 2.5.
  np.testing.assert_allclose(after[1], before[1], atol=1e-3)
  np.testing.assert_array_equal(after[:, 1], before[:, 1])
  assert before[0, 1] > before[1, 1]  # Within one table too: the face costs more than its absence.


def test_per_profile_targets_are_normalised_per_column():
  task = make_task("regression", np.ones((68, 2), np.float32), np.array([1.0, 3.0], np.float32))
  outputs = {"score": np.array([[0.0, 0.0], [2.0, -2.0]], np.float32)}
  batch = {"score": np.array([[1.0, 3.0], [3.0, 1.0]], np.float32), "mask": np.ones(2, np.float32)}
  # Normalised targets [[0, 0], [4, -4]]: squared errors [[0, 0], [4, 4]], per-example means 0 and 4.
  assert float(loss_lib.compute_loss(outputs, batch, task)[1]["data_loss"]) == pytest.approx(2.0)
  np.testing.assert_allclose(scoring.predicted_scores(outputs, task), [[1.0, 3.0], [2.0, 2.0]])


def test_pr_cnn_loss_is_8_over_p_times_caffe_euclidean_loss():
  """configs/pr_cnn.py: our MSE on (y - mean) * 2 = 8 / P * sum_n ||yhat_n - y_n||^2 / (2N)."""
  rng = np.random.default_rng(0)
  task = make_task(
    "regression",
    np.ones((68, NUM_PROFILES), np.float32),
    rng.uniform(1, 3, NUM_PROFILES).astype(np.float32),
  )
  outputs = {"score": rng.normal(size=(5, NUM_PROFILES)).astype(np.float32)}
  batch = {
    "score": rng.uniform(0, 5, (5, NUM_PROFILES)).astype(np.float32),
    "mask": np.ones(5, np.float32),
  }
  raw_predictions = np.asarray(scoring.predicted_scores(outputs, task))
  caffe = np.square(raw_predictions - batch["score"]).sum() / (2 * 5)
  ours = float(loss_lib.compute_loss(outputs, batch, task)[1]["data_loss"])
  assert ours == pytest.approx(8 / NUM_PROFILES * caffe, rel=1e-5)
