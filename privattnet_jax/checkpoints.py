"""Orbax checkpoints: the TrainState, the input iterator's position and the run's metadata.

One manager keeps the N latest checkpoints (for resuming) and the best one by
validation Spearman (for evaluation and prediction). The metadata item holds
the config and the training target's mean, so a checkpoint alone is enough to
turn model outputs back into privacy scores.

A frozen encoder never changes during a run, so it is written once, to
<workdir>/frozen_encoder/<sha256 of its arrays>, and each checkpoint holds the
rest of the state and names that folder in its metadata. Saves are asynchronous
(the next steps run while a checkpoint is written) and old checkpoints are
deleted in the background.
"""

from __future__ import annotations

import hashlib
import math
import pathlib
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
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
      enable_async_checkpointing=True,
      enable_background_delete=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, metadata: dict,
         metrics: dict | None = None, frozen_encoder: dict | None = None) -> None:
  """Starts writing checkpoint `step` and returns (the previous one is completed first).

  `frozen_encoder`: what `save_frozen_encoder` returned; the encoder parts it names are left out.
  """
  if frozen_encoder is not None:
    state, _ = _split_frozen(state, frozen_encoder["collections"])
    metadata = {**metadata, "frozen_encoder": frozen_encoder}
  items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
  if data_iterator is not None:
    items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any = None):
  """Restores (state, metadata) and, when given one, moves `data_iterator` to the saved position."""
  reference = restore_metadata(manager, step).get("frozen_encoder")
  abstract_rest, abstract_frozen = _split_frozen(abstract_state, reference["collections"] if reference else ())
  items = {"state": ocp.args.StandardRestore(abstract_rest), "metadata": ocp.args.JsonRestore()}
  if data_iterator is not None:
    if (pathlib.Path(manager.directory) / str(step) / "data_iterator").exists():
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:  # Saved by a run with device-resident features (feature_cache.on_device), whose position is the step.
      logging.warning("checkpoint %d has no input-pipeline position (its run held the features on the devices): "
                      "the host loader starts a new shuffle from its first batch", step)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  state = restored["state"]
  if reference:
    state = _join_frozen(state, _restore_frozen_encoder(pathlib.Path(manager.directory).parent, reference,
                                                        abstract_frozen))
  return state, restored["metadata"]


def restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


# ----------------------------------------------------------------------------
# The frozen encoder, written once per run.

FROZEN_ENCODER_DIR = "frozen_encoder"


def frozen_collections(encoder_config) -> tuple[str, ...]:
  """The variable collections whose "encoder" entry a run never changes: a frozen encoder's params,
  and its BatchNorm statistics too when those are frozen ("update" keeps refreshing them)."""
  if encoder_config.trainable:
    return ()
  return ("params", "batch_stats") if encoder_config.batchnorm == "frozen" else ("params",)


def _split_frozen(state: Any, collections) -> tuple[Any, dict]:
  """(the state without the encoder entry of `collections`, {collection: that entry})."""
  frozen = {name: getattr(state, name)["encoder"] for name in collections}
  rest = state.replace(**{name: {key: value for key, value in getattr(state, name).items() if key != "encoder"}
                          for name in collections})
  return rest, frozen


def _join_frozen(rest: Any, frozen: dict) -> Any:
  return rest.replace(**{name: {**getattr(rest, name), "encoder": tree} for name, tree in frozen.items()})


def _frozen_digest(frozen: dict) -> str:
  """sha256 over the frozen arrays' paths, dtypes, shapes and bytes: the folder's name."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(frozen)[0], key=lambda item: str(item[0])):
    array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def save_frozen_encoder(workdir: str | pathlib.Path, state: Any, encoder_config) -> dict | None:
  """Writes the run's frozen encoder parts once (nothing when that folder exists already) and
  returns the reference `save` puts in each checkpoint's metadata; None when nothing is frozen.

  Written synchronously and renamed into place by orbax when complete, before any checkpoint that
  names it: a run killed at any moment leaves no checkpoint pointing at a partial folder.
  """
  collections = frozen_collections(encoder_config)
  if not collections:
    return None
  _, frozen = _split_frozen(state, collections)
  digest = _frozen_digest(frozen)
  path = pathlib.Path(workdir).absolute() / FROZEN_ENCODER_DIR / digest
  exists = path.exists()
  if jax.process_count() > 1:  # Every process must take part in the write, or none.
    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if not exists:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, frozen)
      checkpointer.wait_until_finished()
    logging.info("Wrote the frozen encoder (%s) to %s; checkpoints refer to it", "+".join(collections), path)
  return {"sha256": digest, "collections": list(collections)}


def _restore_frozen_encoder(workdir: pathlib.Path, reference: dict, abstract_frozen: dict) -> dict:
  path = workdir.absolute() / FROZEN_ENCODER_DIR / reference["sha256"]
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: the checkpoints of {workdir} keep their frozen encoder there")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_frozen)
