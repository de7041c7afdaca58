"""The frozen-encoder feature cache: the image path's loss, stale caches rebuilt, config errors, training and resume."""

import copy
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from privattnet_jax.training import checkpoints
from privattnet_jax.training import feature_cache
from privattnet_jax.training import feeds
from privattnet_jax.data import input_pipeline
from privattnet_jax.training import train
from privattnet_jax.training import train_steps
from privattnet_jax.models import weights
from privattnet_jax.training import experiment as experiment_lib
from tests.conftest import make_tiny_config


def _cache_config(data_dir, cache_dir, **cache_fields):
  config = make_tiny_config(data_dir)
  config.model.encoder.trainable = False
  config.model.encoder.batchnorm = "frozen"
  config.feature_cache.mode = "host"
  config.feature_cache.dir = str(cache_dir)
  for name, value in cache_fields.items():
    config.feature_cache[name] = value
  return config


def _encode(experiment, state, images):
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return np.asarray(experiment.model.apply(variables, images, train=False, method="encode"))


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "model.encoder.trainable",
      True,
      r"model.encoder.trainable=False: a trained encoder's features change",
    ),
    (
      "model.encoder.batchnorm",
      "update",
      r"model.encoder.batchnorm='frozen', got 'update'.*depend on the other images in its batch",
    ),
    (
      "feature_cache.dtype",
      "float16",
      r"feature_cache.dtype must be one of \('bfloat16', 'float32'\)",
    ),
    ("feature_cache.train_views", -1, r"feature_cache.train_views must be an integer >= 0"),
    ("feature_cache.splits", ("train", "train"), r"feature_cache.splits must be distinct names"),
    ("feature_cache.splits", ("dev",), r"feature_cache.splits must be distinct names"),
    (
      "feature_cache.mode",
      "disk",
      r"feature_cache.mode must be one of \('off', 'host', 'device'\), got 'disk'",
    ),
  ],
)
def test_config_errors_name_the_field_and_why(tiny_data_dir, tmp_path, field, value, message):
  config = _cache_config(tiny_data_dir, tmp_path / "cache")
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=message):
    experiment_lib.Experiment(config, tmp_path / "run")
  config.feature_cache.mode = "off"  # Without the cache the same fields are not its business.
  if not field.startswith("feature_cache."):
    experiment_lib.validate_config(config)


@pytest.fixture(scope="module")
def validation_cache(tiny_data_dir, tmp_path_factory):
  """An experiment whose fp32 cache holds the validation split; tests that change it copy it first."""
  root = tmp_path_factory.mktemp("validation_cache")
  config = _cache_config(tiny_data_dir, root / "cache", dtype="float32", splits=("validation",))
  experiment = experiment_lib.Experiment(config, root / "run")
  images = next(
    iter(
      input_pipeline.create_eval_batches(
        experiment.sources["validation"], config.input, experiment.task
      )
    )
  )
  return experiment, images


def test_cached_features_give_the_image_path_loss(validation_cache, tmp_path):
  experiment, image_batch = validation_cache
  results = {}
  for dtype in ("float32", "bfloat16"):
    if (
      dtype == "bfloat16"
    ):  # The same experiment with a bf16 cache (a shallow copy: the fixture stays).
      experiment = copy.copy(experiment)
      experiment.config = experiment.config.copy_and_resolve_references()
      experiment.config.feature_cache.dtype, experiment.config.feature_cache.dir = (
        dtype,
        str(tmp_path / "bf16"),
      )
      experiment.feed = feeds.select_feed(
        experiment.config.feature_cache.mode,
        experiment.config.input,
        experiment.config.seed,
        experiment.sources,
        experiment.mesh,
        experiment.task,
        steps_per_epoch=experiment.steps_per_epoch,
        prepare_cache=experiment.prepare_feature_cache,
        need_train=False,
      )
    cached_batch = next(iter(experiment.feed.eval_batches("validation")))
    assert "image" not in cached_batch
    assert cached_batch["features"].dtype == np.dtype(feature_cache.DTYPES[dtype])
    for key in ("image_id", "score", "labels", "mask", "boxes", "num_boxes"):
      np.testing.assert_array_equal(image_batch[key], cached_batch[key])
    results[dtype] = (cached_batch, _step(experiment, cached_batch))
  expected_features = _encode(experiment, experiment.initial_state, image_batch["image"])
  metrics_images, head_images, predictions_images = _step(experiment, image_batch)
  for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 1e-2)):
    cached_batch, (metrics_cache, head_cache, predictions_cache) = results[dtype]
    np.testing.assert_allclose(
      cached_batch["features"].astype(np.float32),
      expected_features,
      rtol=tolerance,
      atol=tolerance * np.abs(expected_features).max(),
    )
    for key in ("loss", "data_loss", "attention_penalty", "grad_norm"):
      assert metrics_cache[key] == pytest.approx(metrics_images[key], rel=tolerance), (dtype, key)
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=tolerance, atol=1e-6),
      head_images,
      head_cache,
    )
    np.testing.assert_allclose(predictions_cache, predictions_images, rtol=tolerance)


