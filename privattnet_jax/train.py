"""Training and evaluation: TrainState, the pure per-device steps, the data-parallel wrapper, the loop.

The per-device steps are written with named-axis collectives over the `batch`
axis (pmap semantics) and compiled with `jax.jit(jax.shard_map(...))` over a
one-axis mesh of every device of every process, so the same code runs on one
CPU, N fake CPU devices, a GPU node, a TPU slice and several hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from privattnet_jax import attributes
from privattnet_jax import checkpoints
from privattnet_jax import device_features
from privattnet_jax import evaluation_report
from privattnet_jax import feature_cache
from privattnet_jax import input_pipeline
from privattnet_jax import metrics as metrics_lib
from privattnet_jax import models
from privattnet_jax import weights
from privattnet_jax import workdir_lock
from privattnet_jax import data as data_lib

AXIS = "batch"
MODEL_INPUTS = ("image", "features")  # A batch carries one: images, or cached encoder features.
DEVICE_KEYS = (*MODEL_INPUTS, "score", "labels", "mask")  # What the jitted steps read from a batch.
ATTRIBUTE_MODELS = ("privattnet_mlc", "ap_pr")
MAX_STEPS_AHEAD = 8  # Steps the host may dispatch before the devices finish them (bounds queued batches).


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # Dropout key; each step folds in its step number and device index.


@dataclasses.dataclass(frozen=True)
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

  def __hash__(self):  # By identity: the generated hash would fail on the numpy fields.
    return id(self)


def make_task(config: ml_collections.ConfigDict, target_mean, preferences=None) -> Task:
  """The run's Task; `preferences` (68, P) from a checkpoint's metadata, else from `config.score`."""
  kind = "attributes" if config.model.name in ATTRIBUTE_MODELS else "regression"
  if preferences is None:
    preferences = input_pipeline.preferences_from_config(config)
  return Task(
      kind=kind,
      target_mean=np.asarray(target_mean, np.float32).reshape(-1),
      preferences=np.asarray(preferences, np.float32),
      pooling=config.score.pooling,
      attention_gamma=config.optim.attention_gamma,
      attention_tau=config.optim.attention_tau_per_step * config.model.attention.steps,
      table_preferences=attributes.preference_table(
          "profiles_mean", missing_value=config.score.missing_value) if config.score.per_profile else None,
  )


def attribute_scores(probabilities, preferences, pooling: str):
  """Scores (..., P) pooled from attribute probabilities (..., K) and a (68, P) preference table.

  K = 68 (AP-PR) or 67 (PrivAttNet_MLC, no `a0_safe` column): the table's last K rows are used.
  numpy or jax arrays, as `attributes.pooled_soft_score`.
  """
  offset = attributes.NUM_ATTRIBUTES - probabilities.shape[-1]
  return attributes.pooled_soft_score(probabilities, preferences[offset:], pooling)


def predicted_scores(outputs: dict, task: Task) -> jax.Array:
  """Raw privacy scores (B, P) from the model outputs (undoing the per-column target normalisation)."""
  if task.kind == "regression":
    return outputs["score"].astype(jnp.float32) / 2 + task.target_mean
  probabilities = jax.nn.sigmoid(outputs["attribute_logits"].astype(jnp.float32))
  return attribute_scores(probabilities, jnp.asarray(task.preferences), task.pooling)


def table_scores(predictions: np.ndarray, probabilities: np.ndarray | None, labels: np.ndarray,
                 task: Task) -> tuple[np.ndarray, np.ndarray]:
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
  return attribute_scores(probabilities, task.table_preferences, task.pooling)[:, 0], target


def compute_loss(outputs: dict, batch: dict, task: Task) -> tuple[jax.Array, dict]:
  """The paper's loss: MSE on (y - mean) * 2 (or BCE for attribute heads) + the attention penalty."""
  mask = batch["mask"]
  count = jnp.maximum(mask.sum(), 1.0)
  if task.kind == "regression":
    target = (batch["score"] - task.target_mean) * 2
    per_example = jnp.square(outputs["score"].astype(jnp.float32) - target).mean(-1)
  else:
    logits = outputs["attribute_logits"].astype(jnp.float32)
    labels = batch["labels"][:, attributes.NUM_ATTRIBUTES - logits.shape[-1]:]
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
  data_loss = (per_example * mask).sum() / count
  penalty = jnp.zeros(())
  if "attention" in outputs:
    # gamma * sum_i (tau - sum_t alpha_ti)^2, averaged over the batch: AMNet's doubly stochastic term.
    attention_total = outputs["attention"].astype(jnp.float32).sum(axis=1)
    penalty = task.attention_gamma * (jnp.square(task.attention_tau - attention_total).sum(-1) * mask).sum() / count
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
    outputs, new_model_state = apply_model(state, params, batch, train=True, rngs={"dropout": rng},
                                           mutable=["batch_stats"])
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
    result["attribute_probabilities"] = jax.nn.sigmoid(outputs["attribute_logits"].astype(jnp.float32))
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


