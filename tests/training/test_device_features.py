"""Cached features held on the devices: the batches they give, evaluation parity, exact resume, errors."""

import functools
import logging
import types

import jax
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from privattnet_jax.training import checkpoints
from privattnet_jax.training import device_features
from privattnet_jax.data import input_pipeline
from privattnet_jax.training import train
from privattnet_jax.training import train_steps
from privattnet_jax.training import evaluator
from privattnet_jax.training import experiment as experiment_lib
from tests import subprocesses
from tests.conftest import jit_traces
from tests.conftest import make_tiny_config


def _on_device_config(data_dir, cache_dir, **cache_fields):
  config = make_tiny_config(data_dir)
  config.model.encoder.trainable = False
  config.model.encoder.batchnorm = "frozen"
  config.feature_cache.mode = "device"
  config.feature_cache.dir = str(cache_dir)
  for name, value in cache_fields.items():
    config.feature_cache[name] = value
  return config


def epoch_draws(experiment, steps: int):
  """(features, labels) of the train batches of global steps 0 .. steps - 1, gathered as the train step does."""
  train_set, mesh = experiment.feed.train_set, experiment.mesh
  gather = functools.partial(
    device_features.gather_batch,
    axis=train_steps.AXIS,
    steps_per_epoch=experiment.steps_per_epoch,
    local_batch=experiment.config.input.batch_size // mesh.devices.size,
    views=train_set.views,
    seed=input_pipeline.sampler_seed(experiment.config.seed),
  )
  gathered = jax.jit(
    jax.shard_map(
      gather,
      mesh=mesh,
      in_specs=(PartitionSpec(train_steps.AXIS), PartitionSpec()),
      out_specs=PartitionSpec(train_steps.AXIS),
    )
  )
  return [jax.device_get(gathered(train_set.arrays, step)) for step in range(steps)]


def check_draws(experiment, epochs: int = 2):
  """Every draw is a cached record (a view of one example, with that example's targets); no example
  twice in an epoch; a new order every epoch. Returns the example indices drawn, per epoch."""
  source = experiment.feed.cache.source("train")
  views = experiment.feed.train_set.views
  records = [source[i] for i in range(len(source))]
  by_features = {records[i]["features"].tobytes(): i for i in range(len(records))}
  steps = experiment.steps_per_epoch
  drawn = []
  for epoch in range(epochs):
    examples = []
    for batch in epoch_draws(experiment, (epoch + 1) * steps)[epoch * steps :]:
      for row in range(len(batch["mask"])):
        record = by_features[np.asarray(batch["features"][row]).tobytes()]
        np.testing.assert_array_equal(
          batch["labels"][row], records[record]["labels"].astype(np.float32)
        )
        examples.append(record // views)
    assert len(set(examples)) == len(examples) == steps * experiment.config.input.batch_size
    drawn.append(examples)
  assert drawn[0] != drawn[1]
  return drawn


def test_on_device_batches_are_cached_records_without_repeats(tiny_data_dir, tmp_path):
  config = _on_device_config(tiny_data_dir, tmp_path / "cache", train_views=2)
  experiment = experiment_lib.Experiment(config, tmp_path / "run")
  drawn = check_draws(experiment)
  assert len(drawn[0]) == 48  # 6 steps of 8 over 48 examples: each example once per epoch.
  # Evaluation from the devices is the host loader's, row for row.
  state = experiment.initial_state
  on_device = evaluator.evaluate(
    state,
    experiment.eval_fn,
    experiment.feed.eval_batches("validation"),
    experiment.mesh,
    experiment.task,
  )
  host = evaluator.evaluate(
    state,
    experiment.eval_fn,
    experiment.feed.cache.eval_batches("validation", config.input, experiment.task),
    experiment.mesh,
    experiment.task,
  )
  np.testing.assert_array_equal(on_device.predictions, host.predictions)
  np.testing.assert_array_equal(on_device.targets, host.targets)
  for key in ("image_id", "boxes", "num_boxes", "labels"):
    np.testing.assert_array_equal(on_device.extras[key], host.extras[key])
  assert on_device.metrics == host.metrics and on_device.metrics["n"] == 12


def test_on_device_training_resumes_exactly(tiny_data_dir, tmp_path, monkeypatch, caplog):
  config = _on_device_config(tiny_data_dir, tmp_path / "cache")
  config.num_train_steps = 8  # Across the epoch boundary (6 steps per epoch).
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 8
  config.eval_splits = ("validation",)
  reference = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

  original = device_features.parallel_train_step
  calls = 0

  def killed_at_step_six(*args, **kwargs):
    step = original(*args, **kwargs)

    def counted(state, arrays):
      nonlocal calls
      calls += 1
      if calls == 6:  # Killed after the checkpoint at step 4, mid-interval.
        raise KeyboardInterrupt("simulated kill")
      return step(state, arrays)

    return counted

  monkeypatch.setattr(device_features, "parallel_train_step", killed_at_step_six)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert checkpoints.create_manager(tmp_path / "run", keep=3, read_only=True).latest_step() == 4
  with jit_traces(caplog) as traces:
    resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert traces == []  # Compile once: the third run of this config in the process reuses its steps.
  assert calls == 6 + 4  # Steps 1-5, the killed step 6, then resumed at step 4: steps 5 to 8.

  def final_params(workdir):
    experiment = experiment_lib.Experiment(config, workdir, need_train=False)
    return jax.device_get(experiment.restore(8).params)

  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    final_params(tmp_path / "run"),
    final_params(tmp_path / "uninterrupted"),
  )
  assert resumed["validation"] == reference["validation"]

  # The run goes on with the host loader: its checkpoints hold no grain position, so the loader
  # starts a new shuffle, and says so.
  config.feature_cache.mode = "host"
  config.num_train_steps = 10
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  assert "checkpoint 8 has no input-pipeline position" in caplog.text
  assert (
    checkpoints.create_manager(tmp_path / "uninterrupted", keep=3, read_only=True).latest_step()
    == 10
  )