def _step(experiment, batch):
  """One train step from the initial state, then predictions: (metrics, new head params, predictions)."""
  state = jax.tree_util.tree_map(
    lambda x: x.copy(), experiment.initial_state
  )  # The step donates its state.
  train_fn = train_steps.parallel_train_step(experiment.mesh, experiment.task)
  new_state, metrics = train_fn(state, train_steps.shard_batch(batch, experiment.mesh))
  predictions = experiment.eval_fn(new_state, train_steps.shard_batch(batch, experiment.mesh))[
    "prediction"
  ]
  return jax.device_get((metrics, new_state.params["head"], predictions))


def test_a_cache_of_other_weights_or_preprocessing_is_rebuilt_never_used(
  validation_cache, tmp_path, caplog
):
  first, image_batch = validation_cache
  images = image_batch["image"]
  cache_dir = tmp_path / "cache"
  shutil.copytree(
    first.feed.cache.directory, cache_dir
  )  # Built with the fixture's encoder weights.

  def cached_features():
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    source = feature_cache.FeatureCache(cache_dir, manifest).source("validation")
    return np.stack([source[i]["features"] for i in range(len(images))])

  np.testing.assert_allclose(
    cached_features(), _encode(first, first.initial_state, images), rtol=1e-5, atol=1e-6
  )

  # Other encoder weights, from `encoder.pretrained`: the hash is taken after they are loaded.
  state = jax.device_get(first.initial_state)
  other = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
  other = jax.tree_util.tree_map(lambda x: x * 1.5, other)
  config = first.config.copy_and_resolve_references()
  config.feature_cache.dir = str(cache_dir)
  config.model.encoder.pretrained = str(weights.save_encoder(tmp_path / "other.msgpack", other))
  with caplog.at_level(logging.INFO):
    second = experiment_lib.Experiment(config, tmp_path / "run", need_train=False)
  assert "built from other inputs: encoder.sha256" in caplog.text
  manifest = json.loads((cache_dir / "manifest.json").read_text())
  assert manifest["encoder"]["sha256"] == feature_cache.encoder_digest(second.initial_state)
  assert manifest["encoder"]["sha256"] != feature_cache.encoder_digest(first.initial_state)
  expected = _encode(second, second.initial_state, images)
  assert not np.allclose(expected, _encode(first, first.initial_state, images), rtol=1e-2)
  np.testing.assert_allclose(cached_features(), expected, rtol=1e-5, atol=1e-6)

  # Unchanged inputs reuse the cache.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    second.prepare_feature_cache()
  assert "Using the feature cache" in caplog.text and "Building" not in caplog.text

  # Other preprocessing (here the stored dtype) rebuilds it.
  config.feature_cache.dtype = "bfloat16"
  caplog.clear()
  with caplog.at_level(logging.INFO):
    rebuilt = second.prepare_feature_cache()
  assert "preprocessing.dtype: 'float32' -> 'bfloat16'" in caplog.text
  assert rebuilt.source("validation")[0]["features"].dtype == np.dtype(
    feature_cache.DTYPES["bfloat16"]
  )

  # A damaged cache (a file gone) is rebuilt, not read.
  (cache_dir / "validation-00000-of-00001.array_record").unlink()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    second.prepare_feature_cache()
  assert "validation file validation-00000-of-00001.array_record is unreadable" in caplog.text
  assert (
    len(
      grain.sources.ArrayRecordDataSource(
        [str(cache_dir / "validation-00000-of-00001.array_record")]
      )
    )
    == 12
  )