def parallel_train_step(mesh, task: Task):
  step = jax.shard_map(functools.partial(train_step, task=task), mesh=mesh,
                       in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=(0,))


def parallel_eval_step(mesh, task: Task):
  step = jax.shard_map(functools.partial(eval_step, task=task), mesh=mesh,
                       in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  return jax.jit(step)


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
  return {k: batch[k] if isinstance(batch[k], jax.Array) else
          jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in DEVICE_KEYS if k in batch}


def _to_host(tree):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def create_optimizer(config: ml_collections.ConfigDict, params, total_steps: int) -> optax.GradientTransformation:
  """Adam with coupled L2 (added to the gradient before Adam, as torch's Adam weight_decay).

  A frozen encoder's parameters are mapped to `set_to_zero`: no update, no optimiser state.
  """
  optim = config.optim
  if optim.schedule == "constant":
    learning_rate = optim.learning_rate
  elif optim.schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(optim.learning_rate, max(total_steps, 1))
  elif optim.schedule == "warmup_cosine":
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1))
  else:
    raise ValueError(f"optim.schedule must be constant, cosine or warmup_cosine, got {optim.schedule!r}")
  tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(learning_rate))
  if config.model.encoder.trainable:
    return tx
  labels = {name: "frozen" if name == "encoder" else "trained" for name in params}
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def create_train_state(config, model, task, image_shape, total_steps, rng) -> TrainState:
  init_rng, params_rng, dropout_rng = jax.random.split(rng, 3)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": params_rng, "dropout": init_rng}, jnp.zeros((1, *image_shape), jnp.float32))
  variables = flax.core.unfreeze(variables)
  if config.model.encoder.pretrained:
    from privattnet_jax import weights  # pylint: disable=g-import-not-at-top

    encoder = weights.load_pretrained_encoder(
        config.model.encoder.pretrained,
        {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]})
    variables["params"]["encoder"] = encoder["params"]
    variables["batch_stats"]["encoder"] = encoder["batch_stats"]
  params = variables["params"]
  return TrainState.create(
      apply_fn=model.apply, params=params, batch_stats=variables.get("batch_stats", {}),
      tx=create_optimizer(config, params, total_steps), rng=dropout_rng)


