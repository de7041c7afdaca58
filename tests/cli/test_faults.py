"""Faults and hostile inputs (docs/faults.md): nothing outside the dataset is read, nothing hangs,
nothing is lost or mixed up, and a broken run says so in one line with exit status 1."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from privattnet_jax.data import attributes, build_report, synthetic, vispr, vispr_layout
from privattnet_jax.inference import output_folders, predict, redact
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.training import checkpoints, serving
from tests import subprocesses, tiny_runs

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZE = 32


def _jpeg(path: pathlib.Path, colour=(200, 30, 30), size=(SIZE, SIZE)) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path, format="JPEG")
  return path


# ---------------------------------------------------------------------------------------------
# The dataset builder reads nothing outside the manual dir and never opens a FIFO.


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  """A synthetic manual dir whose annotations and split lists point outside it, at a FIFO, into loops."""
  base = tmp_path_factory.mktemp("hostile")
  root = synthetic.generate(base / "vispr", 4, 2, 2, seed=0, image_size=SIZE)
  secret = _jpeg(base / "secret" / "s.jpg", (1, 2, 3))
  (base / "secret" / "x.json").write_text(
    json.dumps(
      {
        "id": "bad_listed_outside",
        "image_path": "images/train2017/2017_90000000.jpg",
        "labels": ["a0_safe"],
      }
    )
  )
  os.mkfifo(root / "images" / "train2017" / "fifo.jpg")
  os.symlink(secret, root / "images" / "train2017" / "link_out.jpg")
  os.symlink("loop.jpg", root / "images" / "train2017" / "loop.jpg")
  os.symlink("/dev/zero", root / "images" / "train2017" / "zero.jpg")
  cases = {  # id -> (image_path, expected skip reason)
    "bad_dotdot": ("../secret/s.jpg", "outside_root"),
    "bad_absolute": (str(secret), "outside_root"),
    "bad_etc": ("../../../../../../../../etc/hostname", "outside_root"),
    "bad_symlink_out": ("images/train2017/link_out.jpg", "outside_root"),
    "bad_fifo": ("images/train2017/fifo.jpg", "not_a_regular_file"),
    "bad_loop": ("images/train2017/loop.jpg", "symlink_loop"),
    "bad_dev_zero": ("images/train2017/zero.jpg", "outside_root"),
    "bad_folder": ("images/train2017", "not_a_regular_file"),
    "bad_nul": ("images/train2017/2017_90000000.jpg\u0000.txt", "malformed_annotation"),
    "bad_surrogate": ("images/\udcff.jpg", "malformed_annotation"),
    "bad_tilde": ("~/s.jpg", "missing_image"),  # Taken literally inside the root, never as $HOME.
  }
  with open(root / "train2017.txt", "a") as listing:
    for image_id, (image_path, _) in cases.items():
      relative = f"annotations/train2017/{image_id}.json"
      (root / relative).write_text(
        json.dumps({"id": image_id, "image_path": image_path, "labels": ["a0_safe"]})
      )
      listing.write(relative + "\n")
    listing.write("../secret/x.json\n/etc/hostname\n")
  expected = {image_id: reason for image_id, (_, reason) in cases.items()}
  expected.update(
    {"x": "outside_root", "hostname": "outside_root"}
  )  # Split-list entries: their stems.
  return root, expected, secret


def test_builder_skips_every_path_outside_the_root_and_every_special_file(
  no_hang, hostile, tmp_path, caplog
):
  root, expected, _ = hostile
  builder = vispr.prepare(root, tmp_path, "max256", splits_dir=root)
  for record in caplog.records:  # A UTF-8 log file or terminal takes every line naming a path.
    message = record.getMessage()
    assert message.encode("utf-8") and "\0" not in message, repr(message)
  assert any("\\udcff" in record.getMessage() for record in caplog.records)
  report = build_report.load_build_report(builder)
  train = report["splits"]["train"]
  skipped = {i: reason for reason, entry in train["skip_reasons"].items() for i in entry["ids"]}
  assert skipped == expected
  assert train["written"] == 4 and train["listed"] == 4 + len(expected)
  written = {bytes(r["image_id"]).decode() for r in vispr.data_sources(builder)["train"]}
  assert written == {synthetic.image_id(0, i) for i in range(4)}  # No outside image among them.


def test_strict_build_counts_outside_paths_as_failures(no_hang, hostile, tmp_path):
  root, _, _ = hostile
  with pytest.raises(vispr.StrictBuildError, match="outside_root") as error:
    vispr.prepare(root, tmp_path, "max256", splits_dir=root, strict=True)
  assert (
    str(error.value).splitlines()[0]
    == f"strict build: {len(hostile[1])} annotations would be skipped"
  )


# ---------------------------------------------------------------------------------------------
# A build whose inputs changed is not reused.


def test_annotation_or_split_list_edited_after_the_build_is_never_reused(tmp_path):
  root = synthetic.generate(tmp_path / "vispr", 2, 1, 1, seed=0, image_size=SIZE)
  data_dir = tmp_path / "tfds"
  vispr.prepare(root, data_dir, "max256", splits_dir=root)
  vispr.prepare(root, data_dir, "max256", splits_dir=root)  # Unchanged: reused.
  annotation = root / "annotations" / "train2017" / f"{synthetic.image_id(0, 1)}.json"
  content = json.loads(annotation.read_text())
  original = annotation.read_text()
  annotation.write_text(json.dumps({**content, "labels": ["a9_face_complete"]}))
  with pytest.raises(vispr.StaleBuildError, match="the annotations in .* changed"):
    vispr.prepare(root, data_dir, "max256", splits_dir=root)
  annotation.write_text(original)
  with open(root / "val2017.txt", "a") as listing:
    listing.write(f"annotations/train2017/{synthetic.image_id(0, 1)}.json\n")
  with pytest.raises(vispr.StaleBuildError, match="split lists"):
    vispr.prepare(root, data_dir, "max256", splits_dir=root)


# ---------------------------------------------------------------------------------------------
# Predict: one row per collected file, none hangs, no two rows share a panel.


def _fake_predictor(image_size=SIZE, steps=2, grid=(2, 2)) -> predictor_lib.Predictor:
  """A Predictor with the attention model's outputs and a trivial function (no JAX, no checkpoint)."""
  cells = grid[0] * grid[1]
  info = {
    "model": "fake",
    "image_size": image_size,
    "max_side": 256,
    "steps": steps,
    "grid_shape": list(grid),
    "num_scores": 1,
    "attribute_ids": None,
    "outputs": {
      "score": ["batch", 1],
      "step_scores": ["batch", steps, 1],
      "attention": ["batch", steps, cells],
    },
  }

  def infer(images, mask):
    brightness = images.mean(axis=(1, 2, 3))
    return {
      "score": brightness[:, None],
      "step_scores": np.repeat(brightness[:, None, None], steps, 1),
      "attention": np.full((len(images), steps, cells), 1.0 / cells, np.float32),
    }

  return predictor_lib.Predictor(info, 4, infer)


