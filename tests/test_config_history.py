"""Moved config fields: old names on the command line, in config files and in checkpoints still work."""

import json
import pathlib

import ml_collections
from PIL import Image

from configs import default
from privattnet_jax import config_history
from privattnet_jax.training import restore, train
from tests.conftest import make_tiny_config
from tests import subprocesses


def _old_layout(config: dict) -> dict:
  """`config` as a config of the layout before the fields moved (what older checkpoints hold)."""
  config = json.loads(json.dumps(config))
  for old, new in config_history.RENAMED_FIELDS.items():
    *new_parents, new_name = new.split(".")
    holder = config
    for name in new_parents:
      holder = holder[name]
    value = holder.pop(new_name)
    *old_parents, old_name = old.split(".")
    target = config
    for name in old_parents:
      target = target.setdefault(name, {})
    target[old_name] = value
  for section in ("input", "loss"):
    assert not config[section], config[section]
    del config[section]
  return config


def test_an_old_layout_config_migrates_to_the_current_one():
  current = json.loads(json.dumps(default.get_config().to_dict()))
  old = _old_layout(current)
  assert "batch_size" in old and "attention_gamma" in old["optim"] and "input" not in old
  moved = config_history.migrate(old)
  assert sorted(moved) == sorted(config_history.RENAMED_FIELDS)
  assert old == current


def test_a_config_file_that_sets_an_old_field_gets_its_value_at_the_new_place():
  config = ml_collections.ConfigDict(default.get_config().to_dict())
  config.batch_size = 7  # A user's config file written for the old layout.
  config.optim.attention_gamma = 0.5
  with config.unlocked():
    moved = config_history.migrate(config, ml_collections.ConfigDict)
  assert moved == ["batch_size", "optim.attention_gamma"]
  assert config.input.batch_size == 7 and config.loss.attention_gamma == 0.5
  assert "batch_size" not in config and "attention_gamma" not in config.optim


def test_old_command_line_overrides_are_renamed():
  argv, seen = config_history.rename_overrides(
    ["run.py", "--config.batch_size=4", "--config.data.crop_scale", "(0.5, 1.0)", "--workdir=w"]
  )
  assert argv == [
    "run.py",
    "--config.input.batch_size=4",
    "--config.input.crop_scale",
    "(0.5, 1.0)",
    "--workdir=w",
  ]
  assert seen == ["batch_size", "data.crop_scale"]
  assert "input.batch_size" in config_history.deprecation("batch_size")


def test_a_checkpoint_of_the_old_layout_restores_and_evaluates_through_run_py(
  tiny_data_dir, tmp_path
):
  """A checkpoint whose stored config has the old field names: restore, evaluate (given the old
  names on the command line, with one deprecation line each) and predict all work."""
  config = make_tiny_config(tiny_data_dir)
  config.num_train_steps, config.eval_splits = 2, ()
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  step_dir = workdir / "checkpoints" / "2" / "metadata"
  metadata_file = next(p for p in step_dir.iterdir() if p.name == "metadata")
  metadata = json.loads(metadata_file.read_text())
  metadata["config"] = _old_layout(metadata["config"])
  metadata_file.write_text(json.dumps(metadata))

  run = restore.restore_checkpoint(workdir, 2)
  assert run.config.input.image_size == config.input.image_size
  assert run.config.loss.attention_gamma == config.loss.attention_gamma

  old_names = [
    f"--config.image_size={config.input.image_size}",
    f"--config.batch_size={config.input.batch_size}",
    f"--config.data.resize_size={config.input.resize_size}",
  ]
  rest = [
    f"--config.data.data_dir={tiny_data_dir}",
    f"--config.model.encoder.width={config.model.encoder.width}",
    f"--config.model.attention.hidden_size={config.model.attention.hidden_size}",
    f"--config.model.attention.regressor_hidden={config.model.attention.regressor_hidden}",
  ]
  synthetic = config.data.synthetic
  rest += [
    f"--config.data.synthetic.{name}={synthetic[name]}"
    for name in ("num_train", "num_val", "num_test", "image_size")
  ]
  photo = pathlib.Path(tmp_path / "photo.png")
  Image.new("RGB", (40, 40), (90, 120, 200)).save(photo)
  commands = {
    "evaluate": [
      "--mode=evaluate",
      "--split=validation",
      "--config=configs/demo.py:tiny",
      f"--workdir={workdir}",
      *old_names,
      *rest,
    ],
    "predict": [
      "--mode=predict",
      f"--workdir={workdir}",
      f"--images={photo}",
      f"--output={tmp_path / 'scores'}",
    ],
  }
  running = subprocesses.start_run_py(commands)  # Both at once: each mostly waits on start-up.
  for name, process in running.items():
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, (name, stderr[-3000:])
    if name == "evaluate":
      warnings = [line for line in stderr.splitlines() if line.startswith("warning: config")]
      assert len(warnings) == 3 and "input.batch_size" in stderr, stderr[-2000:]
  summary = json.loads((workdir / "eval_validation.json").read_text())
  assert summary["step"] == 2 and summary["n"] == config.data.synthetic.num_val
  assert (tmp_path / "scores" / "predictions.jsonl").exists()
