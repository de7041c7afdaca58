"""The run's setup: all its config gives (data, task, model, mesh, initial state, feed)."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from privattnet_jax import data as data_lib
from privattnet_jax import config_check, models
from privattnet_jax.data import attributes, input_pipeline
from privattnet_jax.models import registry, scoring, weights
from privattnet_jax.training import checkpoints, feature_cache, feeds, train_state, train_steps
from privattnet_jax.models import weight_keys


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on values that would otherwise fail deep inside a step.

  Every field's own range (`config_check`), then what depends on the machine and the encoder.
  """
  config_check.check(config)
  batch_size = config.input.batch_size
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise ValueError(
      f"input.batch_size={batch_size} must be a positive multiple of the device count ({devices})"
    )
  if batch_size % processes:
    raise ValueError(
      f"input.batch_size={batch_size} must be divisible by the process count ({processes})"
    )
  image_size = config.input.image_size
  stride = models.encoder_output_stride(config.model.encoder, models.encoder_stages(config.model))
  if image_size % stride:
    raise ValueError(
      f"input.image_size={image_size} must be a multiple of the encoder's output stride "
      f"{stride} (e.g. {max(stride, image_size // stride * stride)})"
    )
  pretrained = config.model.encoder.get("pretrained", "")
  if pretrained:  # A missing weight file fails here, before any dataset work.
    try:
      weights.resolve_path(pretrained)
    except weight_keys.WeightImportError as e:
      raise FileNotFoundError(f"model.encoder.pretrained: {e}") from None


class Experiment:
  """Everything a run derives from its config: data, task, model, mesh and compiled steps."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, need_train: bool = True
  ):
    validate_config(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.sources = data_lib.load_data_sources(config.data)
    self.manager = checkpoints.create_manager(self.workdir, config.keep_checkpoints)
    if need_train:  # A resumed run continues from the newest checkpoint that restores.
      checkpoints.set_aside_unrestorable(self.manager, self.workdir)
    self.mesh = train_steps.create_mesh()
    num_train = len(self.sources["train"])
    self.steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.input.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"batch_size={config.input.batch_size} exceeds the {num_train} training examples"
      )
    self.total_steps = (
      config.num_train_steps
      if config.num_train_steps > 0
      else (config.num_epochs * self.steps_per_epoch)
    )
    preferences = input_pipeline.score_preferences(config.score)  # The run's one read of it.
    self.task = scoring.make_task(
      config.model, config.score, config.loss, self._target_mean(preferences), preferences
    )
    self.model = models.create_model(
      config.model, num_outputs=self.task.preferences.shape[1], batchnorm_axis_name=train_steps.AXIS
    )
    image_shape = (config.input.image_size, config.input.image_size, 3)
    replicated = NamedSharding(self.mesh, P())
    # Through host memory: every process computes the same initial state on its first local
    # device, and a single-device array cannot become one replica of a mesh that spans processes
    # when the process has no other device (one process per GPU).
    self.initial_state = jax.device_put(
      jax.device_get(
        train_state.create_train_state(
          self.model,
          image_shape,
          config.model.encoder,
          config.optim,
          self.total_steps,
          jax.random.PRNGKey(config.seed),
          attribute_bias=self._attribute_bias(),
        )
      ),
      replicated,
    )
    # Kept apart: the train step donates (deletes) the state it is given.
    self.abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self.initial_state
    )
    self.eval_fn = train_steps.parallel_eval_step(self.mesh, self.task)
    self.feed = feeds.select_feed(
      config.feature_cache.mode,
      config.input,
      config.seed,
      self.sources,
      self.mesh,
      self.task,
      steps_per_epoch=self.steps_per_epoch,
      prepare_cache=self.prepare_feature_cache,
      need_train=need_train,
    )

  def _attribute_bias(self):
    """An attribute model's initial logit bias: the training labels' log prior odds ("prior").

    PyTorch's init ("uniform") starts every logit near 0 while most attributes are absent from
    most images: PrivAttNet_MLC's shared per-step head then spends its run pushing those logits
    down and barely learns which image holds what (docs/benchmarks.md, "PrivAttNet_MLC").
    """
    model_config = self.config.model
    if registry.lookup(model_config).kind != "attributes":
      return None
    if model_config.get("attribute_bias_init", "uniform") == "uniform":
      return None
    bias = attributes.log_prior_odds(input_pipeline.split_labels(self.sources["train"]))
    return lambda params: models.with_attribute_bias(params, model_config, bias)

  def _target_mean(self, preferences: np.ndarray) -> np.ndarray:
    """The training split's mean score per column; reused from a checkpoint.

    The authors hard-coded theirs. Attribute models never use it, so their checkpoints serve any
    `score.per_profile`.
    """
    num_outputs = preferences.shape[1]
    latest = self.manager.latest_step()
    if latest is not None:
      mean = np.asarray(
        checkpoints.restore_metadata(self.manager, latest)["target_mean"], np.float32
      )
      if mean.shape == (num_outputs,):
        return mean
      if registry.lookup(self.config.model).kind == "regression":
        raise ValueError(
          f"the checkpoints in {self.workdir} predict {mean.size} score column(s), this config {num_outputs} "
          f"(score.per_profile={self.config.score.per_profile}): use the run's own config or a new workdir"
        )
    return input_pipeline.split_scores(
      self.sources["train"], preferences, self.config.score.pooling
    ).mean(axis=0)

  def metadata(self) -> dict:
    # The preference table rides along: a checkpoint must not depend on a TSV file of the machine it
    # was trained on (score.source='file') to turn attribute probabilities into scores.
    return {
      "config": self.config.to_dict(),
      "target_mean": self.task.target_mean.tolist(),
      "preferences": self.task.preferences.tolist(),
    }

  def prepare_feature_cache(self) -> feature_cache.FeatureCache:
    """Builds or checks the cache for the frozen encoder: the latest checkpoint's, else the initial.

    A resumed run keeps its encoder even if the config's weights changed.
    """
    latest = self.manager.latest_step()
    state = self.initial_state if latest is None else self.restore(latest)
    encode_step = train_steps.parallel_encode_step(
      self.mesh, feature_cache.DTYPES[self.config.feature_cache.dtype]
    )
    config = self.config
    settings = feature_cache.CacheSettings(
      cache=config.feature_cache,
      input=config.input,
      seed=config.seed,
      compute_dtype="bfloat16" if config.model.half_precision else "float32",
    )
    return feature_cache.ensure(
      settings,
      self.sources,
      state,
      lambda images: encode_step(
        state, train_steps.shard_batch({"image": images}, self.mesh)["image"]
      ),
      self.task,
    )

  def restore(self, step: int, data_iterator=None) -> train_state.TrainState:
    state, _ = checkpoints.restore(self.manager, step, self.abstract_state, data_iterator)
    return state


def prepare_feature_cache(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> feature_cache.FeatureCache:
  """Builds (or checks), ahead of training, the feature cache a run of `config` in `workdir` reads.

  With the encoder of the workdir's latest checkpoint, else the initial one. Needs the run's data,
  encoder state, task and mesh, so it sets up the experiment without a train step, with the cache
  read through the host ('device' reads the same files, and its device copy of the features is a
  training run's, not the cache's).
  """
  config = config.copy_and_resolve_references()
  config.feature_cache.mode = "host"
  return Experiment(config, workdir, need_train=False).feed.cache
