"""The pure step code: Task, TrainState, the loss, the train and eval steps, their data-parallel
wrappers, state creation and checkpoint restore.

The per-device steps are written with named-axis collectives over the `batch`
axis (pmap semantics) and compiled with `jax.jit(jax.shard_map(...))` over a
one-axis mesh of every device of every process, so the same code runs on one
CPU, N fake CPU devices, a GPU node, a TPU slice and several hosts. The loop that
drives them is train.py's; predict and export use the steps and `restore_checkpoint`.

Traced once per process: the jitted steps are built once per (mesh, task), Tasks compare by
value, and the model (models.create_model) and the optimizer are the same objects for equal
configs, so a second run, restore or evaluation of an equal config in one process (evaluating a
checkpoint after training, predict, the test suite) reuses the traced and compiled steps.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from privattnet_jax import attributes
from privattnet_jax import checkpoints
from privattnet_jax import input_pipeline
from privattnet_jax import models
from privattnet_jax import weights

AXIS = "batch"
MODEL_INPUTS = ("image", "features")  # A batch carries one: images, or cached encoder features.
DEVICE_KEYS = (*MODEL_INPUTS, "score", "labels", "mask")  # What the jitted steps read from a batch.
ATTRIBUTE_MODELS = ("privattnet_mlc", "ap_pr")


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # Dropout key; each step folds in its step number and device index.


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """What turns model outputs into a loss and into privacy scores; constant for a run."""

  kind: str  # "regression" (a score head) or "attributes" (a multi-label head).
  target_mean: np.ndarray  # (P,), the training split's mean raw score, per column.
  preferences: np.ndarray  # (68, P)
  pooling: str
  attention_gamma: float
  attention_tau: float
  # (68, 1) profile-mean table of the paper's table row, with `score.per_profile` (else None).
  table_preferences: np.ndarray | None = None
  attribute_rule: str = "expected"  # Probabilities -> score (attributes.pooled_soft_score).

  def _key(self) -> tuple:
    """The fields by value (numpy arrays as shape and bytes): equal tasks share their steps."""
    return tuple(
      (value.shape, value.tobytes()) if isinstance(value, np.ndarray) else value
      for value in (getattr(self, field.name) for field in dataclasses.fields(self))
    )

  def __eq__(self, other):
    return isinstance(other, Task) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


def make_task(config: ml_collections.ConfigDict, target_mean, preferences) -> Task:
  """The run's Task: built once (by the run, or from a checkpoint's metadata) and passed to the
  loaders, the steps, evaluation and predict; `preferences` (68, P) is the score's table."""
  kind = "attributes" if config.model.name in ATTRIBUTE_MODELS else "regression"
  # Checkpoints from before the field scored with the product rule: they keep their scores.
  attribute_rule = config.score.get("attribute_rule", "product")
  if attribute_rule not in attributes.ATTRIBUTE_RULES:
    raise ValueError(
      f"score.attribute_rule must be one of {attributes.ATTRIBUTE_RULES}, got {attribute_rule!r}"
    )
  return Task(
    kind=kind,
    target_mean=np.asarray(target_mean, np.float32).reshape(-1),
    preferences=np.asarray(preferences, np.float32),
    pooling=config.score.pooling,
    attention_gamma=config.optim.attention_gamma,
    attention_tau=config.optim.attention_tau_per_step * config.model.attention.steps,
    table_preferences=attributes.preference_table(
      "profiles_mean", missing_value=config.score.missing_value
    )
    if config.score.per_profile
    else None,
    attribute_rule=attribute_rule,
  )


def attribute_scores(probabilities, preferences, pooling: str, rule: str = "expected"):
  """Scores (..., P) pooled from attribute probabilities (..., K) and a (68, P) preference table.

  K = 68 (AP-PR) or 67 (PrivAttNet_MLC, no `a0_safe` column): the table's last K rows are used.
  numpy or jax arrays, as `attributes.pooled_soft_score`.
  """
  offset = attributes.NUM_ATTRIBUTES - probabilities.shape[-1]
  return attributes.pooled_soft_score(probabilities, preferences[offset:], pooling, rule)


