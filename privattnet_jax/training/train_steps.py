"""The pure steps: the loss, the train, eval and encode steps and their data-parallel wrappers.

The per-device steps are written with named-axis collectives over the `batch`
axis (pmap semantics) and compiled with `jax.jit(jax.shard_map(...))` over a
one-axis mesh of every device of every process, so the same code runs on one
CPU, N fake CPU devices, a GPU node, a TPU slice and several hosts. The loop that
drives them is train.py's.

Traced once per process: the jitted steps are built once per (mesh, task), Tasks compare by
value, and the model (models.create_model) and the optimizer are the same objects for equal
configs, so a second run, restore or evaluation of an equal config in one process (evaluating a
checkpoint after training, predict, the test suite) reuses the traced and compiled steps.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from privattnet_jax.models import scoring
from privattnet_jax.training import loss as loss_lib
from privattnet_jax.training import train_state

AXIS = "batch"
MODEL_INPUTS = ("image", "features")  # A batch carries one: images, or cached encoder features.
DEVICE_KEYS = (*MODEL_INPUTS, "score", "labels", "mask")  # What the jitted steps read from a batch.


def apply_model(state: train_state.TrainState, params, batch: dict, **kwargs):
  """Images through encoder and head, or cached encoder features (feature_cache) through the head."""
  variables = {"params": params, "batch_stats": state.batch_stats}
  if "features" in batch:
    return state.apply_fn(variables, batch["features"], method="head_from_features", **kwargs)
  return state.apply_fn(variables, batch["image"], **kwargs)


def train_step(
  state: train_state.TrainState, batch: dict, task: scoring.Task
) -> tuple[train_state.TrainState, dict]:
  """One optimisation step on one device's share of the global batch (inside shard_map).

  The loss is `pmean`ed over the batch axis before differentiation: under shard_map the
  gradient of that replicated loss with respect to the replicated parameters is already the
  global-batch gradient. (Differentiating the per-device loss and then `pmean`ing the gradients,
  the `jax.pmap` idiom, gives N times the gradient here: the transpose of the implicit broadcast
  of replicated parameters sums over devices.)
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))

  def loss_fn(params):
    outputs, new_model_state = apply_model(
      state, params, batch, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
    )
    loss, aux = loss_lib.compute_loss(outputs, batch, task)
    return jax.lax.pmean(loss, AXIS), (aux, new_model_state)

  grads, (aux, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  batch_stats = jax.lax.pmean(new_model_state.get("batch_stats", state.batch_stats), AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  aux["grad_norm"] = optax.tree.norm(grads)
  return new_state, jax.lax.pmean(aux, AXIS)


def eval_step(state: train_state.TrainState, batch: dict, task: scoring.Task) -> dict:
  """Per-example predictions of one device's share; targets echo back so all stay aligned."""
  outputs = apply_model(state, state.params, batch, train=False)
  result = scoring.inference_outputs(outputs, task)
  result["prediction"] = result.pop("score")
  result.update(target=batch["score"], labels=batch["labels"], mask=batch["mask"])
  return result


def create_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (AXIS,))


@functools.lru_cache(maxsize=16)
def task_train_step(task: scoring.Task):
  """`train_step` bound to `task`, one object per distinct task (the steps built on it are reused)."""
  return functools.partial(train_step, task=task)


@functools.lru_cache(maxsize=16)
def parallel_train_step(mesh, task: scoring.Task):
  step = jax.shard_map(
    task_train_step(task),
    mesh=mesh,
    in_specs=(P(), P(AXIS)),
    out_specs=(P(), P()),
  )
  return jax.jit(step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def parallel_eval_step(mesh, task: scoring.Task):
  step = jax.shard_map(
    functools.partial(eval_step, task=task), mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)
  )
  return jax.jit(step)


@functools.lru_cache(maxsize=16)
def parallel_encode_step(mesh, dtype):
  """The encoder alone (inference BatchNorm), data-parallel: images -> features in `dtype`."""

  def encode(state: train_state.TrainState, images):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return state.apply_fn(variables, images, train=False, method="encode").astype(dtype)

  return jax.jit(jax.shard_map(encode, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def shard_batch(batch: dict, mesh) -> dict:
  """This process's batch -> global arrays split over the mesh's batch axis.

  A global jax.Array, as `device_features` batches carry, is used as it is.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  return {
    k: batch[k]
    if isinstance(batch[k], jax.Array)
    else jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
    for k in DEVICE_KEYS
    if k in batch
  }
