"""Training and evaluation: the loop, the evaluation pass, metric logging and the run's setup.

The pure per-device steps, their data-parallel wrappers and the TrainState are in train_steps.py;
this module drives them over the data (`Experiment`, `train_and_evaluate`, `evaluate_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from privattnet_jax import attributes
from privattnet_jax import checkpoints
from privattnet_jax import feature_cache
from privattnet_jax import feeds
from privattnet_jax import input_pipeline
from privattnet_jax import metrics as metrics_lib
from privattnet_jax import models
from privattnet_jax import train_steps
from privattnet_jax import weights
from privattnet_jax import workdir_lock
from privattnet_jax import data as data_lib

MAX_STEPS_AHEAD = (
  8  # Steps the host may dispatch before the devices finish them (bounds queued batches).
)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def _to_host(tree):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, with the field's name, on values that would otherwise fail deep inside a step."""
  devices, processes = jax.device_count(), jax.process_count()
  if config.batch_size <= 0 or config.batch_size % devices:
    raise ValueError(
      f"batch_size={config.batch_size} must be a positive multiple of the device count ({devices})"
    )
  if config.batch_size % processes:
    raise ValueError(
      f"batch_size={config.batch_size} must be divisible by the process count ({processes})"
    )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set num_train_steps > 0 or num_epochs > 0")
  if config.image_size < 32:
    raise ValueError(f"image_size={config.image_size} is too small for the encoder (minimum 32)")
  if config.model.name not in models.MODEL_NAMES:
    raise ValueError(f"model.name must be one of {models.MODEL_NAMES}, got {config.model.name!r}")
  stride = models.encoder_output_stride(
    config.model.encoder, models.encoder_stages(config.model.name, config.model.encoder)
  )
  if config.image_size % stride:
    raise ValueError(
      f"image_size={config.image_size} must be a multiple of the encoder's output stride "
      f"{stride} (e.g. {max(stride, config.image_size // stride * stride)})"
    )
  pretrained = config.model.encoder.get("pretrained", "")
  if pretrained:  # A missing weight file fails here, before any dataset work.
    try:
      weights.resolve_path(pretrained)
    except weights.WeightImportError as e:
      raise FileNotFoundError(f"model.encoder.pretrained: {e}") from None
  bias_init = config.model.get("attribute_bias_init", "uniform")
  if bias_init not in models.ATTRIBUTE_BIAS_INITS:
    raise ValueError(
      f"model.attribute_bias_init must be one of {models.ATTRIBUTE_BIAS_INITS}, got {bias_init!r}"
    )
  for name in ("log_every_steps", "keep_checkpoints"):
    if config[name] <= 0:
      raise ValueError(f"{name} must be positive, got {config[name]}")
  feeds.validate_config(config)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX's writer imports torch whenever it is installed (the test extra installs it), only
  to accept torch tensors: 1.7 s of a run's start-up for scalars that are Python floats here.
  Hiding torch during that one import makes it fall back to numpy; torch stays importable after.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard events (no TensorFlow)."""

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._jsonl = open(workdir / "metrics.jsonl", "a")
      self._tensorboard = _summary_writer_class()(str(workdir / "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      if isinstance(value, (int, float)) and np.isfinite(value):
        self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


@dataclasses.dataclass
class EvalResult:
  metrics: dict
  predictions: np.ndarray
  targets: np.ndarray
  extras: (
    dict  # attention, attribute_probabilities, labels, image_id, boxes, num_boxes (host side).
  )


def evaluate(
  state: train_steps.TrainState, eval_fn, batches, mesh, task: train_steps.Task | None = None
) -> EvalResult:
  """Runs every batch once; padded rows (mask 0) are dropped before the metrics.

  Metrics: `metrics.score_metrics` (per profile and averaged for P > 1); for attribute models
  `attribute_map` (macro AP over the attributes with a positive example) and `attribute_ap`
  ({attribute_id: AP}, None without a positive); with a per-profile `task`, `table`: the
  paper-table row (`train_steps.table_scores`).
  """
  collected: dict[str, list] = {}
  local_single_process = jax.process_count() == 1
  for batch in batches:
    out = _to_host(eval_fn(state, train_steps.shard_batch(batch, mesh)))
    keep = out.pop("mask") > 0
    for key, value in out.items():
      collected.setdefault(key, []).append(np.asarray(value)[keep])
    if local_single_process:
      for key in ("labels", "image_id", "boxes", "num_boxes"):
        if key in batch and key not in out:
          collected.setdefault(key, []).append(np.asarray(batch[key])[keep])
  arrays = {k: np.concatenate(v) for k, v in collected.items()}
  predictions, targets = arrays.pop("prediction"), arrays.pop("target")
  result_metrics = metrics_lib.score_metrics(predictions, targets)
  probabilities = arrays.get("attribute_probabilities")
  if probabilities is not None and "labels" in arrays:
    offset = attributes.NUM_ATTRIBUTES - probabilities.shape[-1]
    average_precision = metrics_lib.mean_average_precision(
      probabilities, arrays["labels"][:, offset:] > 0
    )
    result_metrics["attribute_map"] = average_precision["map"]
    result_metrics["attribute_ap"] = {
      attribute_id: None if np.isnan(ap) else ap
      for attribute_id, ap in zip(
        attributes.ATTRIBUTE_IDS[offset:], average_precision["per_attribute_ap"]
      )
    }
  if task is not None and task.table_preferences is not None and "labels" in arrays:
    result_metrics["table"] = metrics_lib.regression_metrics(
      *train_steps.table_scores(predictions, probabilities, arrays["labels"], task)
    )
  return EvalResult(result_metrics, predictions, targets, arrays)


def scalar_metrics(result_metrics: dict) -> dict:
  """The loggable numbers of `evaluate`'s metrics: top-level scalars and the table row as `table/<key>`."""
  scalars = {f"table/{k}": v for k, v in result_metrics.get("table", {}).items()}
  scalars.update({k: v for k, v in result_metrics.items() if isinstance(v, (int, float))})
  return scalars


