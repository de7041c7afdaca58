"""The training loop: steps over the feed, logging, validation, checkpoints, final evaluation."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from privattnet_jax.evaluation import metrics as metrics_lib
from privattnet_jax.training import checkpoints, evaluator, metric_writer, workdir_lock
from privattnet_jax.training import experiment as experiment_lib

MAX_STEPS_AHEAD = (
  8  # Steps the host may dispatch before the devices finish them (bounds queued batches).
)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Trains (resuming from the latest checkpoint), then evaluates the best checkpoint.

  Returns {split: metrics} for `config.eval_splits`, also written to eval_<split>.json.
  """
  experiment_lib.validate_config(
    config
  )  # A wrong value is reported as such, even when the workdir is in use.
  if jax.process_index() == 0:  # One run per workdir; released when the training loop ends.
    workdir_lock.acquire(workdir)
  with workdir_lock.released_on_error(workdir):
    experiment = experiment_lib.Experiment(config, workdir)
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
  writer = metric_writer.MetricWriter(experiment.workdir)
  logging.info(
    "Training %s for %d steps (%d per epoch), global batch %d on %d devices",
    config.model.name,
    experiment.total_steps,
    experiment.steps_per_epoch,
    config.input.batch_size,
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
        images_per_second = window_steps * config.input.batch_size / max(elapsed, 1e-9)
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
        validation = evaluator.evaluate(
          state,
          experiment.eval_fn,
          experiment.feed.eval_batches("validation"),
          mesh,
          experiment.task,
        ).metrics
        logging.info("step %d validation: %s", step, evaluator._headline(validation))
        writer.write(
          step, {f"validation/{k}": v for k, v in evaluator.scalar_metrics(validation).items()}
        )
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
      time.time() - run_start, experiment.total_steps - start_step, config.input.batch_size, seconds
    )
  finally:
    # A checkpoint still being written (async) is completed even when the run is interrupted.
    manager.wait_until_finished()
    writer.close()
    workdir_lock.release(workdir)
  return {
    split: evaluator.evaluate_checkpoint(
      config, workdir, split, experiment=experiment, trained_state=state
    )
    for split in config.eval_splits
  }


def _log_run_time(total: float, steps: int, batch_size: int, seconds: dict) -> None:
  """Logs where a run's wall time went: train steps (with logging), validation, checkpoint saves.

  A save's time is what the loop waited in `save`: async writes overlap the next steps.
  """
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
