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

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from configs import default as default_config
from privattnet_jax.cli import compilation_cache
from privattnet_jax.cli import errors
from privattnet_jax.cli import host_memory
from privattnet_jax.cli import logs

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
  from privattnet_jax.inference import predict  # pylint: disable=g-import-not-at-top

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
  from privattnet_jax.inference import predict  # pylint: disable=g-import-not-at-top

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
  from privattnet_jax.inference import redact  # pylint: disable=g-import-not-at-top

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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a bad flag or config file (ml_collections puts a
  config file's traceback into its message: its last line says what is wrong)."""
  replaced = _replaced_field_error(argv)
  if replaced:
    print(replaced, file=sys.stderr, flush=True)
    sys.exit(1)
  try:
    return FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  # ml_collections raises KeyError, OSError, ...
    errors.usage_failure(_config_error_text(error))


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


# Config fields replaced by another. A config file that sets one is refused by the run's config
# check (feeds.validate_config); a command-line override must be caught before flag parsing, which
# would fail on the unknown field with a traceback.
REPLACED_FIELDS = {
  "feature_cache.enabled": "feature_cache.mode=host (or off)",
  "feature_cache.on_device": "feature_cache.mode=device (or host)",
}


def _replaced_field_error(argv) -> str | None:
  for arg in argv[1:]:
    field = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and field in REPLACED_FIELDS:
      return f"error: --config.{field} was replaced by --config.{REPLACED_FIELDS[field]}"
  return None


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
  except app.UsageError as error:
    errors.usage_failure(str(error))
  logs.quiet_library_info(FLAGS.workdir)
  errors.route_library_tracebacks_to_errors_log(FLAGS.workdir)
  status = 0
  try:
    config = _load_config()
    # Before anything compiles. Modes without --config (predict, export) use the default folder.
    compilation_cache.enable(
      (config if config is not None else default_config.get_config()).compilation_cache_dir
    )
    if FLAGS.mode in ("predict", "redact"):
      from privattnet_jax.inference import predict  # pylint: disable=g-import-not-at-top

      predict.check_output_dir(pathlib.Path(FLAGS.output))
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
      from privattnet_jax.evaluation import evaluation_report  # pylint: disable=g-import-not-at-top

      print(f"wrote {evaluation_report.compare_runs(FLAGS.workdirs, FLAGS.output, FLAGS.split)}")
    else:
      # Imported after flag parsing: grain worker processes re-import this module.
      from privattnet_jax.training import train  # pylint: disable=g-import-not-at-top

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
        from privattnet_jax.inference import predict  # pylint: disable=g-import-not-at-top

        print(
          f"wrote {predict.export_predictor(FLAGS.workdir, FLAGS.output, FLAGS.step, config, FLAGS.export_platforms)}"
        )
  except Exception as error:  # pylint: disable=broad-except
    errors.fail(error, FLAGS.workdir, verbose=FLAGS.verbosity >= 1)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
