"""The project's one command line: train, evaluate and the other modes, configured by a config file.

  python run.py --config=configs/demo.py --workdir=/tmp/demo
  python run.py --config=configs/privattnet.py --workdir=runs/paper \
      --config.data.manual_dir=/data/vispr --config.model.encoder.pretrained=resnet50.pth
  python run.py --mode=predict --workdir=/tmp/demo --images ~/Pictures --output=/tmp/scores
  python run.py --mode=export --workdir=/tmp/demo
  python run.py --mode=predict --exported=/tmp/demo/export --images=photo.jpg --output=/tmp/scores
  python run.py --mode=compare --workdirs=/tmp/demo,/tmp/demo_privnet --output=compare.md

Every config field can be overridden with --config.<field>=<value>. Predict and export read the
config from the checkpoint; a --config given to them must describe the same model.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ("train", "evaluate", "cache_features", "predict", "export", "compare")

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py); train and evaluate need one.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_enum("mode", "train", MODES, "train: train (resuming) then evaluate the best checkpoint; "
                  "evaluate: evaluate a checkpoint on --split, with report.md/report.html; cache_features: "
                  "build (or check) the frozen-encoder feature cache of config.feature_cache, which train "
                  "then reads; predict: score "
                  "--images; export: write a jax.export predictor; compare: tabulate --workdirs.")
flags.DEFINE_string("split", "test", "Split for --mode=evaluate (and compare): train, validation or test.")
flags.DEFINE_integer("step", None, "Checkpoint step for evaluate, predict and export; default: the best by "
                     "validation Spearman.")
flags.DEFINE_multi_string("images", [], "predict: image files, folders (searched recursively) or globs; "
                          "more paths may follow as plain arguments.")
flags.DEFINE_string("output", None, "predict: the output folder; export: the artifact folder (default "
                    "<workdir>/export); compare: the markdown file.")
flags.DEFINE_string("exported", None, "predict: run the artifact in this folder instead of a --workdir checkpoint.")
flags.DEFINE_list("workdirs", [], "compare: the runs' workdirs, comma separated.")
flags.DEFINE_integer("profile", None, "predict: also give profile K's (0..29) score.")
flags.DEFINE_string("preferences", None, "predict: also give the score for these ratings (TSV as "
                    "data/user_studies/user_profiles.tsv with one rating column; attribute models).")
flags.DEFINE_integer("batch_size", 32, "predict: images per batch (padded, so that it compiles once).")
flags.DEFINE_bool("heatmaps", True, "predict: write heat map panels (attention models).")
flags.DEFINE_enum("heatmap_normalisation", "per_map", ("per_map", "global"),
                  "predict: min-max scale each step's map alone, or all steps of an image together.")
flags.DEFINE_integer("panel_size", 256, "predict: longer side of each heat-map panel tile, in pixels.")
flags.DEFINE_integer("top_attributes", 5, "predict: attribute models' most probable attributes to list.")
flags.DEFINE_integer("max_pixels", None, "predict: refuse images with more pixels (decompression bombs; "
                     "JPEGs are decoded reduced instead); default: Pillow's limit.")
flags.DEFINE_integer("loader_processes", 0, "predict: read photos in this many worker processes (0: threads); "
                     "faster for camera-size photos on a many-core host.")
flags.DEFINE_list("export_platforms", ["cpu", "cuda"], "export: platforms to lower for.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host GPU or TPU runs); "
                  "the coordinator flags below are for clusters it cannot detect itself.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, with --distributed.")


def _require(*names: str) -> None:
  missing = [f"--{name}" for name in names if not FLAGS[name].value]
  if missing:
    raise app.UsageError(f"--mode={FLAGS.mode} needs {' and '.join(missing)}")


def _predict(images) -> int:
  """Returns the process exit status: 1 when any image failed (its entry says why)."""
  # Imported here: grain worker processes re-import this module, and --exported runs need no model code.
  from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

  if FLAGS.exported:
    if FLAGS.config is not None or FLAGS.step is not None:
      raise app.UsageError("--exported runs the artifact as exported: --config and --step do not apply")
    predictor = predict.load_exported_predictor(FLAGS.exported, FLAGS.batch_size)
  else:
    predictor = predict.load_checkpoint_predictor(FLAGS.workdir, FLAGS.step, FLAGS.config, FLAGS.batch_size)
  result = predict.predict(
      predictor, images, FLAGS.output, profile=FLAGS.profile, preferences_file=FLAGS.preferences,
      heatmap_panels=FLAGS.heatmaps, normalisation=FLAGS.heatmap_normalisation, top_attributes=FLAGS.top_attributes,
      max_pixels=FLAGS.max_pixels, panel_size=FLAGS.panel_size, loader_processes=FLAGS.loader_processes,
      progress=sys.stderr.isatty())
  print(f"{result.num_images - result.num_failed} of {result.num_images} images scored; predictions in "
        f"{result.output_dir}", flush=True)
  if result.num_failed:
    print(f"error: {result.num_failed} images failed (see 'error' in {result.output_dir / 'predictions.jsonl'})",
          file=sys.stderr)
    return 1
  return 0


def _expected_errors() -> tuple[type[Exception], ...]:
  """Errors that end a run with one line instead of a traceback: bad requests (PredictError is a
  ValueError), missing files and a diverged loss."""
  train = sys.modules.get("privattnet_jax.train")
  return (FileNotFoundError, ValueError) + ((train.NonFiniteLossError,) if train is not None else ())

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


# Libraries whose INFO lines (per checkpoint file, per dataset shard) would bury the progress log.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")


def _quiet_library_info(record) -> bool:
  return record.levelno >= std_logging.WARNING or not any(lib in record.pathname for lib in QUIET_LIBRARIES)


def main(argv):
  extra = argv[1:]
  if extra and FLAGS.mode != "predict":
    raise app.UsageError(f"unexpected arguments: {extra}")
  if FLAGS.mode in ("train", "evaluate", "cache_features"):
    _require("config", "workdir")
  elif FLAGS.mode == "predict":
    _require("output")
    if not (FLAGS.images or extra):
      raise app.UsageError("--mode=predict needs --images")
    if bool(FLAGS.workdir) == bool(FLAGS.exported):
      raise app.UsageError("--mode=predict needs --workdir (a checkpoint) or --exported (an artifact), not both")
  elif FLAGS.mode == "export":
    _require("workdir")
  elif FLAGS.mode == "compare":
    _require("workdirs", "output")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  config = FLAGS.config
  status = 0
  try:
    if FLAGS.mode == "predict":
      status = _predict([*FLAGS.images, *extra])
    elif FLAGS.mode == "compare":
      from privattnet_jax import evaluation_report  # pylint: disable=g-import-not-at-top

      print(f"wrote {evaluation_report.compare_runs(FLAGS.workdirs, FLAGS.output, FLAGS.split)}")
    else:
      # Imported after flag parsing: grain worker processes re-import this module.
      from privattnet_jax import train  # pylint: disable=g-import-not-at-top

      if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
      elif FLAGS.mode == "evaluate":
        train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.split, FLAGS.step)
      elif FLAGS.mode == "cache_features":
        if config.feature_cache.mode == "off":
          config.feature_cache.mode = "host"
        cache = train.Experiment(config, FLAGS.workdir, need_train=False).feed.cache
        print(f"feature cache ready in {cache.directory}: {cache.bytes_per_record() / 1e3:.0f} KB per record",
              flush=True)
      else:
        from privattnet_jax import predict  # pylint: disable=g-import-not-at-top

        print(f"wrote {predict.export_predictor(FLAGS.workdir, FLAGS.output, FLAGS.step, config, FLAGS.export_platforms)}")
  except Exception as error:  # pylint: disable=broad-except
    if not isinstance(error, _expected_errors()):
      raise
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  sys.exit(status)


if __name__ == "__main__":
  replaced = _replaced_field_error(sys.argv)
  if replaced:
    sys.exit(replaced)
  app.run(main)