def test_view_sampler_draws_each_example_once_per_epoch_and_every_view():
  def record_keys(seed):
    inner = grain.samplers.IndexSampler(
      num_records=10, shard_options=grain.sharding.NoSharding(), shuffle=True, seed=3
    )
    sampler = input_pipeline.ViewSampler(inner, views=3, seed=seed)
    return [sampler[index].record_key for index in range(60)]

  keys = record_keys(7)
  for epoch in range(6):
    assert sorted(key // 3 for key in keys[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
  assert {key % 3 for key in keys} == {0, 1, 2}
  assert keys == record_keys(7)
  assert keys != record_keys(8)


def test_training_from_the_cache_runs_and_resumes_exactly(tiny_data_dir, tmp_path, monkeypatch):
  config = _cache_config(tiny_data_dir, tmp_path / "cache", train_views=2)
  config.num_train_steps = 6
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 6
  config.eval_splits = ("test",)
  original = train_steps.shard_batch
  model_inputs = {"train": set(), "eval": set(), "encode": set(), "photos": set()}
  train_batches = []
  crash = True

  def record_and_crash_at_step_five(batch, mesh):
    if "image_id" in batch:
      kind = "eval"
    elif "score" not in batch:
      kind = "encode"
    else:  # Scored batches without ids: training, or photos re-scored (the redaction quality).
      kind = "photos" if "image" in batch else "train"
    model_inputs[kind] |= set(train_steps.MODEL_INPUTS) & set(batch)
    if kind == "train":
      train_batches.append(np.asarray(batch["features"], np.float32))
      if len(train_batches) == 5 and crash:  # Killed after the checkpoint at step 4.
        raise KeyboardInterrupt("simulated kill")
    return original(batch, mesh)

  monkeypatch.setattr(train_steps, "shard_batch", record_and_crash_at_step_five)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert checkpoints.create_manager(tmp_path / "run", keep=3, read_only=True).latest_step() == 4
  manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
  assert manifest["splits"]["train"]["records"] == 2 * config.data.synthetic.num_train

  crash = False
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(train_batches) == 5 + 2  # Steps 5 and 6 only: resumed at step 4.
  np.testing.assert_array_equal(
    train_batches[5], train_batches[4]
  )  # The batch the kill interrupted.
  assert not np.array_equal(train_batches[6], train_batches[5])
  assert checkpoints.create_manager(tmp_path / "run", keep=3, read_only=True).latest_step() == 6
  assert results["test"]["n"] == config.data.synthetic.num_test
  assert model_inputs == {
    "train": {"features"},
    "eval": {"features"},
    "encode": {"image"},
    "photos": set(),  # The final evaluation runs no image through the encoder (the cache has them).
  }


def test_prepare_feature_cache_builds_what_a_run_reads_and_leaves_the_config(
  tiny_data_dir, tmp_path, caplog
):
  """run.py --mode=cache_features: the cache of any feed mode, built once, then reused."""
  config = _cache_config(tiny_data_dir, tmp_path / "cache")
  config.feature_cache.mode = "off"  # Built ahead of a run that will turn it on.
  cache = experiment_lib.prepare_feature_cache(config, tmp_path / "run")
  assert config.feature_cache.mode == "off"
  assert (cache.directory / feature_cache.MANIFEST_FILENAME).is_file()
  config.feature_cache.mode = "device"  # Reads the same files.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = experiment_lib.prepare_feature_cache(config, tmp_path / "run")
  assert again.directory == cache.directory
  assert "Using the feature cache" in caplog.text and "Building" not in caplog.text


@pytest.mark.parametrize(
  "field, replacement", [("enabled", "mode=host"), ("on_device", "mode=device")]
)
def test_a_command_line_with_a_replaced_boolean_gets_one_line_naming_the_new_field(
  field, replacement
):
  repo = pathlib.Path(__file__).resolve().parents[2]
  command = [
    sys.executable,
    "run.py",
    "--config=configs/demo.py",
    "--workdir=unused",
    f"--config.feature_cache.{field}=True",
  ]
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == (
    f"error: --config.feature_cache.{field} was replaced by --config.feature_cache.{replacement}"
    f" (or {'off' if field == 'enabled' else 'host'})"
  )
