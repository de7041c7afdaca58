"""Orbax checkpoints: the TrainState, the input iterator's position and the run's metadata.

One manager keeps the N latest checkpoints (for resuming) and the best one by
validation Spearman (for evaluation and prediction). The metadata item holds
the config and the training target's mean, so a checkpoint alone is enough to
turn model outputs back into privacy scores.

A checkpoint that does not restore (a truncated or deleted file, broken metadata) is named in
one line (`CheckpointError`) with the steps that do restore. A training run that finds its
latest checkpoints broken sets them aside (renamed into `checkpoints_set_aside/`, never
deleted) and resumes from the newest one that restores (`set_aside_unrestorable`).

A frozen encoder never changes during a run, so it is written once, to
<workdir>/frozen_encoder/<sha256 of its arrays>, and each checkpoint holds the
rest of the state and names that folder in its metadata. Saves are asynchronous
(the next steps run while a checkpoint is written) and old checkpoints are
deleted in the background.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import time
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

SELECTION_METRIC = "spearman"  # The authors select by Spearman; we select on validation.
SET_ASIDE_DIR = (
  "checkpoints_set_aside"  # <workdir>/checkpoints_set_aside/<step>-<UTC time>: broken ones.
)


class CheckpointError(ValueError):
  """A checkpoint step does not restore; the message names it and the steps that do."""


def _selection_value(metrics: dict) -> float:
  value = metrics.get(SELECTION_METRIC, float("nan"))
  return -math.inf if value is None or math.isnan(value) else value


def create_manager(
  workdir: str | pathlib.Path, keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
        get_metric_fn=_selection_value, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=None if read_only else policy,
    best_fn=_selection_value,
    best_mode="max",
    read_only=read_only,
    save_interval_steps=0 if read_only else 1,  # What orbax sets, with a warning, when read-only.
    create=not read_only,
    enable_async_checkpointing=True,
    enable_background_delete=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any,
  metadata: dict,
  metrics: dict | None = None,
  frozen_encoder: dict | None = None,
) -> None:
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


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any = None
):
  """Restores (state, metadata) and, when given one, moves `data_iterator` to the saved position."""
  reference = restore_metadata(manager, step).get("frozen_encoder")
  abstract_rest, abstract_frozen = _split_frozen(
    abstract_state, reference["collections"] if reference else ()
  )
  items = {"state": ocp.args.StandardRestore(abstract_rest), "metadata": ocp.args.JsonRestore()}
  if data_iterator is not None:
    if (pathlib.Path(manager.directory) / str(step) / "data_iterator").exists():
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:  # Saved with feature_cache.mode='device', whose data position is the step number.
      logging.warning(
        "checkpoint %d has no input-pipeline position (its run held the features on the devices): "
        "the host loader starts a new shuffle from its first batch",
        step,
      )
  restored = _restore_or_explain(manager, step, ocp.args.Composite(**items))
  state = restored["state"]
  if reference:
    state = _join_frozen(
      state,
      _restore_frozen_encoder(pathlib.Path(manager.directory).parent, reference, abstract_frozen),
    )
  return state, restored["metadata"]


def restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
  return _restore_or_explain(manager, step, ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
    "metadata"
  ]


def _restore_or_explain(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite):
  """manager.restore, or a CheckpointError that says whether the step is broken or does not fit.

  Broken: the error names the intact steps. Intact but not fitting what was asked of it: another
  model's config.

  Nothing is logged here: the CheckpointError chains the restore's error, so run.py's one line
  is all stderr gets and errors.log holds both tracebacks.
  """
  try:
    return manager.restore(step, args=args)
  except Exception as error:  # pylint: disable=broad-except  # orbax/tensorstore raise many types.
    broken = check_step(manager, step)
    directory = pathlib.Path(manager.directory) / str(step)
    if broken is None:
      raise CheckpointError(
        f"checkpoint {directory} does not fit this run's model or config: {_one_line(error)}"
      ) from error
    intact = [
      s for s in sorted(manager.all_steps()) if s != step and check_step(manager, s) is None
    ]
    raise CheckpointError(
      f"checkpoint step {step} ({directory}) is corrupt: {broken}; steps that restore: "
      f"{intact or 'none'}"
    ) from error


def _one_line(error: BaseException, limit: int = 200) -> str:
  """The error's text on one line, without TensorStore's spec dump, cut at `limit` characters."""
  text = (
    " ".join(str(error).split(" See full TensorStore details")[0].split()) or type(error).__name__
  )
  return text if len(text) <= limit else text[:limit] + "..."


def check_step(manager: ocp.CheckpointManager, step: int) -> str | None:
  """None when `step` restores, else why not, in one line.

  Restoring means every state array read and the metadata parsed.

  The state is restored as saved (no target), so the check needs no model; it reads the whole
  checkpoint once.
  """
  directory = pathlib.Path(manager.directory) / str(step)
  for item in ("state", "metadata"):
    if not (directory / item).is_dir():
      return f"its {item}/ folder is missing"
  try:
    manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()),
    )
  except Exception as error:  # pylint: disable=broad-except
    return f"{type(error).__name__}: {_one_line(error)}"
  return None


def set_aside_unrestorable(
  manager: ocp.CheckpointManager, workdir: str | pathlib.Path
) -> int | None:
  """Before a run resumes: the newest step that restores; the newer ones that do not set aside.

  Each broken step is renamed into <workdir>/checkpoints_set_aside/ (never deleted), with one
  warning line naming it and the step the run resumes from. Returns None when no step restores
  (the run starts afresh). Several processes share the checkpoints: there the run stops instead
  (CheckpointError), since one process cannot move them under the others.
  """
  set_aside = []
  for step in sorted(manager.all_steps(), reverse=True):
    reason = check_step(manager, step)
    if reason is None:
      break
    if jax.process_count() > 1:
      raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} is corrupt: {reason}; move it out of "
        "the folder to resume from an earlier step"
      )
    target = (
      pathlib.Path(workdir)
      / SET_ASIDE_DIR
      / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(pathlib.Path(manager.directory) / str(step), target)
    set_aside.append((step, reason, target))
  else:
    step = None
  if set_aside:
    manager.reload()
  for broken, reason, target in set_aside:
    resume = (
      f"resuming from step {step}"
      if step is not None
      else "no earlier step restores: starting afresh"
    )
    logging.warning(
      "checkpoint step %d does not restore (%s); set aside as %s, %s",
      broken,
      reason,
      target,
      resume,
    )
  return step


# ----------------------------------------------------------------------------
# The frozen encoder, written once per run.

FROZEN_ENCODER_DIR = "frozen_encoder"


def frozen_collections(encoder_config) -> tuple[str, ...]:
  """The variable collections whose "encoder" entry a run never changes.

  A frozen encoder's params, and its BatchNorm statistics too when those are frozen ("update" keeps
  refreshing them).
  """
  if encoder_config.trainable:
    return ()
  return ("params", "batch_stats") if encoder_config.batchnorm == "frozen" else ("params",)


def _split_frozen(state: Any, collections) -> tuple[Any, dict]:
  """(the state without the encoder entry of `collections`, {collection: that entry})."""
  if not collections:  # Nothing frozen: any pytree, as saved.
    return state, {}
  frozen = {name: getattr(state, name)["encoder"] for name in collections}
  rest = state.replace(
    **{
      name: {key: value for key, value in getattr(state, name).items() if key != "encoder"}
      for name in collections
    }
  )
  return rest, frozen


def _join_frozen(rest: Any, frozen: dict) -> Any:
  return rest.replace(
    **{name: {**getattr(rest, name), "encoder": tree} for name, tree in frozen.items()}
  )


def _frozen_digest(frozen: dict) -> str:
  """sha256 over the frozen arrays' paths, dtypes, shapes and bytes: the folder's name."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(frozen)[0], key=lambda item: str(item[0])
  ):
    array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def save_frozen_encoder(workdir: str | pathlib.Path, state: Any, encoder_config) -> dict | None:
  """Writes the run's frozen encoder parts once; returns the reference each checkpoint names.

  Nothing is written when that folder exists already. The reference is what `save` puts in each
  checkpoint's metadata; None when nothing is frozen.

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
    logging.info(
      "Wrote the frozen encoder (%s) to %s; checkpoints refer to it", "+".join(collections), path
    )
  return {"sha256": digest, "collections": list(collections)}


def _restore_frozen_encoder(workdir: pathlib.Path, reference: dict, abstract_frozen: dict) -> dict:
  path = workdir.absolute() / FROZEN_ENCODER_DIR / reference["sha256"]
  if not path.exists():
    raise FileNotFoundError(
      f"{path} is missing: the checkpoints of {workdir} keep their frozen encoder there"
    )
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_frozen)
