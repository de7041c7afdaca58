"""feeds: which path each split's batches and the train step take, by feature_cache.mode."""

import types

import pytest

from privattnet_jax import config_check
from privattnet_jax.data import input_pipeline
from privattnet_jax.training import device_features, feeds, train_steps
from tests.conftest import make_tiny_config

SOURCES = {"train": "train source", "validation": "validation source", "test": "test source"}
MESH, TASK = "mesh", "task"


class _Cache:
  """A feature cache holding `splits` (train: its host loader, others: their eval batches)."""

  def __init__(self, splits):
    self.splits = splits

  def has_train(self):
    return "train" in self.splits

  def has_eval(self, split):
    return split != "train" and split in self.splits

  def train_loader(self, input_config, seed, task):
    return iter([{"from": "host cache", "n": 1}, {"from": "host cache", "n": 2}])

  def eval_batches(self, split, input_config, task):
    return f"host cache {split}"


@pytest.fixture
def paths(monkeypatch):
  """Every path a feed can take, replaced by one that says which it is (and the shard_batch input)."""
  monkeypatch.setattr(
    input_pipeline,
    "create_train_loader",
    lambda source, input_config, task, seed: iter(
      [{"from": source, "n": 1}, {"from": source, "n": 2}]
    ),
  )
  monkeypatch.setattr(
    input_pipeline, "create_eval_batches", lambda source, input_config, task: f"images {source}"
  )
  monkeypatch.setattr(train_steps, "shard_batch", lambda batch, mesh: ("sharded", batch))
  monkeypatch.setattr(
    train_steps, "parallel_train_step", lambda mesh, task: lambda state, batch: (state + 1, batch)
  )
  monkeypatch.setattr(
    device_features,
    "load_eval",
    lambda cache, split, input_config, mesh, axis, task: types.SimpleNamespace(
      batches=lambda: f"device {split}"
    ),
  )
  train_set = types.SimpleNamespace(arrays="device train arrays")
  monkeypatch.setattr(device_features, "load_train", lambda *args: train_set)
  monkeypatch.setattr(
    device_features,
    "parallel_train_step",
    lambda mesh, axis, step, train_set, steps_per_epoch, batch_size, seed: (
      lambda state, arrays: (state + 1, ("device step", arrays, steps_per_epoch))
    ),
  )
  return train_set


def _feed(mode, cache_splits=None, need_train=True):
  config = make_tiny_config("/nonexistent")
  config.feature_cache.mode = mode
  prepared = []

  def prepare_cache():
    prepared.append(True)
    return _Cache(cache_splits)

  feed = feeds.select_feed(
    config.feature_cache.mode,
    config.input,
    config.seed,
    SOURCES,
    MESH,
    TASK,
    steps_per_epoch=6,
    prepare_cache=prepare_cache,
    need_train=need_train,
  )
  return feed, prepared


def test_off_reads_images_and_never_prepares_a_cache(paths):
  feed, prepared = _feed("off")
  assert not prepared and feed.cache is None and feed.train_set is None
  assert feed.step(0) == (1, ("sharded", {"from": "train source", "n": 1}))
  assert feed.step(1) == (2, ("sharded", {"from": "train source", "n": 2}))
  assert feed.eval_batches("test") == "images test source"
  with pytest.raises(StopIteration):  # `position` is the iterator the steps consume.
    next(feed.position)


def test_host_takes_each_split_from_the_cache_when_it_holds_it_else_from_images(paths):
  feed, prepared = _feed("host", {"train", "validation"})
  assert prepared == [True] and feed.mode == "host"
  assert feed.step(0) == (1, ("sharded", {"from": "host cache", "n": 1}))
  assert feed.eval_batches("validation") == "host cache validation"
  assert feed.eval_batches("test") == "images test source"
  without_train, _ = _feed("host", {"validation"})
  assert without_train.step(0) == (1, ("sharded", {"from": "train source", "n": 1}))


def test_device_trains_on_the_devices_and_falls_back_to_the_host_cache_then_images(paths):
  train_set = paths
  feed, _ = _feed("device", {"train", "validation", "test"})
  assert feed.position is None and feed.train_set is train_set  # The step number is the position.
  assert feed.step(0) == (1, ("device step", "device train arrays", 6))
  assert feed.eval_batches("validation") == "device validation"
  assert feed.eval_batches("test") == "host cache test"
  partial, _ = _feed("device", {"validation"})
  assert partial.step(0) == (1, ("sharded", {"from": "train source", "n": 1}))
  assert partial.eval_batches("test") == "images test source"


@pytest.mark.parametrize("mode", feeds.MODES)
def test_without_need_train_there_is_no_step_and_no_loader(paths, monkeypatch, mode):
  def refuse(*args):
    raise AssertionError("a train loader was made")

  monkeypatch.setattr(input_pipeline, "create_train_loader", refuse)
  monkeypatch.setattr(device_features, "load_train", refuse)
  feed, _ = _feed(mode, {"train", "validation"}, need_train=False)
  assert feed.step is None and feed.position is None
  assert feed.eval_batches("test") == "images test source"


def test_the_config_check_checks_the_cache_only_when_one_is_used():
  config = make_tiny_config("/nonexistent")
  assert config.model.encoder.trainable  # Fine without a cache...
  config_check.check(config)
  config.feature_cache.mode = "host"
  with pytest.raises(ValueError, match="needs model.encoder.trainable=False"):  # ...not with one.
    config_check.check(config)
  config.feature_cache.mode = "on"
  with pytest.raises(
    ValueError, match=r"feature_cache.mode must be one of \('off', 'host', 'device'\), got 'on'"
  ):
    config_check.check(config)