def _headline(m: dict) -> str:
  line = f"L1 {m['l1']:.3f}  Pearson {m['pearson']:.3f}  Spearman {m['spearman']:.3f}  MSE {m['mse']:.3f}  (n={m['n']})"
  if "per_profile" in m:
    line = f"mean over {len(m['per_profile'])} profiles: {line}"
  if "table" in m:
    line += f"; paper-table row (profile-mean score): {_headline(m['table'])}"
  if "attribute_map" in m:
    line += f"; attribute mAP {m['attribute_map']:.3f}"
  return line


class Experiment:
  """Everything a run derives from its config: data, task, model, mesh and compiled steps."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, need_train: bool = True
  ):
    validate_config(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.sources = data_lib.load_data_sources(config)
    self.manager = checkpoints.create_manager(self.workdir, config.keep_checkpoints)
    if need_train:  # A resumed run continues from the newest checkpoint that restores.
      checkpoints.set_aside_unrestorable(self.manager, self.workdir)
    self.mesh = train_steps.create_mesh()
    num_train = len(self.sources["train"])
    self.steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={config.batch_size} exceeds the {num_train} training examples")
    self.total_steps = (
      config.num_train_steps
      if config.num_train_steps > 0
      else (config.num_epochs * self.steps_per_epoch)
    )
    preferences = input_pipeline.preferences_from_config(
      config
    )  # The run's one read of `config.score`.
    self.task = train_steps.make_task(config, self._target_mean(preferences), preferences)
    self.model = models.create_model(
      config, num_outputs=self.task.preferences.shape[1], batchnorm_axis_name=train_steps.AXIS
    )
    image_shape = (config.image_size, config.image_size, 3)
    replicated = NamedSharding(self.mesh, P())
    # Through host memory: every process computes the same initial state on its first local
    # device, and a single-device array cannot become one replica of a mesh that spans processes
    # when the process has no other device (one process per GPU).
    self.initial_state = jax.device_put(
      jax.device_get(
        train_steps.create_train_state(
          config,
          self.model,
          self.task,
          image_shape,
          self.total_steps,
          jax.random.PRNGKey(config.seed),
          attribute_bias=self._attribute_bias(),
        )
      ),
      replicated,
    )
    # Kept apart: the train step donates (deletes) the state it is given.
    self.abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self.initial_state
    )
    self.eval_fn = train_steps.parallel_eval_step(self.mesh, self.task)
    self.feed = feeds.select_feed(
      config,
      self.sources,
      self.mesh,
      self.task,
      steps_per_epoch=self.steps_per_epoch,
      prepare_cache=self.prepare_feature_cache,
      need_train=need_train,
    )

  def _attribute_bias(self) -> np.ndarray | None:
    """An attribute model's initial output bias: the training labels' log prior odds ("prior").

    PyTorch's init ("uniform") starts every logit near 0, and most attributes are absent from
    most images (on the synthetic data 57 of 67 never occur): PrivAttNet_MLC's shared per-step
    head then spends its run pushing those logits down and barely learns which image holds what
    (docs/benchmarks.md, "PrivAttNet_MLC").
    """
    if self.config.model.name not in train_steps.ATTRIBUTE_MODELS:
      return None
    if self.config.model.get("attribute_bias_init", "uniform") == "uniform":
      return None
    return attributes.log_prior_odds(input_pipeline.split_labels(self.sources["train"]))

  def _target_mean(self, preferences: np.ndarray) -> np.ndarray:
    """The training split's mean score per column (the authors hard-coded theirs); reused from a checkpoint.

    Attribute models never use it, so their checkpoints serve any `score.per_profile`.
    """
    num_outputs = preferences.shape[1]
    latest = self.manager.latest_step()
    if latest is not None:
      mean = np.asarray(
        checkpoints.restore_metadata(self.manager, latest)["target_mean"], np.float32
      )
      if mean.shape == (num_outputs,):
        return mean
      if self.config.model.name not in train_steps.ATTRIBUTE_MODELS:
        raise ValueError(
          f"the checkpoints in {self.workdir} predict {mean.size} score column(s), this config {num_outputs} "
          f"(score.per_profile={self.config.score.per_profile}): use the run's own config or a new workdir"
        )
    return input_pipeline.split_scores(
      self.sources["train"], preferences, self.config.score.pooling
    ).mean(axis=0)

  def metadata(self) -> dict:
    # The preference table rides along: a checkpoint must not depend on a TSV file of the machine it
    # was trained on (score.source='file') to turn attribute probabilities into scores.
    return {
      "config": self.config.to_dict(),
      "target_mean": self.task.target_mean.tolist(),
      "preferences": self.task.preferences.tolist(),
    }

  def prepare_feature_cache(self) -> feature_cache.FeatureCache:
    """Builds or checks the cache for the run's frozen encoder: the latest checkpoint's when there
    is one (a resumed run keeps its encoder even if the config's weights changed), else the initial one."""
    latest = self.manager.latest_step()
    state = self.initial_state if latest is None else self.restore(latest)
    encode_step = train_steps.parallel_encode_step(
      self.mesh, feature_cache.DTYPES[self.config.feature_cache.dtype]
    )
    return feature_cache.ensure(
      self.config,
      self.sources,
      state,
      lambda images: encode_step(
        state, train_steps.shard_batch({"image": images}, self.mesh)["image"]
      ),
      self.task,
    )

  def restore(self, step: int, data_iterator=None) -> train_steps.TrainState:
    state, _ = checkpoints.restore(self.manager, step, self.abstract_state, data_iterator)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Trains (resuming from the latest checkpoint), then evaluates the best checkpoint.

  Returns {split: metrics} for `config.eval_splits`, also written to eval_<split>.json.
  """
  validate_config(config)  # A wrong value is reported as such, even when the workdir is in use.
  if jax.process_index() == 0:  # One run per workdir; released when the training loop ends.
    workdir_lock.acquire(workdir)
  with workdir_lock.released_on_error(workdir):
    experiment = Experiment(config, workdir)
  manager, mesh = experiment.manager, experiment.mesh
  eval_every = (
    config.eval_every_steps if config.eval_every_steps > 0 else experiment.steps_per_epoch
  )
  checkpoint_every = (
    config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every
  )

  feed = experiment.feed
  state = experiment.initial_state
  start_step = 0
  latest = manager.latest_step()
  if latest is not None:
    state = experiment.restore(latest, feed.position)
    start_step = int(state.step)
    logging.info("Resumed from the checkpoint at step %d in %s", start_step, workdir)

  frozen_encoder = checkpoints.save_frozen_encoder(experiment.workdir, state, config.model.encoder)
  metrics_lib.import_in_background()
  writer = MetricWriter(experiment.workdir)
  logging.info(
    "Training %s for %d steps (%d per epoch), global batch %d on %d devices",
    config.model.name,
    experiment.total_steps,
    experiment.steps_per_epoch,
    config.batch_size,
    jax.device_count(),
  )
  try:
    # (step, loss) of the steps dispatched since the last check. The host runs ahead of the devices
    # by at most MAX_STEPS_AHEAD steps and reads the losses at its sync points (log, checkpoint),
    # so the devices never wait for the host between steps.
    unchecked = []
    window_start, window_steps = time.time(), 0
    run_start, seconds = time.time(), {"validation": 0.0, "checkpoint": 0.0}
    for step in range(start_step + 1, experiment.total_steps + 1):
      state, step_metrics = feed.step(state)
      unchecked.append((step, step_metrics["loss"]))
      if len(unchecked) > MAX_STEPS_AHEAD:
        jax.block_until_ready(
          unchecked[-MAX_STEPS_AHEAD - 1][1]
        )  # Waits on that step alone, copies nothing.
      window_steps += 1
      is_last = step == experiment.total_steps
      log_now = step % config.log_every_steps == 0 or is_last
      evaluate_now = step % eval_every == 0 or is_last
      checkpoint_now = step % checkpoint_every == 0 or evaluate_now
      if log_now or checkpoint_now:  # (evaluate_now implies checkpoint_now)
        _check_finite(unchecked, manager)  # Up to this step's loss, before it is logged or saved.
        unchecked = []
      if log_now:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.time() - window_start
        images_per_second = window_steps * config.batch_size / max(elapsed, 1e-9)
        eta = (experiment.total_steps - step) * elapsed / window_steps
        logging.info(
          "step %d/%d  loss %.4f  %.1f img/s  ETA %s",
          step,
          experiment.total_steps,
          values["loss"],
          images_per_second,
          time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        writer.write(step, {**values, "images_per_second": images_per_second})
        window_start, window_steps = time.time(), 0
      validation = None
      if evaluate_now:
        eval_start = time.time()
        validation = evaluate(
          state,
          experiment.eval_fn,
          experiment.feed.eval_batches("validation"),
          mesh,
          experiment.task,
        ).metrics
        logging.info("step %d validation: %s", step, _headline(validation))
        writer.write(step, {f"validation/{k}": v for k, v in scalar_metrics(validation).items()})
        window_start += time.time() - eval_start  # Training throughput excludes evaluation.
        seconds["validation"] += time.time() - eval_start
      if checkpoint_now:
        selection = (
          None if validation is None else {checkpoints.SELECTION_METRIC: validation["spearman"]}
        )
        save_start = time.time()
        checkpoints.save(
          manager, step, state, feed.position, experiment.metadata(), selection, frozen_encoder
        )
        seconds["checkpoint"] += time.time() - save_start
    save_start = time.time()
    manager.wait_until_finished()
    seconds["checkpoint"] += time.time() - save_start
    _log_run_time(
      time.time() - run_start, experiment.total_steps - start_step, config.batch_size, seconds
    )
  finally:
    # A checkpoint still being written (async) is completed even when the run is interrupted.
    manager.wait_until_finished()
    writer.close()
    workdir_lock.release(workdir)
  return {
    split: evaluate_checkpoint(config, workdir, split, experiment=experiment, trained_state=state)
    for split in config.eval_splits
  }


def _log_run_time(total: float, steps: int, batch_size: int, seconds: dict) -> None:
  """Where a run's wall time went: train steps (with logging), validation, checkpoint saves (the
  time the loop waited in `save`: async writes overlap the next steps)."""
  stepping = total - sum(seconds.values())
  logging.info(
    "Trained %d steps in %.1f s: %.1f s of train steps (%.1f img/s), %.1f s of validation, "
    "%.1f s in checkpoint saves",
    steps,
    total,
    stepping,
    steps * batch_size / max(stepping, 1e-9),
    seconds["validation"],
    seconds["checkpoint"],
  )


def _check_finite(unchecked: list, manager) -> None:
  """Raises at the first of these (step, loss) pairs whose loss is NaN or infinite."""
  losses = jax.device_get([loss for _, loss in unchecked])
  for (step, _), loss in zip(unchecked, losses):
    if not np.isfinite(loss):
      manager.wait_until_finished()
      last_good = manager.latest_step()
      raise NonFiniteLossError(
        f"the loss is {float(loss)} at step {step}; stopping. The last good checkpoint is "
        f"{'step ' + str(last_good) if last_good is not None else 'none (no checkpoint was written)'}."
      )


class _Laps:
  """Seconds between named points of a phase, for one log line of where its time went."""

  def __init__(self):
    self.start = self.last = time.perf_counter()
    self.seconds = {}

  def __call__(self, name: str) -> None:
    now = time.perf_counter()
    self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
    self.last = now

  def __str__(self) -> str:
    parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.seconds.items())
    return f"{self.last - self.start:.2f} s: {parts}"


def _photo_inference(experiment: Experiment, state: train_steps.TrainState):
  """(images, mask) -> the eval step's `score` and `attention` for images without targets (zeros fill
  the batch's targets), as the redaction quality re-scores redacted images."""
  num_scores = experiment.task.preferences.shape[1]

  def infer(images, mask):
    batch = {
      "image": images,
      "mask": mask,
      "score": np.zeros((len(images), num_scores), np.float32),
      "labels": np.zeros((len(images), attributes.NUM_ATTRIBUTES), np.float32),
    }
    outputs = _to_host(experiment.eval_fn(state, train_steps.shard_batch(batch, experiment.mesh)))
    return {"score": outputs["prediction"], "attention": outputs["attention"]}

  return infer


