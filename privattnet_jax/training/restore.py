"""A run restored from its workdir alone: the checkpoint's metadata gives config, task, model."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections

from privattnet_jax import config_history, models
from privattnet_jax.data import input_pipeline
from privattnet_jax.models import scoring
from privattnet_jax.training import checkpoints, train_state, train_steps


@dataclasses.dataclass
class RestoredRun:
  """A checkpoint ready for inference: config, task, model and state, on a mesh of every device."""

  config: ml_collections.ConfigDict
  task: scoring.Task
  model: Any
  state: train_state.TrainState
  step: int
  mesh: jax.sharding.Mesh


def select_step(manager, workdir, step: int | None = None) -> int:
  """The best checkpoint by validation Spearman, or `step` after checking that it exists."""
  if step is None:
    step = manager.best_step()
  if step is None:
    raise FileNotFoundError(
      f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first"
    )
  if step not in manager.all_steps():
    raise FileNotFoundError(
      f"no checkpoint at step {step}; available: {sorted(manager.all_steps())}"
    )
  return step


def restore_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> RestoredRun:
  """Restores a checkpoint from itself alone, building and reading no dataset (predict, export).

  Its metadata gives the config, the target mean and the preference table.
  """
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first")
  manager = checkpoints.create_manager(workdir, keep=1, read_only=True)
  step = select_step(manager, workdir, step)
  metadata = checkpoints.restore_metadata(manager, step)
  stored = metadata["config"]
  config_history.migrate(stored)  # A checkpoint written before a field moved.
  config = ml_collections.ConfigDict(stored)
  preferences = metadata.get("preferences")
  if (
    preferences is None
  ):  # A checkpoint older than the stored table: its config's score definition.
    preferences = input_pipeline.score_preferences(config.score)
  task = scoring.make_task(
    config.model, config.score, config.loss, metadata["target_mean"], preferences
  )
  model = models.create_model(
    config.model, num_outputs=task.preferences.shape[1], batchnorm_axis_name=train_steps.AXIS
  )
  mesh = train_steps.create_mesh()
  abstract_state = train_state.abstract_train_state(
    model, config.input.image_size, config.model.encoder, config.optim, mesh
  )
  state, _ = checkpoints.restore(manager, step, abstract_state)
  return RestoredRun(config, task, model, state, step, mesh)