def abstract_train_state(config: ml_collections.ConfigDict, model, task: Task, mesh) -> TrainState:
  """The shapes (replicated over `mesh`) of the TrainState a checkpoint of `config` holds.

  Traced, never run: no initialisation is computed and no pretrained weight file is read, so a
  checkpoint restores where neither the training data nor the encoder's weight file exist.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.encoder.pretrained = ""  # The restored values replace any initial weights.
  image_shape = (config.image_size, config.image_size, 3)
  shapes = jax.eval_shape(lambda rng: create_train_state(config, model, task, image_shape, 1, rng),
                          jax.random.PRNGKey(0))
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, with the field's name, on values that would otherwise fail deep inside a step."""
  devices, processes = jax.device_count(), jax.process_count()
  if config.batch_size <= 0 or config.batch_size % devices:
    raise ValueError(f"batch_size={config.batch_size} must be a positive multiple of the device count ({devices})")
  if config.batch_size % processes:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the process count ({processes})")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set num_train_steps > 0 or num_epochs > 0")
  if config.image_size < 32:
    raise ValueError(f"image_size={config.image_size} is too small for the encoder (minimum 32)")
  if config.model.name not in models.MODEL_NAMES:
    raise ValueError(f"model.name must be one of {models.MODEL_NAMES}, got {config.model.name!r}")
  stride = models.encoder_output_stride(
      config.model.encoder, models.encoder_stages(config.model.name, config.model.encoder))
  if config.image_size % stride:
    raise ValueError(f"image_size={config.image_size} must be a multiple of the encoder's output stride "
                     f"{stride} (e.g. {max(stride, config.image_size // stride * stride)})")
  pretrained = config.model.encoder.get("pretrained", "")
  if pretrained:  # A missing weight file fails here, before any dataset work.
    try:
      weights.resolve_path(pretrained)
    except weights.WeightImportError as e:
      raise FileNotFoundError(f"model.encoder.pretrained={pretrained}: {e}") from None
  for name in ("log_every_steps", "keep_checkpoints"):
    if config[name] <= 0:
      raise ValueError(f"{name} must be positive, got {config[name]}")
  if config.feature_cache.enabled:
    feature_cache.validate_config(config)
  elif config.feature_cache.get("on_device", False):
    raise ValueError("feature_cache.on_device=True needs feature_cache.enabled=True (it holds the cache's features)")


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard events (no TensorFlow)."""

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._jsonl = open(workdir / "metrics.jsonl", "a")
      self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

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
  extras: dict  # attention, attribute_probabilities, labels, image_id, boxes, num_boxes (host side).


def evaluate(state: TrainState, eval_fn, batches, mesh, task: Task | None = None) -> EvalResult:
  """Runs every batch once; padded rows (mask 0) are dropped before the metrics.

  Metrics: `metrics.score_metrics` (per profile and averaged for P > 1); for attribute models
  `attribute_map` (macro AP over the attributes with a positive example) and `attribute_ap`
  ({attribute_id: AP}, None without a positive); with a per-profile `task`, `table`: the
  paper-table row (`table_scores`).
  """
  collected: dict[str, list] = {}
  local_single_process = jax.process_count() == 1
  for batch in batches:
    out = _to_host(eval_fn(state, shard_batch(batch, mesh)))
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
    average_precision = metrics_lib.mean_average_precision(probabilities, arrays["labels"][:, offset:] > 0)
    result_metrics["attribute_map"] = average_precision["map"]
    result_metrics["attribute_ap"] = {
        attribute_id: None if np.isnan(ap) else ap
        for attribute_id, ap in zip(attributes.ATTRIBUTE_IDS[offset:], average_precision["per_attribute_ap"])}
  if task is not None and task.table_preferences is not None and "labels" in arrays:
    result_metrics["table"] = metrics_lib.regression_metrics(
        *table_scores(predictions, probabilities, arrays["labels"], task))
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

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, need_train: bool = True):
    validate_config(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.sources = data_lib.load_data_sources(config)
    self.manager = checkpoints.create_manager(self.workdir, config.keep_checkpoints)
    if need_train:  # A resumed run continues from the newest checkpoint that restores.
      checkpoints.set_aside_unrestorable(self.manager, self.workdir)
    self.mesh = create_mesh()
    num_train = len(self.sources["train"])
    self.steps_per_epoch = num_train // config.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={config.batch_size} exceeds the {num_train} training examples")
    self.total_steps = config.num_train_steps if config.num_train_steps > 0 else (
        config.num_epochs * self.steps_per_epoch)
    self.task = make_task(config, self._target_mean(input_pipeline.preferences_from_config(config).shape[1]))
    self.model = models.create_model(config, num_outputs=self.task.preferences.shape[1], batchnorm_axis_name=AXIS)
    image_shape = (config.image_size, config.image_size, 3)
    replicated = NamedSharding(self.mesh, P())
    self.initial_state = jax.device_put(create_train_state(
        config, self.model, self.task, image_shape, self.total_steps, jax.random.PRNGKey(config.seed)), replicated)
    # Kept apart: the train step donates (deletes) the state it is given.
    self.abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self.initial_state)
    self.train_fn = parallel_train_step(self.mesh, self.task) if need_train else None
    self.eval_fn = parallel_eval_step(self.mesh, self.task)
    self.feature_cache = self.prepare_feature_cache() if config.feature_cache.enabled else None
    self.device_train, self.device_eval = None, {}
    if self.feature_cache is not None and config.feature_cache.get("on_device", False):
      self._load_to_devices(need_train)

  def _target_mean(self, num_outputs: int) -> np.ndarray:
    """The training split's mean score per column (the authors hard-coded theirs); reused from a checkpoint.

    Attribute models never use it, so their checkpoints serve any `score.per_profile`.
    """
    latest = self.manager.latest_step()
    if latest is not None:
      mean = np.asarray(checkpoints.restore_metadata(self.manager, latest)["target_mean"], np.float32)
      if mean.shape == (num_outputs,):
        return mean
      if self.config.model.name not in ATTRIBUTE_MODELS:
        raise ValueError(
            f"the checkpoints in {self.workdir} predict {mean.size} score column(s), this config {num_outputs} "
            f"(score.per_profile={self.config.score.per_profile}): use the run's own config or a new workdir")
    return input_pipeline.split_scores(self.sources["train"], self.config).mean(axis=0)

  def metadata(self) -> dict:
    # The preference table rides along: a checkpoint must not depend on a TSV file of the machine it
    # was trained on (score.source='file') to turn attribute probabilities into scores.
    return {"config": self.config.to_dict(), "target_mean": self.task.target_mean.tolist(),
            "preferences": self.task.preferences.tolist()}

  def prepare_feature_cache(self) -> feature_cache.FeatureCache:
    """Builds or checks the cache for the run's frozen encoder: the latest checkpoint's when there
    is one (a resumed run keeps its encoder even if the config's weights changed), else the initial one."""
    latest = self.manager.latest_step()
    state = self.initial_state if latest is None else self.restore(latest)
    encode_step = parallel_encode_step(self.mesh, feature_cache.DTYPES[self.config.feature_cache.dtype])
    return feature_cache.ensure(self.config, self.sources, state,
                                lambda images: encode_step(state, shard_batch({"image": images}, self.mesh)["image"]))

  def _load_to_devices(self, need_train: bool) -> None:
    """feature_cache.on_device: the cached train and validation splits go to device memory."""
    if need_train and self.feature_cache.has_train():
      self.device_train = device_features.load_train(self.feature_cache, self.config, self.mesh, AXIS)
      self.train_fn = device_features.parallel_train_step(
          self.mesh, AXIS, functools.partial(train_step, task=self.task), self.device_train, self.steps_per_epoch,
          self.config)
    if self.feature_cache.has_eval("validation"):
      self.device_eval["validation"] = device_features.load_eval(
          self.feature_cache, "validation", self.config, self.mesh, AXIS)

  def step_function(self, data_iterator):
    """The train step as a function of the state alone: on a batch from `data_iterator` (the host
    loader), or gathered on the devices (`device_train`, where `data_iterator` is None)."""
    if self.device_train is not None:
      return lambda state: self.train_fn(state, self.device_train.arrays)
    return lambda state: self.train_fn(state, shard_batch(next(data_iterator), self.mesh))

  def train_loader(self):
    if self.feature_cache is not None and self.feature_cache.has_train():
      return self.feature_cache.train_loader(self.config)
    return input_pipeline.create_train_loader(self.sources["train"], self.config)

  def eval_batches(self, split: str):
    if split in self.device_eval:
      return self.device_eval[split].batches()
    if self.feature_cache is not None and self.feature_cache.has_eval(split):
      return self.feature_cache.eval_batches(split, self.config)
    return input_pipeline.create_eval_batches(self.sources[split], self.config)

  def restore(self, step: int, data_iterator=None) -> TrainState:
    state, _ = checkpoints.restore(self.manager, step, self.abstract_state, data_iterator)
    return state


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
    raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint at step {step}; available: {sorted(manager.all_steps())}")
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
  task = make_task(config, metadata["target_mean"], metadata.get("preferences"))
  model = models.create_model(config, num_outputs=task.preferences.shape[1], batchnorm_axis_name=AXIS)
  mesh = create_mesh()
  state, _ = checkpoints.restore(manager, step, abstract_train_state(config, model, task, mesh))
  return RestoredRun(config, task, model, state, step, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Trains (resuming from the latest checkpoint), then evaluates the best checkpoint.

  Returns {split: metrics} for `config.eval_splits`, also written to eval_<split>.json.
  """
  if jax.process_index() == 0:  # One run per workdir; released when the training loop ends.
    workdir_lock.acquire(workdir)
  with workdir_lock.released_on_error(workdir):
    experiment = Experiment(config, workdir)
  manager, mesh = experiment.manager, experiment.mesh
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else experiment.steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every

  # Device-resident features need no host iterator: their position is the step number.
  train_iterator = None if experiment.device_train is not None else iter(experiment.train_loader())
  state = experiment.initial_state
  start_step = 0
  latest = manager.latest_step()
  if latest is not None:
    state = experiment.restore(latest, train_iterator)
    start_step = int(state.step)
    logging.info("Resumed from the checkpoint at step %d in %s", start_step, workdir)

  frozen_encoder = checkpoints.save_frozen_encoder(experiment.workdir, state, config.model.encoder)
  run_step = experiment.step_function(train_iterator)
  writer = MetricWriter(experiment.workdir)
  logging.info("Training %s for %d steps (%d per epoch), global batch %d on %d devices",
               config.model.name, experiment.total_steps, experiment.steps_per_epoch, config.batch_size,
               jax.device_count())
  try:
    # (step, loss) of the steps dispatched since the last check. The host runs ahead of the devices
    # by at most MAX_STEPS_AHEAD steps and reads the losses at its sync points (log, checkpoint),
    # so the devices never wait for the host between steps.
    unchecked = []
    window_start, window_steps = time.time(), 0
    run_start, seconds = time.time(), {"validation": 0.0, "checkpoint": 0.0}
    for step in range(start_step + 1, experiment.total_steps + 1):
      state, step_metrics = run_step(state)
      unchecked.append((step, step_metrics["loss"]))
      if len(unchecked) > MAX_STEPS_AHEAD:
        jax.block_until_ready(unchecked[-MAX_STEPS_AHEAD - 1][1])  # Waits on that step alone, copies nothing.
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
        logging.info("step %d/%d  loss %.4f  %.1f img/s  ETA %s", step, experiment.total_steps, values["loss"],
                     images_per_second, time.strftime("%H:%M:%S", time.gmtime(eta)))
        writer.write(step, {**values, "images_per_second": images_per_second})
        window_start, window_steps = time.time(), 0
      validation = None
      if evaluate_now:
        eval_start = time.time()
        validation = evaluate(
            state, experiment.eval_fn, experiment.eval_batches("validation"), mesh, experiment.task).metrics
        logging.info("step %d validation: %s", step, _headline(validation))
        writer.write(step, {f"validation/{k}": v for k, v in scalar_metrics(validation).items()})
        window_start += time.time() - eval_start  # Training throughput excludes evaluation.
        seconds["validation"] += time.time() - eval_start
      if checkpoint_now:
        selection = None if validation is None else {checkpoints.SELECTION_METRIC: validation["spearman"]}
        save_start = time.time()
        checkpoints.save(manager, step, state, train_iterator, experiment.metadata(), selection,
                         frozen_encoder)
        seconds["checkpoint"] += time.time() - save_start
    save_start = time.time()
    manager.wait_until_finished()
    seconds["checkpoint"] += time.time() - save_start
    _log_run_time(time.time() - run_start, experiment.total_steps - start_step, config.batch_size, seconds)
  finally:
    # A checkpoint still being written (async) is completed even when the run is interrupted.
    manager.wait_until_finished()
    writer.close()
    workdir_lock.release(workdir)
  return {split: evaluate_checkpoint(config, workdir, split, experiment=experiment) for split in config.eval_splits}


def _log_run_time(total: float, steps: int, batch_size: int, seconds: dict) -> None:
  """Where a run's wall time went: train steps (with logging), validation, checkpoint saves (the
  time the loop waited in `save`: async writes overlap the next steps)."""
  stepping = total - sum(seconds.values())
  logging.info("Trained %d steps in %.1f s: %.1f s of train steps (%.1f img/s), %.1f s of validation, "
               "%.1f s in checkpoint saves", steps, total, stepping, steps * batch_size / max(stepping, 1e-9),
               seconds["validation"], seconds["checkpoint"])


def _check_finite(unchecked: list, manager) -> None:
  """Raises at the first of these (step, loss) pairs whose loss is NaN or infinite."""
  losses = jax.device_get([loss for _, loss in unchecked])
  for (step, _), loss in zip(unchecked, losses):
    if not np.isfinite(loss):
      manager.wait_until_finished()
      last_good = manager.latest_step()
      raise NonFiniteLossError(
          f"the loss is {float(loss)} at step {step}; stopping. The last good checkpoint is "
          f"{'step ' + str(last_good) if last_good is not None else 'none (no checkpoint was written)'}.")


def _photo_inference(experiment: Experiment, state: TrainState):
  """(images, mask) -> the eval step's `score` and `attention` for images without targets (zeros fill
  the batch's targets), as the redaction quality re-scores redacted images."""
  num_scores = experiment.task.preferences.shape[1]

  def infer(images, mask):
    batch = {"image": images, "mask": mask, "score": np.zeros((len(images), num_scores), np.float32),
             "labels": np.zeros((len(images), attributes.NUM_ATTRIBUTES), np.float32)}
    outputs = _to_host(experiment.eval_fn(state, shard_batch(batch, experiment.mesh)))
    return {"score": outputs["prediction"], "attention": outputs["attention"]}
  return infer


def evaluate_checkpoint(config, workdir: str, split: str, step: int | None = None, *,
                        experiment: Experiment | None = None) -> dict:
  """Evaluates the best (or a named) checkpoint on a split; writes workdir/eval_<split>.json (with
  `localisation` where the data has boxes) and the report (evaluation_report.report_dir)."""
  experiment = experiment or Experiment(config, workdir, need_train=False)
  step = select_step(experiment.manager, workdir, step)
  if split not in experiment.sources:
    raise ValueError(f"unknown split {split!r}; have {sorted(experiment.sources)}")
  state = experiment.restore(step)
  result = evaluate(state, experiment.eval_fn, experiment.eval_batches(split), experiment.mesh, experiment.task)
  summary = {k: result.metrics[k] for k in ("l1", "mse", "pearson", "spearman", "n")}
  summary.update({k: v for k, v in result.metrics.items() if k not in summary})
  summary["step"] = int(step)
  summary["model"] = config.model.name
  localisation = evaluation_report.localisation_summary(result.extras)
  if localisation is not None:
    summary["localisation"] = localisation
  redaction = None
  if localisation is not None and "image_id" in result.extras:  # Boxes, attention, one process.
    redaction = evaluation_report.redaction_summary(
        result.extras, experiment.sources[split], _photo_inference(experiment, state), image_size=config.image_size,
        batch_size=config.batch_size, model_name=config.model.name)
  if redaction is not None:
    summary["redaction"] = redaction[0]
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / f"eval_{split}.json").write_text(json.dumps(summary, indent=2))
    if "image_id" in result.extras:
      paths = evaluation_report.write_eval_report(
          evaluation_report.report_dir(workdir, split), method_name=config.model.name, split=split,
          summary=summary, extras=result.extras, predictions=result.predictions, targets=result.targets,
          source=experiment.sources[split], redaction_examples=redaction[1] if redaction else ())
      logging.info("Wrote %s and %s", *paths)
    else:  # Several processes: image ids (host strings) stay with the process that read them.
      logging.info("No report.md: a multi-process evaluation keeps the labels and image ids per process")
  print(f"{config.model.name} on {split} (checkpoint step {step}): {_headline(summary)}", flush=True)
  return summary