def test_two_devices_draw_disjoint_shares_and_evaluate_in_stream_order(tiny_data_dir, tmp_path):
  """48 train examples over 2 devices (and 47: one device holds a padding row, never drawn)."""
  script = f"""
    import jax, numpy as np
    from tests.training.test_device_features import _on_device_config, check_draws
    from privattnet_jax.training import evaluator, experiment as experiment_lib
    for num_train in (48, 47):
      config = _on_device_config({tiny_data_dir!r}, {str(tmp_path)!r} + f"/cache{{num_train}}")
      config.data.synthetic.num_train = num_train
      config.data.synthetic.seed = num_train
      experiment = experiment_lib.Experiment(config, {str(tmp_path)!r} + f"/run{{num_train}}")
      assert jax.device_count() == 2 and experiment.steps_per_epoch == num_train // 8
      drawn = check_draws(experiment)
      # Device d draws its own examples d, d + 2, ...: each batch half comes from one device.
      for epoch in drawn:
        halves = np.asarray(epoch).reshape(-1, 2, 4) % 2
        assert (halves[:, 0] == 0).all() and (halves[:, 1] == 1).all(), halves
      state = experiment.initial_state
      on_device = evaluator.evaluate(state, experiment.eval_fn, experiment.feed.eval_batches("validation"),
                                 experiment.mesh, experiment.task)
      host = evaluator.evaluate(state, experiment.eval_fn, experiment.feed.cache.eval_batches("validation",config.input, experiment.task),
                            experiment.mesh, experiment.task)
      np.testing.assert_allclose(on_device.predictions, host.predictions, rtol=1e-6)
      for key in ("image_id", "boxes", "labels"):
        np.testing.assert_array_equal(on_device.extras[key], host.extras[key])
    print("OK")
  """
  result = subprocesses.run_script(script)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout


def test_a_split_too_large_for_device_memory_is_refused_with_the_numbers():
  device = types.SimpleNamespace(
    process_index=jax.process_index(),
    device_kind="Small GPU",
    memory_stats=lambda: {"bytes_limit": 8 * 2**30},
  )
  mesh = types.SimpleNamespace(devices=np.array([device]))
  device_features._check_fits(6 * 2**30, mesh, "cached train views")  # 3/4 of the memory: allowed.
  with pytest.raises(
    ValueError,
    match=r"train views take 6.1 GiB per device, more than 3/4 of the 8.0 GiB "
    r"of a Small GPU: set feature_cache.mode='host'",
  ):
    device_features._check_fits(int(6.1 * 2**30), mesh, "cached train views")


def test_rows_keep_strings_longer_than_the_first():
  records = ["a", "2017_90000001_long_id"]
  arrays = device_features._read_rows(
    records,
    [[0], [1], []],
    lambda rows: {"image_id": np.str_(rows[0] if rows else ""), "valid": bool(rows)},
  )
  np.testing.assert_array_equal(arrays["image_id"], ["a", "2017_90000001_long_id", ""])
  np.testing.assert_array_equal(arrays["valid"], [True, True, False])
