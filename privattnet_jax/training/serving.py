"""Serving a checkpoint: a Predictor running the eval step on every device, or a jax.export."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from privattnet_jax.data import attributes
from privattnet_jax.inference import output_folders, predict
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.models import scoring
from privattnet_jax.training import restore, train_steps


def _inference_function(run) -> Callable:
  """images -> scoring.inference_outputs, with the checkpoint's variables as constants (export)."""
  variables = jax.device_get({"params": run.state.params, "batch_stats": run.state.batch_stats})
  model, task = run.model.clone(), run.task

  def infer(images):
    return scoring.inference_outputs(model.apply(variables, images, train=False), task)

  return infer


def _restore(workdir, step, config):
  run = restore.restore_checkpoint(workdir, step)
  if config is not None:
    predictor_lib.check_config(config, predictor_lib.normalised(run.config.to_dict()))
  return run


def load_checkpoint_predictor(
  workdir, step: int | None = None, config=None, batch_size: int = predictor_lib.DEFAULT_BATCH_SIZE
) -> predictor_lib.Predictor:
  """The best (or a named) checkpoint of `workdir` as a Predictor.

  It runs the eval step (`train_steps.eval_step`) on every device; `batch_size` is rounded up to a
  multiple of the device count.
  """
  if jax.process_count() > 1:
    raise predictor_lib.PredictError("predict runs in a single process")
  run = _restore(workdir, step, config)
  info = predictor_lib.predictor_info(
    predictor_lib.normalised(run.config.to_dict()),
    run.task,
    run.step,
    predictor_lib.output_shapes(_inference_function(run), run.config.input.image_size),
  )
  devices = jax.device_count()
  batch_size = -(-max(int(batch_size), 1) // devices) * devices
  infer = photo_inference(
    train_steps.parallel_eval_step(run.mesh, run.task), run.state, run.mesh, info["num_scores"]
  )
  return predictor_lib.Predictor(info, batch_size, infer)


def photo_inference(eval_fn, state, mesh, num_scores: int) -> Callable:
  """(images, mask) -> the eval step's outputs for photos, which have no targets (zeros fill them).

  Returns numpy `score` (B, P) raw, and `step_scores`, `attention`, `attribute_probabilities`
  where the model has them: what predict, redact and the redaction quality read.
  """

  def infer(images, mask):
    batch = {
      "image": images,
      "mask": mask,
      "score": np.zeros((len(images), num_scores), np.float32),
      "labels": np.zeros((len(images), attributes.NUM_ATTRIBUTES), np.float32),
    }
    outputs = jax.device_get(eval_fn(state, train_steps.shard_batch(batch, mesh)))
    outputs["score"] = outputs.pop("prediction")
    for key in ("target", "labels", "mask"):  # Echoed inputs, not predictions.
      outputs.pop(key)
    return outputs

  return infer


def export_predictor(
  workdir,
  out_dir=None,
  step: int | None = None,
  config=None,
  platforms: Sequence[str] = predictor_lib.DEFAULT_PLATFORMS,
) -> pathlib.Path:
  """Writes the checkpoint's inference function as a jax.export artifact plus its JSON.

  Input: float32 (batch, S, S, 3), preprocessed as the JSON says, the batch dimension symbolic.
  Outputs: scoring.inference_outputs (score, step_scores, attention, attribute_probabilities, each
  where the model has it). Lowered for every platform in `platforms` (CPU and CUDA by default;
  lowering needs no such device). Returns the folder (default `workdir/export`).
  """
  unknown = sorted(set(platforms) - set(predictor_lib.PLATFORMS))
  if unknown or not platforms:
    raise predictor_lib.PredictError(
      f"export platforms must be some of {predictor_lib.PLATFORMS}, got {list(platforms)}"
    )
  out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / "export"
  predict.check_output_dir(out_dir)
  output_folders.check(out_dir, reads=output_folders.workdir_reads(workdir))
  run = _restore(workdir, step, config)
  infer = _inference_function(run)
  size = run.config.input.image_size
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(infer), platforms=tuple(platforms))(
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  )
  info = predictor_lib.predictor_info(
    predictor_lib.normalised(run.config.to_dict()),
    run.task,
    run.step,
    predictor_lib.output_shapes(infer, size),
  )
  info["platforms"] = list(exported.platforms)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / predictor_lib.EXPORT_FUNCTION_FILE).write_bytes(exported.serialize())
  (out_dir / predictor_lib.EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
  logging.info(
    "Exported %s (checkpoint step %d) for %s to %s",
    info["model"],
    run.step,
    info["platforms"],
    out_dir,
  )
  return out_dir
