"""The training loop on the tiny synthetic dataset: steps, evaluation, resume, NaN stops, devices."""

import json

import jax
import numpy as np
import pytest

from privattnet_jax.training import checkpoints
from privattnet_jax.training import train
from privattnet_jax.training import train_steps
from privattnet_jax.training import evaluator
from privattnet_jax.training import experiment as experiment_lib
from tests import subprocesses


def _final_params(config, workdir):
  experiment = experiment_lib.Experiment(config, workdir, need_train=False)
  return jax.device_get(experiment.restore(experiment.manager.latest_step()).params)


def test_train_and_evaluate_writes_everything(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(tiny_config, str(workdir))
  test_metrics = json.loads((workdir / "eval_test.json").read_text())
  assert set(("l1", "mse", "pearson", "spearman", "n")) <= set(test_metrics)
  assert (
    test_metrics["n"] == tiny_config.data.synthetic.num_test
  )  # Every test example exactly once.
  assert results["test"]["l1"] == pytest.approx(test_metrics["l1"])
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_lines = [line for line in logged if "loss" in line]
  assert [line["step"] for line in train_lines] == [2, 4]
  assert all(np.isfinite(line["loss"]) and line["images_per_second"] > 0 for line in train_lines)
  assert any("validation/spearman" in line for line in logged)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  manager = checkpoints.create_manager(workdir, keep=2, read_only=True)
  assert manager.latest_step() == 4
  assert manager.best_step() in (2, 4)
  # The final evaluation uses the trained state when it is the best step's: what a restore gives.
  assert evaluator.evaluate_checkpoint(tiny_config, str(workdir), "test") == results["test"]


def test_frozen_encoder_is_not_updated_and_has_no_optimizer_state(tiny_config, tmp_path):
  config = tiny_config
  config.model.encoder.trainable = False
  config.model.encoder.batchnorm = "frozen"
  config.num_train_steps = 2
  experiment = experiment_lib.Experiment(config, tmp_path / "frozen")
  before = jax.device_get(experiment.initial_state.params)
  train.train_and_evaluate(config, str(tmp_path / "frozen"))
  after = _final_params(config, tmp_path / "frozen")
  jax.tree_util.tree_map(np.testing.assert_array_equal, before["encoder"], after["encoder"])
  changed = jax.tree_util.tree_map(
    lambda a, b: not np.array_equal(a, b), before["head"], after["head"]
  )
  assert any(jax.tree_util.tree_leaves(changed))
  state = experiment.initial_state
  encoder_state_leaves = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
    if "encoder" in jax.tree_util.keystr(path)
  ]
  assert encoder_state_leaves == []


def test_resumed_run_ends_with_the_uninterrupted_parameters(
  tiny_data_dir, tmp_path, monkeypatch, caplog
):
  from tests.conftest import jit_traces  # pylint: disable=g-import-not-at-top
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(tiny_data_dir)
  config.num_train_steps = 6
  config.eval_every_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  expected = _final_params(config, tmp_path / "straight")

  original = train_steps.shard_batch
  calls = {"n": 0}

  def crash_at_step_five(batch, mesh):
    if "image_id" not in batch:  # A training batch.
      calls["n"] += 1
      if calls["n"] == 5:  # Killed after the checkpoint at step 4.
        raise KeyboardInterrupt("simulated kill")
    return original(batch, mesh)

  monkeypatch.setattr(train_steps, "shard_batch", crash_at_step_five)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert checkpoints.create_manager(tmp_path / "resumed", keep=3, read_only=True).latest_step() == 4
  monkeypatch.setattr(train_steps, "shard_batch", original)
  with jit_traces(caplog) as traces:
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert traces == []  # Compile once: the third run of this config in the process reuses its steps.
  resumed = _final_params(config, tmp_path / "resumed")
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), expected, resumed
  )


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
  tiny_config, tmp_path, monkeypatch
):
  original = train_steps.shard_batch
  calls = {"n": 0}

  def poison_step_three(batch, mesh):
    if "image_id" not in batch:  # A training batch.
      calls["n"] += 1
      if calls["n"] == 3:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return original(batch, mesh)

  monkeypatch.setattr(train_steps, "shard_batch", poison_step_three)
  with pytest.raises(train.NonFiniteLossError, match="at step 3.*step 2"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "nan"))
  assert checkpoints.create_manager(tmp_path / "nan", keep=3, read_only=True).latest_step() == 2


def test_evaluate_checkpoint_on_a_named_split(tiny_config, tmp_path):
  workdir = tmp_path / "eval"
  tiny_config.eval_splits = ()
  train.train_and_evaluate(tiny_config, str(workdir))
  result = evaluator.evaluate_checkpoint(tiny_config, str(workdir), "validation", step=2)
  assert result["step"] == 2 and result["n"] == tiny_config.data.synthetic.num_val
  assert json.loads((workdir / "eval_validation.json").read_text())["n"] == result["n"]
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    evaluator.evaluate_checkpoint(tiny_config, str(workdir), "validation", step=3)


def test_two_devices_give_the_one_device_parameters(tiny_data_dir):
  """Same global batches on a 1-device and a 2-device mesh: the same parameters (pmean semantics).

  Plain SGD isolates the all-reduced gradients: Adam divides by sqrt(v), which turns reduction-order
  noise in a near-zero gradient into a whole step of either sign.
  """
  script = f"""
    import jax, numpy as np, optax
    from tests.conftest import make_tiny_config
    from privattnet_jax.training import train_steps
    from privattnet_jax.training import experiment as experiment_lib
    from privattnet_jax.data import input_pipeline
    config = make_tiny_config({tiny_data_dir!r})
    config.model.attention.feature_dropout = 0.0  # Dropout masks depend on the device index.
    config.model.attention.dropout = 0.0
    experiment = experiment_lib.Experiment(config, {tiny_data_dir!r} + "/two_devices_workdir", need_train=False)
    batches = [b for _, b in zip(range(3), input_pipeline.create_train_loader(experiment.sources["train"], config.input,
                                                                                 experiment.task, seed=config.seed))]
    sgd = optax.sgd(0.05)
    initial = jax.device_get(experiment.initial_state)
    initial = initial.replace(tx=sgd, opt_state=sgd.init(initial.params))
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
      mesh = jax.sharding.Mesh(np.array(devices), (train_steps.AXIS,))
      state = jax.device_put(initial, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
      step = train_steps.parallel_train_step(mesh, experiment.task)
      losses = []
      for batch in batches:
        state, metrics = step(state, train_steps.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
      results.append((jax.device_get((state.params, state.batch_stats)), losses))
    (one, losses_one), (two, losses_two) = results
    np.testing.assert_allclose(losses_one, losses_two, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one, two)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(initial.params), jax.tree_util.tree_leaves(one[0])))
    assert moved > 1e-3, moved  # The steps moved the parameters far beyond the tolerance.
    print("SAME")
  """
  result = subprocesses.run_script(script)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "SAME" in result.stdout
