"""The project's one command line: train, evaluate and the other modes, configured by a config file.

  python run.py --config=configs/demo.py --workdir=/tmp/demo
  python run.py --config=configs/privattnet.py --workdir=runs/paper \
      --config.data.manual_dir=/data/vispr --config.model.encoder.pretrained=resnet50.pth
  python run.py --mode=predict --workdir=/tmp/demo --images ~/Pictures --output=/tmp/scores
  python run.py --mode=export --workdir=/tmp/demo
  python run.py --mode=predict --exported=/tmp/demo/export --images=photo.jpg --output=/tmp/scores
  python run.py --mode=redact --workdir=/tmp/demo --images ~/Pictures --output=/tmp/redacted
  python run.py --mode=compare --workdirs=/tmp/demo,/tmp/demo_privnet --output=compare.md

Every config field can be overridden with --config.<field>=<value>. Predict and export read the
config from the checkpoint; a --config given to them must describe the same model.
"""

import errno
import logging as std_logging
import os
import pathlib
import sys
import tempfile
import threading
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from configs import default as default_config
from privattnet_jax import compilation_cache
from privattnet_jax import config_check
from privattnet_jax import host_memory
from privattnet_jax import output_folders

FLAGS = flags.FLAGS
MODES = ("train", "evaluate", "cache_features", "predict", "export", "redact", "compare")

config_flags.DEFINE_config_file(
  "config", None, "A config file (configs/*.py); train and evaluate need one.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_enum(
  "mode",
  "train",
  MODES,
  "train: train (resuming) then evaluate the best checkpoint; "
  "evaluate: evaluate a checkpoint on --split, with report.md/report.html; cache_features: "
  "build (or check) the frozen-encoder feature cache of config.feature_cache, which train "
  "then reads; predict: score "
  "--images; export: write a jax.export predictor; redact: write --images with the regions "
  "the attention points at redacted and without metadata; compare: tabulate --workdirs.",
)
flags.DEFINE_string(
  "split", "test", "Split for --mode=evaluate (and compare): train, validation or test."
)
flags.DEFINE_bool(
  "redaction_quality",
  False,
  "evaluate: also measure how well attention-guided redaction lowers the risk (data with boxes, "
  "attention models): the `redaction` entry of eval_<split>.json and the report's Redaction "
  "section. Runs the model on many redacted images: slower than the evaluation itself.",
)
flags.DEFINE_integer(
  "step",
  None,
  "Checkpoint step for evaluate, predict, redact and export; default: the best by "
  "validation Spearman.",
)
flags.DEFINE_multi_string(
  "images",
  [],
  "predict, redact: image files, folders (searched recursively) or globs; "
  "more paths may follow as plain arguments.",
)
flags.DEFINE_string(
  "output",
  None,
  "predict, redact: the output folder; export: the artifact folder (default "
  "<workdir>/export); compare: the markdown file.",
)
flags.DEFINE_string(
  "exported",
  None,
  "predict, redact: run the artifact in this folder instead of a --workdir checkpoint.",
)
flags.DEFINE_list("workdirs", [], "compare: the runs' workdirs, comma separated.")
flags.DEFINE_integer(
  "profile", None, "predict: also give (redact: redact for) profile K's (0..29) score."
)
flags.DEFINE_string(
  "preferences",
  None,
  "predict: also give the score for these ratings (TSV as "
  "data/user_studies/user_profiles.tsv with one rating column; attribute models).",
)
flags.DEFINE_integer(
  "batch_size", 32, "predict, redact: images per batch (padded, so that it compiles once)."
)
flags.DEFINE_bool(
  "heatmaps",
  True,
  "predict: write heat map panels (attention models); redact: before/after panels.",
)
flags.DEFINE_enum(
  "heatmap_normalisation",
  "per_map",
  ("per_map", "global"),
  "predict: min-max scale each step's map alone, or all steps of an image together.",
)
flags.DEFINE_integer(
  "panel_size", 256, "predict, redact: longer side of each panel tile, in pixels."
)
flags.DEFINE_integer(
  "top_attributes", 5, "predict: attribute models' most probable attributes to list."
)
flags.DEFINE_integer(
  "max_pixels",
  None,
  "predict, redact: refuse images with more pixels (decompression bombs; "
  "JPEGs are decoded reduced instead); default: Pillow's limit.",
)
flags.DEFINE_integer(
  "loader_processes",
  0,
  "predict, redact: read photos in this many worker processes (0: threads); "
  "faster for camera-size photos on a many-core host.",
)
flags.DEFINE_enum(
  "method", "blur", ("blur", "pixelate", "fill"), "redact: how regions are redacted."
)
flags.DEFINE_float(
  "target_score",
  None,
  "redact: stop when the score is at or below this; default: the "
  "score of a safe image under the checkpoint's target (see --target_drop).",
)
flags.DEFINE_float(
  "target_drop",
  None,
  "redact: stop when this fraction of each photo's own score is gone (instead of --target_score).",
)
flags.DEFINE_float("max_area", 0.25, "redact: the most of a photo's area that may be redacted.")
flags.DEFINE_bool(
  "keep_metadata",
  False,
  "redact: keep EXIF, XMP and the ICC profile (default: every output is written without metadata).",
)
flags.DEFINE_list("export_platforms", ["cpu", "cuda"], "export: platforms to lower for.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() (multi-host GPU or TPU runs); "
  "the coordinator flags below are for clusters it cannot detect itself.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, with --distributed.")


