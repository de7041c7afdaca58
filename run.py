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

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from privattnet_jax.cli import config_loading
from privattnet_jax.cli import errors
from privattnet_jax.cli import mode_flags
from privattnet_jax.cli import modes
from privattnet_jax.cli import process
from privattnet_jax.cli import usage

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(mode_flags)  # --helpshort lists the per-mode flags too.
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


# What predict and redact read of the flags: where the model comes from, where the results go.
_PHOTO_FLAGS = ("workdir", "exported", "step", "batch_size", "output", "profile", "preferences")
_PHOTO_FLAGS += ("heatmaps", "max_pixels", "panel_size", "loader_processes")


def _values(*names: str) -> dict:
  return {name: FLAGS[name].value for name in names}


def _run_mode(config, images: list[str]) -> int:
  """Runs --mode; returns the process exit status."""
  if FLAGS.mode == "predict":
    return modes.predict(
      images, config, **_values(*_PHOTO_FLAGS, "heatmap_normalisation", "top_attributes")
    )
  if FLAGS.mode == "redact":
    redaction = ("method", "target_score", "target_drop", "max_area", "keep_metadata")
    return modes.redact(images, config, **_values(*_PHOTO_FLAGS, *redaction))
  if FLAGS.mode == "compare":
    return modes.compare(FLAGS.workdirs, FLAGS.output, FLAGS.split)
  if FLAGS.mode == "export":
    return modes.export(FLAGS.workdir, FLAGS.output, FLAGS.step, config, FLAGS.export_platforms)
  if FLAGS.mode == "cache_features":
    return modes.cache_features(config, FLAGS.workdir)
  # Imported after flag parsing: grain worker processes re-import this module.
  from privattnet_jax.training import evaluator, train  # pylint: disable=g-import-not-at-top

  if FLAGS.mode == "train":
    train.train_and_evaluate(config, FLAGS.workdir)
  else:
    evaluator.evaluate_checkpoint(
      config, FLAGS.workdir, FLAGS.split, FLAGS.step, redaction_quality=FLAGS.redaction_quality
    )
  return 0


def main(argv):
  try:
    usage.check(FLAGS.flag_values_dict(), argv[1:])
  except app.UsageError as error:
    errors.usage_failure(str(error))
  status = 0
  try:
    config = config_loading.load_config(FLAGS.config)
    # Before anything compiles; train writes TensorBoard metrics.
    process.configure_process(FLAGS.workdir, config, writes_metrics=FLAGS.mode == "train")
    images = [*FLAGS.images, *argv[1:]]
    if FLAGS.mode in ("predict", "redact"):
      modes.check_output_dir(FLAGS.output, images, FLAGS.preferences, FLAGS.workdir, FLAGS.exported)
    process.start_jax(
      **_values("distributed", "coordinator_address", "num_processes", "process_id")
    )
    status = _run_mode(config, images)
  except Exception as error:  # pylint: disable=broad-except
    errors.fail(error, FLAGS.workdir, verbose=FLAGS.verbosity >= 1)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: config_loading.parse_flags(FLAGS, argv))
