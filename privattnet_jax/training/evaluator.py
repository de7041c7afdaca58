"""The evaluation pass over a split; `evaluate_checkpoint`: eval_<split>.json and the report."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from privattnet_jax.data import attributes
from privattnet_jax.evaluation import metrics as metrics_lib
from privattnet_jax.models import scoring
from privattnet_jax.training import experiment as experiment_lib
from privattnet_jax.training import serving
from privattnet_jax.training import restore, train_state, train_steps


def _to_host(tree):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


@dataclasses.dataclass
class EvalResult:
  metrics: dict
  predictions: np.ndarray
  targets: np.ndarray
  extras: (
    dict  # attention, attribute_probabilities, labels, image_id, boxes, num_boxes (host side).
  )


def evaluate(
  state: train_state.TrainState, eval_fn, batches, mesh, task: scoring.Task | None = None
) -> EvalResult:
  """Runs every batch once; padded rows (mask 0) are dropped before the metrics.

  Metrics: `metrics.score_metrics` (per profile and averaged for P > 1); for attribute models
  `attribute_map` (macro AP over the attributes with a positive example) and `attribute_ap`
  ({attribute_id: AP}, None without a positive); with a per-profile `task`, `table`: the
  paper-table row (`scoring.table_scores`).
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
      *scoring.table_scores(predictions, probabilities, arrays["labels"], task)
    )
  return EvalResult(result_metrics, predictions, targets, arrays)


def scalar_metrics(result_metrics: dict) -> dict:
  """`evaluate`'s loggable numbers: top-level scalars, and the table row as `table/<key>`."""
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


def evaluate_checkpoint(
  config,
  workdir: str,
  split: str,
  step: int | None = None,
  *,
  experiment: experiment_lib.Experiment | None = None,
  redaction_quality: bool = False,
  trained_state: train_state.TrainState | None = None,
) -> dict:
  """Evaluates the best (or a named) checkpoint on a split; writes eval_<split>.json and the report.

  eval_<split>.json goes into the workdir, with `localisation` where the data has boxes; the report
  into evaluation_report.report_dir.

  `redaction_quality` adds the `redaction` entry and the report's Redaction section (an attention
  model on data with boxes): opt-in, since it runs the image path on many candidate masks and
  costs far more than the evaluation itself. `trained_state`: the state training ended with, used
  as it is when it is the selected step's (no restore of what is already in memory).
  """
  # Imported here: the report's modules are start-up that the training loop does not need.
  from privattnet_jax.evaluation import evaluation_report  # pylint: disable=g-import-not-at-top

  experiment = experiment or experiment_lib.Experiment(config, workdir, need_train=False)
  laps = _Laps()
  step = restore.select_step(experiment.manager, workdir, step)
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
      serving.photo_inference(
        experiment.eval_fn, state, experiment.mesh, experiment.task.preferences.shape[1]
      ),
      image_size=config.input.image_size,
      batch_size=config.input.batch_size,
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