def _require(*names: str) -> None:
  missing = [f"--{name}" for name in names if not FLAGS[name].value]
  if missing:
    raise app.UsageError(f"--mode={FLAGS.mode} needs {' and '.join(missing)}")


def _predictor():
  """The --exported artifact or the --workdir checkpoint, as predict and redact run it."""
  # Imported here: grain worker processes re-import this module, and --exported runs need no model code.
  from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

  if FLAGS.exported:
    if FLAGS.config is not None or FLAGS.step is not None:
      raise app.UsageError(
        "--exported runs the artifact as exported: --config and --step do not apply"
      )
    predictor = predict.load_exported_predictor(FLAGS.exported, FLAGS.batch_size)
  else:
    predictor = predict.load_checkpoint_predictor(
      FLAGS.workdir, FLAGS.step, FLAGS.config, FLAGS.batch_size
    )
  return predictor


def _predict(images) -> int:
  """Returns the process exit status: 1 when any image failed (its entry says why)."""
  from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

  predictor = _predictor()
  result = predict.predict(
    predictor,
    images,
    FLAGS.output,
    profile=FLAGS.profile,
    preferences_file=FLAGS.preferences,
    heatmap_panels=FLAGS.heatmaps,
    normalisation=FLAGS.heatmap_normalisation,
    top_attributes=FLAGS.top_attributes,
    max_pixels=FLAGS.max_pixels,
    panel_size=FLAGS.panel_size,
    loader_processes=FLAGS.loader_processes,
    progress=sys.stderr.isatty(),
  )
  done = f"images scored; predictions in {result.output_dir}"
  return _exit_status(result, done, result.output_dir / "predictions.jsonl")


def _redact(images) -> int:
  """Returns the process exit status: 1 when any image failed (its entry says why)."""
  from privattnet_jax import redact  # pylint: disable=g-import-not-at-top

  settings = redact.RedactSettings(
    method=FLAGS.method,
    target_score=FLAGS.target_score,
    target_drop=FLAGS.target_drop,
    max_area=FLAGS.max_area,
    keep_metadata=FLAGS.keep_metadata,
  )
  settings.check()  # Before the checkpoint is restored.
  result = redact.redact_photos(
    _predictor(),
    images,
    FLAGS.output,
    settings,
    profile=FLAGS.profile,
    preferences_file=FLAGS.preferences,
    panels=FLAGS.heatmaps,
    max_pixels=FLAGS.max_pixels,
    panel_size=FLAGS.panel_size,
    loader_processes=FLAGS.loader_processes,
    progress=sys.stderr.isatty(),
  )
  done = f"images redacted into {result.output_dir}"
  return _exit_status(result, done, result.output_dir / "redaction.jsonl")


