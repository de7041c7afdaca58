"""The project's one command line: train, evaluate and the other modes, configured by a config file.

  python run.py --config=configs/demo.py --workdir=/tmp/demo
  python run.py --config=configs/privattnet.py --workdir=runs/paper \
      --config.data.manual_dir=/data/vispr --config.model.encoder.pretrained=resnet50.pth

Every config field can be overridden with --config.<field>=<value>.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ("train", "evaluate", "cache_features")

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_enum("mode", "train", MODES, "train: train (resuming) then evaluate the best checkpoint; "
                  "evaluate: evaluate a checkpoint on --split; cache_features: build (or check) the "
                  "frozen-encoder feature cache of config.feature_cache, which train then reads.")
flags.DEFINE_string("split", "test", "Split for --mode=evaluate: train, validation or test.")
flags.DEFINE_integer("step", None, "Checkpoint step for --mode=evaluate; default: the best by validation Spearman.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host GPU or TPU runs); "
                  "the coordinator flags below are for clusters it cannot detect itself.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, with --distributed.")
flags.mark_flags_as_required(["config", "workdir"])

# Libraries whose INFO lines (per checkpoint file, per dataset shard) would bury the progress log.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")


def _quiet_library_info(record) -> bool:
  return record.levelno >= std_logging.WARNING or not any(lib in record.pathname for lib in QUIET_LIBRARIES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  # Imported after flag parsing: grain worker processes re-import this module.
  from privattnet_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  config = FLAGS.config
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.split, FLAGS.step)
    elif FLAGS.mode == "cache_features":
      config.feature_cache.enabled = True
      cache = train.Experiment(config, FLAGS.workdir, need_train=False).feature_cache
      print(f"feature cache ready in {cache.directory}: {cache.bytes_per_record() / 1e3:.0f} KB per record", flush=True)
  except (train.NonFiniteLossError, FileNotFoundError, ValueError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