def test_hostile_folder_gets_one_row_per_file_and_unique_panels(no_hang, tmp_path):
  photos = tmp_path / "photos"
  for name in ("x.jpg", "x-2.jpg", "sub/x.jpg", "X.jpg", "sub/deeper/x-2.jpg", "y.png"):
    _jpeg(photos / name, colour=(len(name) * 20, 50, 90))
  os.mkfifo(photos / "fifo.jpg")
  os.symlink("/dev/zero", photos / "zero.jpg")
  os.symlink("loop.jpg", photos / "loop.jpg")
  os.symlink(".", photos / "sub" / "again")  # A folder loop: not followed.
  os.symlink(photos / "nothing.jpg", photos / "dangling.jpg")
  out = tmp_path / "out"
  result = predict.predict(
    _fake_predictor(), [str(photos), str(photos / "**" / "*.jpg")], out, progress=False
  )
  records = {pathlib.Path(r["path"]).relative_to(photos).as_posix(): r for r in result.records}
  good = {"x.jpg", "x-2.jpg", "sub/x.jpg", "X.jpg", "sub/deeper/x-2.jpg", "y.png"}
  bad = {
    "fifo.jpg": "not_a_regular_file",
    "zero.jpg": "not_a_regular_file",
    "loop.jpg": "symlink_loop",
    "dangling.jpg": "missing",
  }
  assert set(records) == good | set(bad) and len(result.records) == len(records)
  for name in good:
    assert records[name]["ok"], records[name]
  for name, reason in bad.items():
    assert not records[name]["ok"] and records[name]["error"].startswith(reason), records[name]
  panels = [r["heatmap"] for r in result.records if r["ok"]]
  assert len({p.lower() for p in panels}) == len(panels) == len(good)
  for name in good:  # Each panel is the panel of its own photo: its title is the file name.
    assert (out / records[name]["heatmap"]).is_file()
  lines = (out / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == len(records)


def test_unique_names_never_collide_with_generated_ones():
  paths = [
    pathlib.Path(p) for p in ("x-2.jpg", "sub/x.jpg", "b/x.png", "X.gif", "x-3.bmp", "c/x-2.jpg")
  ]
  names = predict.unique_names(paths)
  assert len({n.lower() for n in names}) == len(names)
  assert names[:2] == ["x-2", "x"]


def test_output_that_is_a_file_is_refused_before_any_image_is_read(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("keep me")
  with pytest.raises(predictor_lib.PredictError, match="exists and is not a folder"):
    predict.predict(_fake_predictor(), [str(_jpeg(tmp_path / "a.jpg"))], target, progress=False)
  assert target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Checkpoints: a corrupt latest step is set aside and the run resumes from the one before.


def _saved_steps(workdir: pathlib.Path, steps=(1, 2, 3)):
  manager = checkpoints.create_manager(workdir, keep=5)
  for step in steps:
    rng = np.random.default_rng(step)  # Random: the arrays' files do not compress to nothing.
    state = {
      "w": rng.normal(size=(64, 64)).astype(np.float32) + step,
      "b": np.arange(8, dtype=np.float32) * step,
    }
    checkpoints.save(manager, step, state, None, {"config": {}, "target_mean": [0.5], "step": step})
  manager.wait_until_finished()
  return manager


def _abstract():
  return {
    "w": jax.ShapeDtypeStruct((64, 64), np.float32),
    "b": jax.ShapeDtypeStruct((8,), np.float32),
  }


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_corrupt_latest_checkpoint_is_set_aside_and_the_step_before_resumes(tmp_path, caplog):
  manager = _saved_steps(tmp_path)
  victim = _largest_file(tmp_path / "checkpoints" / "3" / "state")
  size = victim.stat().st_size
  with open(victim, "r+b") as f:
    f.truncate(size // 3)
  resumed = checkpoints.set_aside_unrestorable(manager, tmp_path)
  assert resumed == 2 and manager.latest_step() == 2
  set_aside = list((tmp_path / checkpoints.SET_ASIDE_DIR).iterdir())
  assert len(set_aside) == 1 and set_aside[0].name.startswith("3-")  # Renamed, not deleted.
  assert (set_aside[0] / "state").is_dir()
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and "step 3" in warnings[0] and "resuming from step 2" in warnings[0]
  state, metadata = checkpoints.restore(manager, 2, _abstract())
  assert metadata["step"] == 2 and float(state["b"][1]) == 2.0


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata", "bad_json"])
def test_restoring_a_corrupt_step_names_it_and_the_intact_steps(tmp_path, damage):
  _saved_steps(tmp_path)
  step_dir = tmp_path / "checkpoints" / "2"
  if damage == "truncate":
    victim = _largest_file(step_dir / "state")
    with open(victim, "r+b") as f:
      f.truncate(10)
  elif damage == "delete_metadata":
    (step_dir / "state" / "_METADATA").unlink()
  else:
    (step_dir / "metadata" / "metadata").write_text("{not json")
  manager = checkpoints.create_manager(tmp_path, keep=1, read_only=True)
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore(manager, 2, _abstract())
  message = str(error.value)
  assert (
    "\n" not in message
    and "checkpoint step 2" in message
    and "steps that restore: [1, 3]" in message
  )
  assert step_dir.is_dir()  # evaluate/predict/export never move a checkpoint.


def _config_overrides(config, base) -> list[str]:
  """`--config.<field>=<value>` for every leaf where `config` differs from `base`."""

  def leaves(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value

  defaults = dict(leaves(base.to_dict()))
  return [f"--config.{k}={v}" for k, v in leaves(config.to_dict()) if defaults.get(k) != v]


def test_run_py_on_a_corrupt_step_prints_one_line_and_logs_the_traceback(tiny_data_dir, tmp_path):
  """evaluate, export and predict of a step with a truncated array file: stderr holds the one error
  line naming the intact step and no traceback; errors.log holds the traceback."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from privattnet_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(tiny_data_dir)
  config.num_train_steps, config.checkpoint_every_steps, config.eval_splits = 2, 1, ()
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  victim = _largest_file(workdir / "checkpoints" / "2" / "state")
  with open(victim, "r+b") as f:
    f.truncate(10)
  photo = _jpeg(tmp_path / "photo.jpg")
  common = [f"--workdir={workdir}", "--step=2"]
  commands = {
    "evaluate": ["--mode=evaluate", "--config=configs/demo.py:tiny", *common]
    + _config_overrides(config, demo.get_config("tiny")),
    "export": ["--mode=export", *common, f"--output={tmp_path / 'export'}"],
    "predict": ["--mode=predict", *common, f"--output={tmp_path / 'out'}", f"--images={photo}"],
  }
  running = subprocesses.start_run_py(
    commands
  )  # One at a time would triple the test's start-up time.
  for mode, process in running.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, (mode, stderr[-3000:])
    assert "Traceback" not in stderr, (mode, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line[:1] not in "IW"]
    assert len(errors) == 1, (mode, stderr[-3000:])
    assert errors[0].startswith("error: checkpoint step 2 (") and "is corrupt" in errors[0]
    assert "steps that restore: [1]" in errors[0] and "errors.log" in errors[0]
    assert not [line for line in stderr.splitlines() if line.startswith("W")], (mode, stderr)
  log = (workdir / "errors.log").read_text()
  assert log.count("CheckpointError: checkpoint step 2") == 3 and "Traceback" in log
  assert (
    not (tmp_path / "export").exists() and not (tmp_path / "out" / "predictions.jsonl").exists()
  )


# ---------------------------------------------------------------------------------------------
# run.py: one line on stderr, exit status 1, no dataset work before a config error.


def _run_py_cases(tmp_path: pathlib.Path) -> dict:
  data_dir = tmp_path / "data"
  common = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.data_dir={data_dir}",
  ]
  existing = tmp_path / "existing.txt"
  existing.write_text("keep")
  return {
    "typo_field": (common + ["--config.batch_sise=8"], "did you mean input.batch_size?"),
    "bad_variant": (
      ["--config=configs/demo.py:bogus", f"--workdir={tmp_path / 'run'}"],
      "got 'bogus'",
    ),
    "missing_config": (
      ["--config=configs/nothere.py", f"--workdir={tmp_path / 'run'}"],
      "No such file or directory: 'configs/nothere.py'",
    ),
    "image_size_stride": (
      common + ["--config.input.image_size=100"],
      "multiple of the encoder's output stride 16",
    ),
    "model_name_in_a_workdir_in_use": (  # The wrong value is named, not the lock.
      common[:1] + [f"--workdir={tmp_path / 'locked'}"] + common[2:] + ["--config.model.name=nope"],
      "model.name must be one of",
    ),
    "missing_weights": (
      common + [f"--config.model.encoder.pretrained={tmp_path / 'w.pth'}"],
      f"model.encoder.pretrained: {tmp_path / 'w.pth'}: no such weight file",
    ),
    "output_is_a_file": (
      [
        "--mode=predict",
        f"--workdir={tmp_path / 'run'}",
        f"--output={existing}",
        f"--images={existing}",
      ],
      "exists and is not a folder",
    ),
    "redaction_quality_outside_evaluate": (
      common + ["--redaction_quality"],
      "--redaction_quality is a flag of --mode=evaluate",
    ),
    "workdir_in_use": (
      common[:1] + [f"--workdir={tmp_path / 'locked'}"] + common[2:],
      "is in use by another run (pid",
    ),
  }


def test_run_py_errors_are_one_line_with_exit_status_1(tmp_path):
  cases = _run_py_cases(tmp_path)
  holder = subprocesses.hold_workdir_lock(tmp_path / "locked")
  try:
    running = subprocesses.start_run_py({name: args for name, (args, _) in cases.items()})
    results = {
      name: (process.wait(timeout=300), *process.communicate()) for name, process in running.items()
    }
  finally:
    holder.kill()
    holder.wait()
  for name, (status, _, stderr) in results.items():
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1, (name, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr[-2000:])
  assert not (tmp_path / "data" / "synthetic_vispr").exists()  # Refused before any dataset work.
  assert (tmp_path / "existing.txt").read_text() == "keep"


def test_a_dying_background_thread_is_one_warning_line_and_its_traceback_in_errors_log(tmp_path):
  """run.py's hooks: a Python thread's exception is one line on stderr naming errors.log, which
  holds the traceback; a library callback's error (sys.excepthook) only goes to errors.log."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  script = f"""
import sys, threading
from privattnet_jax.cli import errors
errors.route_library_tracebacks_to_errors_log({str(workdir)!r})
worker = threading.Thread(target=lambda: 1 / 0, name="probe")
worker.start()
worker.join()
try:
  raise RuntimeError("Event loop is closed")
except RuntimeError as error:
  sys.excepthook(type(error), error, error.__traceback__)
print("main thread went on")
"""
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "main thread went on"
  assert result.stderr.strip().splitlines() == [
    "warning: background thread probe failed: ZeroDivisionError: division by zero "
    f"(traceback in {workdir / 'errors.log'})"
  ]
  log = (workdir / "errors.log").read_text()
  assert "ZeroDivisionError" in log and "RuntimeError: Event loop is closed" in log
  assert log.count("Traceback") == 2


# ---------------------------------------------------------------------------------------------
# Text files as other editors save them: a BOM, CRLF, UTF-16, blank lines, spaces. Nothing is
# dropped, and an entry that names no annotation is named in the build report.


def test_split_lists_with_a_bom_crlf_and_blank_lines_keep_every_record(tmp_path):
  root = synthetic.generate(tmp_path / "vispr", 8, 6, 6, seed=0, image_size=SIZE)
  for name in vispr_layout.SPLIT_FILES.values():
    entries = (root / name).read_text().split()
    text = "\r\n".join(f"{entry}  " for entry in entries) + "\r\n\r\n \t\r\n"
    encoding = "utf-16" if name == "val2017.txt" else "utf-8-sig"  # Both write a BOM.
    (root / name).write_bytes(text.encode(encoding))
  invisible = f"\u200bannotations/test2017/{synthetic.image_id(2, 0)}.json"  # A zero-width space.
  with open(root / "test2017.txt", "ab") as listing:
    listing.write(f"{invisible}\r\n".encode())
  builder = vispr.prepare(root, tmp_path / "tfds", "max256", splits_dir=root)
  report = build_report.load_build_report(builder)
  assert report["total"]["listed"] == 21 and report["total"]["written"] == 20
  assert {s: report["splits"][s]["written"] for s in report["splits"]} == {
    "train": 8,
    "validation": 6,
    "test": 6,
  }
  missing = report["splits"]["test"]["skip_reasons"]["missing_annotation"]
  assert missing["count"] == 1
  assert "split list entry '\\u200bannotations/test2017/" in missing["messages"][0], missing


def test_preference_tables_with_a_bom_crlf_or_utf16_read_as_the_plain_one(tmp_path):
  lines = [
    "attribute_id\tattribute_name\tme",
    "a9_face_complete\tFace\t5",
    "a49_phone\tPhone \t 2 ",
  ]
  plain = tmp_path / "plain.tsv"
  plain.write_text("\n".join(line.replace(" ", "") for line in lines) + "\n")
  ids, values = attributes.read_preference_tsv(plain)
  for encoding in ("utf-8-sig", "utf-16"):
    edited = tmp_path / f"{encoding}.tsv"
    edited.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode(encoding))
    edited_ids, edited_values = attributes.read_preference_tsv(edited)
    assert edited_ids == ids == ["a9_face_complete", "a49_phone"]
    np.testing.assert_array_equal(edited_values, values)
    np.testing.assert_array_equal(
      attributes.preference_table("file", preferences_file=str(edited)),
      attributes.preference_table("file", preferences_file=str(plain)),
    )
  (tmp_path / "nan.tsv").write_text("a9_face_complete\tFace\tnan\n")
  with pytest.raises(ValueError, match="must lie in 1..5"):
    attributes.read_preference_tsv(tmp_path / "nan.tsv")


# ---------------------------------------------------------------------------------------------
# run.py checks every config value before any work: here the training code, the data code and
# TFDS cannot even be imported, so a check that came later would fail differently.

_RUN_PY_WITHOUT_WORK = """
import runpy, sys
for name in (
  "privattnet_jax.training",
  "privattnet_jax.data.vispr",
  "privattnet_jax.data.input_pipeline",
  "tensorflow_datasets",
  "grain",
):
  sys.modules[name] = None
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
"""

BAD_CONFIG_VALUES = {  # override -> the error line after "error: "
  "--config.num_train_steps=-5": (
    "num_train_steps must be an integer >= -1 (-1 and 0: num_epochs decides), got -5"
  ),
  "--config.optim.learning_rate=nan": "optim.learning_rate must be a finite number > 0, got nan",
  "--config.optim.weight_decay=-inf": "optim.weight_decay must be a finite number >= 0, got -inf",
  "--config.model.attention.dropout=1.0": (
    "model.attention.dropout must be a finite number in [0, 1), got 1.0"
  ),
  "--config.input.crop_scale=(0.9,0.1)": (
    "input.crop_scale must be a pair (lo, hi) with lo <= hi, each a finite number in (0, 1], "
    "got (0.9, 0.1)"
  ),
  "--config.data.synthetic.image_size=-48": (
    "data.synthetic.image_size must be an integer >= 16, got -48"
  ),
  "--config.optim.schedule=bogus": (
    "optim.schedule must be one of ('constant', 'cosine', 'warmup_cosine'), got 'bogus'"
  ),
  "--config.nonsense=1": "--config.nonsense is not a config field; the config has: checkpoint_every_steps, ",
  "--config.model.nonsens=1": "--config.model.nonsens is not a config field; did you mean model.name or model.module?",
  "--config.learning_rate=0.1": (
    "--config.learning_rate is not a config field; did you mean optim.learning_rate?"
  ),
}


def test_a_bad_config_value_is_one_line_before_any_work(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  common = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.data_dir={tmp_path / 'data'}",
  ]
  running = {
    override: subprocess.Popen(
      [sys.executable, "-c", _RUN_PY_WITHOUT_WORK, *common, override],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for override in BAD_CONFIG_VALUES
  }
  for override, process in running.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, (override, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (override, stderr[-2000:])
    assert lines[0].startswith(f"error: {BAD_CONFIG_VALUES[override]}"), (override, lines[0])
  assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# Output folders: what predict and redact write is never read as a photo, and no input is
# written over (output_folders.py).


def _fake_redact_predictor() -> predictor_lib.Predictor:
  """_fake_predictor with what redact reads beside the outputs (the score's definition)."""
  predictor = _fake_predictor()
  predictor.info.update(
    score={"pooling": "max", "source": "profiles_mean", "per_profile": False},
    preferences=attributes.preference_table("profiles_mean").tolist(),
  )
  return predictor


def _redact(images, output):
  return redact.redact_photos(
    _fake_redact_predictor(),
    [str(image) for image in images],
    output,
    redact.RedactSettings(target_drop=0.5),
    progress=False,
  )


def _tree(folder: pathlib.Path) -> dict:
  """{relative path: sha256} of every file, and None for every folder, under `folder`."""
  return {
    path.relative_to(folder).as_posix(): (
      hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    )
    for path in sorted(folder.rglob("*"))
  }


def _names(result, root: pathlib.Path) -> list[str]:
  return [pathlib.Path(r["path"]).relative_to(root).as_posix() for r in result.records]


def test_an_output_folder_inside_the_input_folder_is_never_read_back(tmp_path):
  photos = tmp_path / "in"
  _jpeg(photos / "good.jpg")
  _jpeg(photos / "b.jpg", (10, 200, 10))
  inputs = _tree(photos)
  for _ in range(2):  # The second run passes over the first one's outputs and panels.
    result = _redact([photos], photos / "out")
    assert _names(result, photos) == ["b.jpg", "good.jpg"] and result.num_failed == 0
  assert {k: v for k, v in _tree(photos).items() if not k.startswith("out")} == inputs
  assert sorted(p.name for p in (photos / "out").iterdir()) == [
    "b.jpg",
    "good.jpg",
    "panels",
    "redaction.csv",
    "redaction.jsonl",
  ]
  # A glob through the earlier output folder, and predict into yet another folder inside.
  result = predict.predict(
    _fake_predictor(), [f"{photos}/**/*.jpg"], photos / "scores", progress=False
  )
  assert _names(result, photos) == ["b.jpg", "good.jpg"]
  result = predict.predict(_fake_predictor(), [str(photos)], photos / "scores", progress=False)
  assert _names(result, photos) == ["b.jpg", "good.jpg"]  # Neither out/ nor scores/heatmaps/.


def test_an_earlier_output_folder_gives_its_photos_never_its_panels_or_tables(tmp_path):
  photos = tmp_path / "in"
  _jpeg(photos / "good.jpg")
  _redact([photos], tmp_path / "out")
  predict.predict(_fake_predictor(), [str(photos)], tmp_path / "scores", progress=False)
  assert (tmp_path / "out" / "panels" / "good_redact.png").is_file()
  assert (tmp_path / "scores" / "heatmaps" / "good_att.png").is_file()
  again = _redact([tmp_path / "out"], tmp_path / "again")  # Redacting redacted photos: a use.
  assert _names(again, tmp_path) == ["out/good.jpg"]
  scored = predict.predict(
    _fake_predictor(),
    [str(tmp_path / "scores"), str(tmp_path / "out"), str(tmp_path / "again")],
    tmp_path / "scores2",
    progress=False,
  )
  assert _names(scored, tmp_path) == ["out/good.jpg", "again/good.jpg"]
  named = predict.predict(
    _fake_predictor(),
    [
      str(tmp_path / "out" / "panels" / "good_redact.png"),
      str(tmp_path / "scores" / "heatmaps" / "good_att.png"),
      str(tmp_path / "scores" / "predictions.csv"),
    ],
    tmp_path / "scores3",
    progress=False,
  )
  for record in named.records:
    assert not record["ok"] and record["error"].startswith("earlier_output:"), record


@pytest.mark.parametrize(
  "case", ["equal", "parent_of_a_file", "parent_of_a_folder", "glob_inside", "link_into"]
)
@pytest.mark.parametrize("mode", ["predict", "redact"])
def test_an_output_folder_that_is_or_holds_an_input_is_refused_before_writing(tmp_path, case, mode):
  photos = tmp_path / "in"
  _jpeg(photos / "sub" / "a.jpg")
  os.symlink(photos / "sub" / "a.jpg", tmp_path / "link.jpg")
  images, output = {
    "equal": ([photos], photos),
    "parent_of_a_file": ([photos / "sub" / "a.jpg"], photos),
    "parent_of_a_folder": ([photos / "sub"], photos),
    "glob_inside": ([f"{photos}/sub/*.jpg"], photos / "sub"),
    "link_into": ([tmp_path / "link.jpg"], photos),
  }[case]
  before = _tree(tmp_path)
  with pytest.raises(output_folders.OutputFolderError, match="the output folder .* the input"):
    if mode == "redact":
      _redact(images, output)
    else:
      predict.predict(_fake_predictor(), [str(i) for i in images], output, progress=False)
  assert _tree(tmp_path) == before


def test_a_folder_of_the_users_photos_named_as_output_inside_the_input_is_refused(tmp_path):
  photos = tmp_path / "in"
  _jpeg(photos / "a.jpg")
  _jpeg(photos / "mine" / "a.jpg", (1, 2, 3))  # Would be overwritten by a.jpg's output.
  before = _tree(tmp_path)
  with pytest.raises(output_folders.OutputFolderError, match="holds photos"):
    _redact([photos], photos / "mine")
  assert _tree(tmp_path) == before


def test_links_in_the_input_or_the_output_folder_never_lead_to_a_write_over_an_input(tmp_path):
  photos, out = tmp_path / "in", tmp_path / "out"
  _jpeg(photos / "a.jpg")
  _jpeg(photos / "b.jpg", (10, 200, 10))
  _redact([photos], out)
  # Found by the walk, a link into the output folder; an output that links to an input (b.jpg);
  # a panel that links elsewhere: replaced, not written through.
  os.symlink(out / "b.jpg", photos / "link.jpg")
  (out / "a.jpg").unlink()
  os.symlink(photos / "b.jpg", out / "a.jpg")
  (tmp_path / "keep.txt").write_text("keep")
  (out / "panels" / "b_redact.png").unlink()
  os.symlink(tmp_path / "keep.txt", out / "panels" / "b_redact.png")
  inputs = _tree(photos)
  result = _redact([photos], out)
  rows = {pathlib.Path(r["path"]).name: r for r in result.records}
  assert rows["link.jpg"]["error"].startswith("inside_output:"), rows["link.jpg"]
  assert "refusing to overwrite the input" in rows["a.jpg"]["error"], rows["a.jpg"]
  assert rows["b.jpg"]["ok"] and not (out / "panels" / "b_redact.png").is_symlink()
  assert _tree(photos) == inputs and (tmp_path / "keep.txt").read_text() == "keep"


def test_export_refuses_an_output_folder_inside_the_checkpoints_it_reads(tmp_path):
  workdir = tmp_path / "run"
  for inside in ("checkpoints", "checkpoints/2", "frozen_encoder/abc"):
    with pytest.raises(output_folders.OutputFolderError, match="which this run reads"):
      serving.export_predictor(workdir, workdir / inside)
  assert not workdir.exists()  # Refused before the checkpoint is read or anything written.
  artifact = tmp_path / "export"  # run.py's check for predict and redact with --exported.
  with pytest.raises(output_folders.OutputFolderError, match="which this run reads"):
    output_folders.check(artifact / "scores", [], [artifact])


@pytest.fixture(scope="module")
def exported_run(tiny_data_dir, tmp_path_factory):
  """A tiny trained PrivAttNet's exported artifact: what run.py predicts and redacts with below."""
  workdir = tiny_runs.train_tiny_run(
    tiny_data_dir, tmp_path_factory.mktemp("faults_run") / "run", "privattnet"
  )
  return serving.export_predictor(workdir, platforms=("cpu",))


def _animated_gif(path: pathlib.Path, frames: int = 4) -> pathlib.Path:
  images = [tiny_runs.photo(seed=seed) for seed in range(frames)]
  images[0].save(
    path, save_all=True, append_images=images[1:], duration=[80, 120, 160, 200], loop=0
  )
  return path


def _run_py(*args: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "run.py", *args],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _rows(folder: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (folder / "redaction.jsonl").read_text().splitlines()]


def test_run_py_redacts_twice_into_its_input_folder_and_overwrites_nothing(exported_run, tmp_path):
  """The issue's cases on the command line: --output inside --images, run twice; the output folder
  redacted again; --output equal to --images; an animated GIF keeps its frames."""
  photos = tmp_path / "in2"
  _jpeg(photos / "good.jpg", size=(48, 40))
  tiny_runs.photo(seed=9).save(photos / "b.png")
  _animated_gif(photos / "anim.gif")
  inputs = _tree(photos)
  common = ["--mode=redact", f"--exported={exported_run}", "--batch_size=4"]
  out = photos / "out"
  for _ in range(2):
    process = _run_py(*common, f"--images={photos}", f"--output={out}")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "3 of 3 images redacted" in stdout
    rows = {pathlib.Path(r["path"]).relative_to(photos).as_posix(): r for r in _rows(out)}
    assert sorted(rows) == ["anim.gif", "b.png", "good.jpg"] and all(r["ok"] for r in rows.values())
    assert {k: v for k, v in _tree(photos).items() if not k.startswith("out")} == inputs
  assert sorted(p.name for p in out.iterdir()) == [
    "anim.gif",
    "b.png",
    "good.jpg",
    "panels",
    "redaction.csv",
    "redaction.jsonl",
  ]
  assert rows["anim.gif"]["frames"] == rows["anim.gif"]["frames_written"] == 4
  written = Image.open(out / "anim.gif")
  assert written.n_frames == 4 and "first_frame" in rows["anim.gif"]["conversions"]
  everything = _tree(photos)
  again = _run_py(*common, f"--images={out}", f"--output={tmp_path / 'again'}")
  refused = _run_py(*common, f"--images={photos}", f"--output={photos}")
  stdout, stderr = again.communicate(timeout=300)
  assert again.returncode == 0, stderr[-3000:]
  assert sorted(pathlib.Path(r["path"]).name for r in _rows(tmp_path / "again")) == [
    "anim.gif",
    "b.png",
    "good.jpg",
  ]  # The photos of the earlier output folder, not its panels.
  _, stderr = refused.communicate(timeout=300)
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert refused.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert len(errors) == 1 and f"the output folder {photos} is the input" in errors[0], stderr
  assert _tree(photos) == everything  # Refused before anything was written.