def _exit_status(result, done: str, rows_file: pathlib.Path) -> int:
  """Prints how many images went through; 1 when any failed (its row in `rows_file` says why)."""
  print(f"{result.num_images - result.num_failed} of {result.num_images} {done}", flush=True)
  if result.num_failed:
    print(f"error: {result.num_failed} images failed (see 'error' in {rows_file})", file=sys.stderr)
    return 1
  return 0


def _expected_errors() -> tuple[type[Exception], ...]:
  """Errors that are the user's or the machine's, not the program's: bad requests (PredictError,
  CheckpointError are ValueErrors), missing files, a diverged loss, a strict build that would skip,
  a workdir in use, a disk full. Every error ends the run with one line; these without "internal"."""
  found = []
  for module, name in (
    ("privattnet_jax.train", "NonFiniteLossError"),
    ("privattnet_jax.data.vispr", "StrictBuildError"),
    ("privattnet_jax.workdir_lock", "WorkdirInUseError"),
  ):
    if module in sys.modules:
      found.append(getattr(sys.modules[module], name))
  return (OSError, ValueError, KeyError, app.UsageError, *found)


def _message(error: BaseException) -> str:
  """The error's message for the user: its first line (the rest goes to the traceback file), except
  for the manual-dir instructions, which are the message."""
  if _is_disk_full(error):
    return (
      f"no space left on the device ({_first_line(error)}); free some and rerun: the checkpoints and "
      "data written so far are kept, and training resumes from the last checkpoint"
    )
  vispr = sys.modules.get("privattnet_jax.data.vispr")
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if vispr is not None and isinstance(error, vispr.ManualDirError):
    return text
  text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  if not isinstance(error, _expected_errors()):
    text = f"internal error ({type(error).__name__}): {text}"
  return text


def _is_disk_full(error: BaseException | None) -> bool:
  """ENOSPC anywhere in the error's chain; libraries (array_record, orbax) re-raise it as other types."""
  while error is not None:
    if (
      isinstance(error, OSError) and error.errno == errno.ENOSPC
    ) or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _save_traceback(error: BaseException | None) -> str:
  """Writes the traceback to <workdir>/errors.log (or a temporary file): where the one line points."""
  if error is None:  # An unraisable report or thread exit without an exception.
    return ""
  text = "".join(traceback.format_exception(error))
  if FLAGS.workdir and os.path.isdir(FLAGS.workdir):
    path = os.path.join(FLAGS.workdir, "errors.log")
    try:
      with open(path, "a") as log:
        log.write(text)
      return path
    except OSError:  # The workdir's disk is full: try the temporary folder.
      pass
  try:
    fd, path = tempfile.mkstemp(prefix="privattnet_jax-error-", suffix=".log")
    with os.fdopen(fd, "w") as log:
      log.write(text)
    return path
  except OSError:  # Nowhere to write: --verbosity=1 prints it.
    return ""


def _route_library_tracebacks_to_errors_log() -> None:
  """Tracebacks that libraries' own threads and callbacks print go to errors.log, not stderr.

  A corrupt checkpoint makes orbax give up a restore and close its event loop while TensorStore's
  reads are still in flight: each read that finishes then fails in its callback (thousands of
  'Event loop is closed' tracebacks through sys.excepthook), and asyncio reports the abandoned
  tasks and coroutines (its logger, sys.unraisablehook). The run's own one-line error says what
  happened; these tracebacks join its traceback in errors.log. A Python thread that dies of an
  exception still says so on stderr, in one line.
  """
  sys.excepthook = lambda kind, error, trace: _save_traceback(error.with_traceback(trace))
  sys.unraisablehook = lambda unraisable: _save_traceback(unraisable.exc_value)
  threading.excepthook = _report_thread_failure