def predicted_scores(outputs: dict, task: Task) -> jax.Array:
  """Raw privacy scores (B, P) from the model outputs (undoing the per-column target normalisation)."""
  if task.kind == "regression":
    return outputs["score"].astype(jnp.float32) / 2 + task.target_mean
  probabilities = jax.nn.sigmoid(outputs["attribute_logits"].astype(jnp.float32))
  return attribute_scores(
    probabilities, jnp.asarray(task.preferences), task.pooling, task.attribute_rule
  )


def table_scores(
  predictions: np.ndarray, probabilities: np.ndarray | None, labels: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
  """The paper-table row of a per-profile run: (N,) scalar predictions and targets.

  The target is the other rows' ground truth: the preferences averaged over the 30 profiles,
  then pooled over the image's attributes (`task.table_preferences`). Attribute models pool
  their probabilities with that same table (exactly what the checkpoint gives with
  per_profile=False). Regression models (PR-CNN) average their 30 profile predictions; under
  max pooling that estimates mean_p max_a, which is >= the target max_a mean_p, so even exact
  profile scores miss it (equal under sum and mean pooling, which are linear in the preferences).
  """
  target = attributes.privacy_score(labels > 0, task.table_preferences, task.pooling)[:, 0]
  if task.kind == "regression":
    return predictions.mean(axis=1), target
  scores = attribute_scores(
    probabilities, task.table_preferences, task.pooling, task.attribute_rule
  )
  return scores[:, 0], target


def compute_loss(outputs: dict, batch: dict, task: Task) -> tuple[jax.Array, dict]:
  """The paper's loss: MSE on (y - mean) * 2 (or BCE for attribute heads) + the attention penalty."""
  mask = batch["mask"]
  count = jnp.maximum(mask.sum(), 1.0)
  if task.kind == "regression":
    target = (batch["score"] - task.target_mean) * 2
    per_example = jnp.square(outputs["score"].astype(jnp.float32) - target).mean(-1)
  else:
    logits = outputs["attribute_logits"].astype(jnp.float32)
    labels = batch["labels"][:, attributes.NUM_ATTRIBUTES - logits.shape[-1] :]
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
  data_loss = (per_example * mask).sum() / count
  penalty = jnp.zeros(())
  if "attention" in outputs:
    # gamma * sum_i (tau - sum_t alpha_ti)^2, averaged over the batch: AMNet's doubly stochastic term.
    attention_total = outputs["attention"].astype(jnp.float32).sum(axis=1)
    penalty = (
      task.attention_gamma
      * (jnp.square(task.attention_tau - attention_total).sum(-1) * mask).sum()
      / count
    )
  loss = data_loss + penalty
  return loss, {"loss": loss, "data_loss": data_loss, "attention_penalty": penalty}


def apply_model(state: TrainState, params, batch: dict, **kwargs):
  """Images through encoder and head, or cached encoder features (feature_cache) through the head."""
  variables = {"params": params, "batch_stats": state.batch_stats}
  if "features" in batch:
    return state.apply_fn(variables, batch["features"], method="head_from_features", **kwargs)
  return state.apply_fn(variables, batch["image"], **kwargs)


def train_step(state: TrainState, batch: dict, task: Task) -> tuple[TrainState, dict]:
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
    loss, aux = compute_loss(outputs, batch, task)
    return jax.lax.pmean(loss, AXIS), (aux, new_model_state)

  grads, (aux, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  batch_stats = jax.lax.pmean(new_model_state.get("batch_stats", state.batch_stats), AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  aux["grad_norm"] = optax.tree.norm(grads)
  return new_state, jax.lax.pmean(aux, AXIS)


def inference_outputs(outputs: dict, task: Task) -> dict:
  """Model outputs -> what users see: raw `score` (B, P), raw `step_scores` (B, T, P), `attention`
  (B, T, L), `attribute_probabilities` (B, K); each where the model has it. Evaluation, predict
  and the exported predictor all go through here, so they agree."""
  result = {"score": predicted_scores(outputs, task)}
  if "step_scores" in outputs:
    result["step_scores"] = outputs["step_scores"].astype(jnp.float32) / 2 + task.target_mean
  if "attention" in outputs:
    result["attention"] = outputs["attention"].astype(jnp.float32)
  if "attribute_logits" in outputs:
    result["attribute_probabilities"] = jax.nn.sigmoid(
      outputs["attribute_logits"].astype(jnp.float32)
    )
  return result


def eval_step(state: TrainState, batch: dict, task: Task) -> dict:
  """Per-example predictions of one device's share; targets echo back so all stay aligned."""
  outputs = apply_model(state, state.params, batch, train=False)
  result = inference_outputs(outputs, task)
  result["prediction"] = result.pop("score")
  result.update(target=batch["score"], labels=batch["labels"], mask=batch["mask"])
  return result


def create_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (AXIS,))


@functools.lru_cache(maxsize=16)
def task_train_step(task: Task):
  """`train_step` bound to `task`, one object per distinct task (the steps built on it are reused)."""
  return functools.partial(train_step, task=task)


@functools.lru_cache(maxsize=16)
def parallel_train_step(mesh, task: Task):
  step = jax.shard_map(
    task_train_step(task),
    mesh=mesh,
    in_specs=(P(), P(AXIS)),
    out_specs=(P(), P()),
  )
  return jax.jit(step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def parallel_eval_step(mesh, task: Task):
  step = jax.shard_map(
    functools.partial(eval_step, task=task), mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)
  )
  return jax.jit(step)


@functools.lru_cache(maxsize=16)
def parallel_encode_step(mesh, dtype):
  """The encoder alone (inference BatchNorm), data-parallel: images -> features in `dtype`."""

  def encode(state: TrainState, images):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return state.apply_fn(variables, images, train=False, method="encode").astype(dtype)

  return jax.jit(jax.shard_map(encode, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def shard_batch(batch: dict, mesh) -> dict:
  """This process's batch -> global arrays split over the mesh's batch axis (a global jax.Array,
  as `device_features` batches carry, is used as it is)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {
    k: batch[k]
    if isinstance(batch[k], jax.Array)
    else jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
    for k in DEVICE_KEYS
    if k in batch
  }


def create_optimizer(
  config: ml_collections.ConfigDict, params, total_steps: int
) -> optax.GradientTransformation:
  """Adam with coupled L2 (added to the gradient before Adam, as torch's Adam weight_decay).

  A frozen encoder's parameters are mapped to `set_to_zero`: no update, no optimiser state.
  Equal arguments give the same object (a TrainState's treedef holds it: see the module docstring).
  """
  optim = ml_collections.FrozenConfigDict(config.optim)
  schedule_steps = 0 if optim.schedule == "constant" else total_steps  # Only schedules use it.
  return _optimizer(optim, config.model.encoder.trainable, tuple(params), schedule_steps)


@functools.lru_cache(maxsize=16)
def _optimizer(optim, trainable: bool, param_names: tuple[str, ...], total_steps: int):
  if optim.schedule == "constant":
    learning_rate = optim.learning_rate
  elif optim.schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(optim.learning_rate, max(total_steps, 1))
  elif optim.schedule == "warmup_cosine":
    learning_rate = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1)
    )
  else:
    raise ValueError(
      f"optim.schedule must be constant, cosine or warmup_cosine, got {optim.schedule!r}"
    )
  tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(learning_rate))
  if trainable:
    return tx
  labels = {name: "frozen" if name == "encoder" else "trained" for name in param_names}
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _init(model, rngs, inputs, method: str):
  """`model.init` through `method` ("__call__": the whole model on images)."""
  return model.init(rngs, inputs, train=False, method=method)


# One traced (and cached) program instead of an eager op per parameter and optimizer partition,
# as TrainState.create would run: 0.8 s of a run's start-up with Lite0.
@functools.partial(jax.jit, static_argnums=0)
def _init_optimizer(tx, params):
  return tx.init(params)


def initial_variables(model, rngs: dict, image_shape, pretrained: str) -> dict:
  """The model's initial variables, the encoder's read from the weight file `pretrained` if set.

  The file replaces every encoder value, so then the encoder is traced for its shapes only
  (`jax.eval_shape`: not lowered, compiled or run; the whole init took 3.7 s of the Lite0 demo's
  start-up to trace, lower and load) and the head is initialised alone. Its values are those of
  the whole model's init: Flax derives each submodule's keys from its path, not from what ran
  before it.
  """
  images = jnp.zeros((1, *image_shape), jnp.float32)
  if not pretrained:
    return flax.core.unfreeze(_init(model, rngs, images, "__call__"))
  features, encoder = jax.eval_shape(
    functools.partial(model.init_with_output, train=False, method="encode"), rngs, images
  )
  features = jnp.zeros(features.shape, features.dtype)
  head = flax.core.unfreeze(_init(model, rngs, features, "head_from_features"))
  variables = {
    collection: {**head.get(collection, {}), **encoder.get(collection, {})}
    for collection in {**head, **encoder}
  }
  return weights.load_pretrained(pretrained, variables)


def create_train_state(
  config, model, task, image_shape, total_steps, rng, attribute_bias=None
) -> TrainState:
  """The initial state; `attribute_bias` (68,): an attribute model's output bias at the start."""
  init_rng, params_rng, dropout_rng = jax.random.split(rng, 3)
  variables = initial_variables(
    model,
    {"params": params_rng, "dropout": init_rng},
    image_shape,
    config.model.encoder.pretrained,
  )
  params = variables["params"]
  if attribute_bias is not None:
    params = models.with_attribute_bias(params, config.model.name, attribute_bias)
  tx = create_optimizer(config, params, total_steps)
  return TrainState(
    # Not weakly typed, as a restored step is: new and resumed runs share one traced step.
    step=np.int32(0),
    apply_fn=model.apply,
    params=params,
    tx=tx,
    opt_state=_init_optimizer(tx, params),
    batch_stats=variables.get("batch_stats", {}),
    rng=dropout_rng,
  )


def abstract_train_state(config: ml_collections.ConfigDict, model, task: Task, mesh) -> TrainState:
  """The shapes (replicated over `mesh`) of the TrainState a checkpoint of `config` holds.

  Traced, never run: no initialisation is computed and no pretrained weight file is read, so a
  checkpoint restores where neither the training data nor the encoder's weight file exist.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.encoder.pretrained = ""  # The restored values replace any initial weights.
  image_shape = (config.image_size, config.image_size, 3)
  shapes = jax.eval_shape(
    lambda rng: create_train_state(config, model, task, image_shape, 1, rng), jax.random.PRNGKey(0)
  )
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
  )


@dataclasses.dataclass
class RestoredRun:
  """A checkpoint ready for inference: its config, task, model and state, on a mesh of every device."""

  config: ml_collections.ConfigDict
  task: Task
  model: Any
  state: TrainState
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
  """Restores a checkpoint from itself alone: its metadata gives the config, the target mean and
  the preference table, so no dataset is built or read (predict, export)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first")
  manager = checkpoints.create_manager(workdir, keep=1, read_only=True)
  step = select_step(manager, workdir, step)
  metadata = checkpoints.restore_metadata(manager, step)
  config = ml_collections.ConfigDict(metadata["config"])
  preferences = metadata.get("preferences")
  if (
    preferences is None
  ):  # A checkpoint older than the stored table: its config's score definition.
    preferences = input_pipeline.preferences_from_config(config)
  task = make_task(config, metadata["target_mean"], preferences)
  model = models.create_model(
    config, num_outputs=task.preferences.shape[1], batchnorm_axis_name=AXIS
  )
  mesh = create_mesh()
  state, _ = checkpoints.restore(manager, step, abstract_train_state(config, model, task, mesh))
  return RestoredRun(config, task, model, state, step, mesh)