def evaluate_checkpoint(
  config,
  workdir: str,
  split: str,
  step: int | None = None,
  *,
  experiment: Experiment | None = None,
  redaction_quality: bool = False,
  trained_state: train_steps.TrainState | None = None,
) -> dict:
  """Evaluates the best (or a named) checkpoint on a split; writes workdir/eval_<split>.json (with
  `localisation` where the data has boxes) and the report (evaluation_report.report_dir).

  `redaction_quality` adds the `redaction` entry and the report's Redaction section (an attention
  model on data with boxes): opt-in, since it runs the image path on many candidate masks and
  costs far more than the evaluation itself. `trained_state`: the state training ended with, used
  as it is when it is the selected step's (no restore of what is already in memory).
  """
  # Imported here: the report's modules are start-up that the training loop does not need.
  from privattnet_jax import evaluation_report  # pylint: disable=g-import-not-at-top

  experiment = experiment or Experiment(config, workdir, need_train=False)
  laps = _Laps()
  step = train_steps.select_step(experiment.manager, workdir, step)
  if split not in experiment.sources:
    raise ValueError(f"unknown split {split!r}; have {sorted(experiment.sources)}")
  if trained_state is not None and int(trained_state.step) == step:
    state = trained_state
  else:
    state = experiment.restore(step)
  laps("restore")
  result = evaluate(
    state, experiment.eval_fn, experiment.feed.eval_batches(split), experiment.mesh, experiment.task
  )
  laps("evaluation pass")
  summary = {k: result.metrics[k] for k in ("l1", "mse", "pearson", "spearman", "n")}
  summary.update({k: v for k, v in result.metrics.items() if k not in summary})
  summary["step"] = int(step)
  summary["model"] = config.model.name
  localisation = evaluation_report.localisation_summary(result.extras)
  if localisation is not None:
    summary["localisation"] = localisation
  laps("localisation")
  redaction = None
  # Needs boxes and attention (localisation) and the image ids of a single process.
  if redaction_quality and localisation is not None and "image_id" in result.extras:
    redaction = evaluation_report.redaction_summary(
      result.extras,
      experiment.sources[split],
      _photo_inference(experiment, state),
      image_size=config.image_size,
      batch_size=config.batch_size,
      model_name=config.model.name,
    )
  if redaction is not None:
    summary["redaction"] = redaction[0]
    laps("redaction quality")
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / f"eval_{split}.json").write_text(json.dumps(summary, indent=2))
    if "image_id" in result.extras:
      paths = evaluation_report.write_eval_report(
        evaluation_report.report_dir(workdir, split),
        method_name=config.model.name,
        split=split,
        summary=summary,
        extras=result.extras,
        predictions=result.predictions,
        targets=result.targets,
        source=experiment.sources[split],
        redaction_examples=redaction[1] if redaction else (),
      )
      laps("report")
      logging.info("Wrote %s and %s", *paths)
    else:  # Several processes: image ids (host strings) stay with the process that read them.
      logging.info(
        "No report.md: a multi-process evaluation keeps the labels and image ids per process"
      )
  logging.info("Evaluated step %d on %s in %s", step, split, laps)
  print(
    f"{config.model.name} on {split} (checkpoint step {step}): {_headline(summary)}", flush=True
  )
  return summary