def _report_thread_failure(hook_args) -> None:
  """threading.excepthook: one warning line on stderr, the traceback in errors.log."""
  if hook_args.exc_value is None or isinstance(hook_args.exc_value, SystemExit):
    return
  path = _save_traceback(hook_args.exc_value)
  name = hook_args.thread.name if hook_args.thread is not None else "a thread"
  where = f" (traceback in {path})" if path else ""
  print(
    f"warning: background thread {name} failed: "
    f"{type(hook_args.exc_value).__name__}: {_first_line(hook_args.exc_value)}{where}",
    file=sys.stderr,
    flush=True,
  )


def _fail(error: BaseException) -> None:
  """Ends the process with exit status 1 and one line on stderr; the traceback goes to a file, or to
  stderr with --verbosity=1."""
  if isinstance(error, (config_check.ConfigError, output_folders.OutputFolderError)):
    # The line says it all: no traceback to keep.
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  if FLAGS.is_parsed() and FLAGS.verbosity >= 1:
    traceback.print_exception(error)
    where = ""
  else:
    path = _save_traceback(error)
    where = f" (traceback in {path}; --verbosity=1 prints it)" if path else ""
  print(f"error: {_message(error)}{where}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a bad flag or config file (ml_collections puts a
  config file's traceback into its message: its last line says what is wrong)."""
  unknown = _override_field_error(argv)
  if unknown:
    print(f"error: {unknown}", file=sys.stderr, flush=True)
    sys.exit(1)
  try:
    return FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  # ml_collections raises KeyError, OSError, ...
    print(f"error: {_config_error_text(error)} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(1)


def _config_error_text(error: BaseException) -> str:
  """A flag or config-file error on one line: a config file's traceback (which ml_collections puts
  into its message) reduced to its last line, the rest joined and cut to a readable length."""
  text = (
    str(error.args[0])
    if isinstance(error, (KeyError, AttributeError)) and error.args
    else str(error)
  )
  if isinstance(error.args[0] if error.args else None, KeyError):  # AttributeError(KeyError(...)).
    text = str(error.args[0].args[0])
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:
    lines = [lines[0], lines[-1]]
  text = " ".join(lines) or type(error).__name__
  return text if len(text) <= 400 else text[:400] + "..."


def _load_config():
  """FLAGS.config, loaded now (ml_collections loads the file and applies overrides on first use): a
  missing file, an unknown field or a failing get_config is one line before any work."""
  try:
    config = FLAGS.config
    if config is not None:
      config.get("model")  # A config file that failed to load raises on first use.
    return config
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"--config: {_config_error_text(error.__cause__ or error)}") from error


def _override_field_error(argv) -> str | None:
  """An override of a field the config does not have (or that another replaced), named with the
  closest known fields before flag parsing, where ml_collections would say only `'nonsense'`."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    name = name[2:] if name.startswith("noconfig.") else name  # --noconfig.data.strict
    if arg.startswith("-") and name.startswith("config."):
      problem = config_check.override_error(name.removeprefix("config."))
      if problem:
        return problem
  return None


# Libraries whose INFO lines (per checkpoint file, per dataset shard) would bury the progress log.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/", "/array_record/")
# Library warnings that only restate what this program asked for: evaluate, predict and export
# open the checkpoints read-only.
EXPECTED_WARNINGS = ("Given directory is read only",)


def _quiet_library_info(record) -> bool:
  """Drops the libraries' INFO lines and EXPECTED_WARNINGS, and the tracebacks of their warnings and
  errors (orbax logs one per failed background write on a full disk): the run's own one-line error
  follows, with its traceback in errors.log."""
  # asyncio's abandoned tasks after a failed restore: see _route_library_tracebacks_to_errors_log.
  if record.name == "asyncio" and record.exc_info:
    _save_traceback(record.exc_info[1])
    return False
  if not any(lib in record.pathname for lib in QUIET_LIBRARIES):
    return True
  if record.levelno < std_logging.WARNING or record.getMessage().startswith(EXPECTED_WARNINGS):
    return False
  record.exc_info, record.exc_text = None, None
  return True


def _check_usage(extra: list[str]) -> None:
  """Raises app.UsageError when the mode lacks a flag it needs."""
  if extra and FLAGS.mode not in ("predict", "redact"):
    raise app.UsageError(f"unexpected arguments: {extra}")
  if FLAGS.redaction_quality and FLAGS.mode != "evaluate":
    raise app.UsageError("--redaction_quality is a flag of --mode=evaluate")
  if FLAGS.mode in ("train", "evaluate", "cache_features"):
    _require("config", "workdir")
  elif FLAGS.mode in ("predict", "redact"):
    _require("output")
    if not (FLAGS.images or extra):
      raise app.UsageError(f"--mode={FLAGS.mode} needs --images")
    if bool(FLAGS.workdir) == bool(FLAGS.exported):
      raise app.UsageError(
        f"--mode={FLAGS.mode} needs --workdir (a checkpoint) or --exported (an artifact), not both"
      )
  elif FLAGS.mode == "export":
    _require("workdir")
  elif FLAGS.mode == "compare":
    _require("workdirs", "output")


def main(argv):
  host_memory.keep_freed_memory()  # Before XLA allocates anything.
  extra = argv[1:]
  try:
    _check_usage(extra)
  except app.UsageError as error:  # absl would print the module docstring too.
    print(f"error: {error} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(1)
  logging.get_absl_handler().addFilter(_quiet_library_info)
  _route_library_tracebacks_to_errors_log()
  status = 0
  try:
    config = _load_config()
    if config is not None:  # Every field's range, before anything compiles or reads data.
      config_check.check(config)
    # Before anything compiles. Modes without --config (predict, export) use the default folder.
    compilation_cache.enable(
      (config if config is not None else default_config.get_config()).compilation_cache_dir
    )
    if FLAGS.mode in ("predict", "redact"):
      from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

      predict.check_output_dir(pathlib.Path(FLAGS.output))
      output_folders.check(  # Nothing read is written over, nothing written is read.
        FLAGS.output,
        [*FLAGS.images, *extra, *([FLAGS.preferences] if FLAGS.preferences else [])],
        output_folders.workdir_reads(FLAGS.workdir) if FLAGS.workdir else [FLAGS.exported],
      )
    if FLAGS.distributed:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info(
      "JAX process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    )
    if FLAGS.mode == "predict":
      status = _predict([*FLAGS.images, *extra])
    elif FLAGS.mode == "redact":
      status = _redact([*FLAGS.images, *extra])
    elif FLAGS.mode == "compare":
      from privattnet_jax import evaluation_report  # pylint: disable=g-import-not-at-top

      print(f"wrote {evaluation_report.compare_runs(FLAGS.workdirs, FLAGS.output, FLAGS.split)}")
    else:
      # Imported after flag parsing: grain worker processes re-import this module.
      from privattnet_jax import train  # pylint: disable=g-import-not-at-top

      if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
      elif FLAGS.mode == "evaluate":
        train.evaluate_checkpoint(
          config,
          FLAGS.workdir,
          FLAGS.split,
          FLAGS.step,
          redaction_quality=FLAGS.redaction_quality,
        )
      elif FLAGS.mode == "cache_features":
        if config.feature_cache.mode == "off":
          config.feature_cache.mode = "host"
        cache = train.Experiment(config, FLAGS.workdir, need_train=False).feed.cache
        print(
          f"feature cache ready in {cache.directory}: {cache.bytes_per_record() / 1e3:.0f} KB per record",
          flush=True,
        )
      else:
        from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

        print(
          f"wrote {predict.export_predictor(FLAGS.workdir, FLAGS.output, FLAGS.step, config, FLAGS.export_platforms)}"
        )
  except Exception as error:  # pylint: disable=broad-except
    _fail(error)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
