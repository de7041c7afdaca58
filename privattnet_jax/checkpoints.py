"""Orbax checkpoints: the TrainState, the input iterator's position and the run's metadata.

One manager keeps the N latest checkpoints (for resuming) and the best one by
validation Spearman (for evaluation and prediction). The metadata item holds
the config and the training target's mean, so a checkpoint alone is enough to
turn model outputs back into privacy scores.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from absl import logging
import grain
import orbax.checkpoint as ocp

SELECTION_METRIC = "spearman"  # The authors select by Spearman; we select on validation.


def _selection_value(metrics: dict) -> float:
  value = metrics.get(SELECTION_METRIC, float("nan"))
  return -math.inf if value is None or math.isnan(value) else value


def create_manager(workdir: str | pathlib.Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=_selection_value, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else policy,
      best_fn=_selection_value,
      best_mode="max",
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, metadata: dict,
         metrics: dict | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
  if data_iterator is not None:
    items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any = None):
  """Restores (state, metadata) and, when given one, moves `data_iterator` to the saved position."""
  items = {"state": ocp.args.StandardRestore(abstract_state), "metadata": ocp.args.JsonRestore()}
  if data_iterator is not None:
    if (pathlib.Path(manager.directory) / str(step) / "data_iterator").exists():
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:  # Saved with feature_cache.mode='device', whose data position is the step number.
      logging.warning("checkpoint %d has no input-pipeline position (its run held the features on the devices): "
                      "the host loader starts a new shuffle from its first batch", step)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["metadata"]


def restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
