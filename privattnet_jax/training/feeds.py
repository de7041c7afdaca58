"""Where a run's batches come from, decided once from `feature_cache.mode`.

  off     images through the grain pipeline (input_pipeline.py);
  host    cached encoder features through grain (feature_cache.py);
  device  cached features held in device memory, each train batch gathered inside the jitted
          step (device_features.py).

`select_feed` makes that choice and returns one `Feed`: the train step on the next batch, the
eval batches of a split and what a checkpoint saves of the data position. A split the cache does
not hold (e.g. `feature_cache.splits` without it, or augmented train views for evaluation) comes
from the next path down: device -> host cache -> images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from privattnet_jax.training import device_features
from privattnet_jax.training import feature_cache
from privattnet_jax.data import input_pipeline
from privattnet_jax.training import train_steps
from privattnet_jax.models import scoring
from privattnet_jax.training import train_state

# What config_check allows for feature_cache.mode (tests/test_config_check.py compares them).
MODES = ("off", "host", "device")


@dataclasses.dataclass
class Feed:
  """A run's batches: `step(state)` trains on the next one, `eval_batches(split)` is one pass."""

  mode: str
  cache: feature_cache.FeatureCache | None
  # What a checkpoint saves of the data position: the host loader's grain iterator; None when the
  # step number is the position (features on the devices) or the run does not train.
  position: Any
  step: Callable[[train_state.TrainState], tuple[train_state.TrainState, dict]] | None
  eval_batches: Callable[[str], Iterable[dict]]
  train_set: device_features.TrainSet | None = None  # 'device': the train split on the devices.


def select_feed(
  mode: str,
  input_config,
  seed: int,
  sources: Mapping[str, Any],
  mesh,
  task: scoring.Task,
  *,
  steps_per_epoch: int,
  prepare_cache: Callable[[], feature_cache.FeatureCache],
  need_train: bool = True,
) -> Feed:
  """The run's feed for `feature_cache.mode`, batching as the `input` section says.

  `prepare_cache()` builds or checks the feature cache (called only when `mode` is not 'off');
  without `need_train` no train step is made.
  """
  cache = None if mode == "off" else prepare_cache()
  has_train = cache is not None and cache.has_train()
  eval_sets = {}
  if mode == "device" and cache.has_eval("validation"):
    eval_sets["validation"] = device_features.load_eval(
      cache, "validation", input_config, mesh, train_steps.AXIS, task
    )

  def eval_batches(split: str) -> Iterable[dict]:
    if split in eval_sets:
      return eval_sets[split].batches()
    if cache is not None and cache.has_eval(split):
      return cache.eval_batches(split, input_config, task)
    return input_pipeline.create_eval_batches(sources[split], input_config, task)

  if not need_train:
    return Feed(mode, cache, None, None, eval_batches)
  if mode == "device" and has_train:
    train_set = device_features.load_train(cache, mesh, train_steps.AXIS, task)
    device_step = device_features.parallel_train_step(
      mesh,
      train_steps.AXIS,
      train_steps.task_train_step(task),
      train_set,
      steps_per_epoch,
      input_config.batch_size,
      seed,
    )
    return Feed(
      mode, cache, None, lambda state: device_step(state, train_set.arrays), eval_batches, train_set
    )
  if has_train:
    loader = cache.train_loader(input_config, seed, task)
  else:
    loader = input_pipeline.create_train_loader(sources["train"], input_config, task, seed=seed)
  iterator = iter(loader)
  host_step = train_steps.parallel_train_step(mesh, task)
  return Feed(
    mode,
    cache,
    iterator,
    lambda state: host_step(state, train_steps.shard_batch(next(iterator), mesh)),
    eval_batches,
  )
