"""Frozen-encoder feature cache: the encoder runs once per image, head training reads its output.

With `model.encoder.trainable=False` and `model.encoder.batchnorm='frozen'` an image's encoder
features depend on the image and the encoder weights alone, so they can be computed once and read
back every epoch: no JPEG decoding, no augmentation, no encoder pass (most of a training step's
arithmetic at the paper's size: docs/benchmarks.md, "On the 2-core CPU"). Batches then carry
`features` (B, h, w, D) instead of `image`, and the train and eval steps run
`PrivacyModel.head_from_features`.

Layout of the cache folder (`config.feature_cache.dir`; default `feature_cache/` inside the
dataset's TFDS version folder, so deleting the dataset deletes its caches too):

  manifest.json                     what the cache was built from; written last, so a folder
                                    without it is an unfinished build
  <split>-<p>-of-<P>.array_record   the records that process p of P encoded (one file per process)

Records are msgpack maps: `features` (raw bytes of (h, w, D) in the manifest's dtype),
`labels` (68 bool bytes), `image_id`, `boxes` (float32 (N, 4) bytes). The privacy score is
computed from the labels when reading, as from the dataset, so one cache serves every score
definition. Record r of a split is row r of the encoding stream: example r // V, view r % V,
V = 1 except for a train split cached with `train_views` = K >= 1 augmented views (the train
transform, seeded by (config.seed, example, view)); training then draws one view per step
(`input_pipeline.ViewSampler`). With `train_views` = 0 the train split is cached through the eval
transform (resize to image_size, no augmentation).

A cache is used only if its manifest's key equals the run's: the sha256 of the encoder's
parameters and BatchNorm statistics (taken after `encoder.pretrained` is loaded, or from the
checkpoint being resumed), the compute dtype, the preprocessing (image size, resize, crop,
views, seed, stored dtype) and the dataset (TFDS folder, split sizes); its files must also hold
the expected record counts. Otherwise it is rebuilt and the log says why.

Several processes (multi-host) build one cache together, each writing its own file; the folder
must then be on a filesystem all processes share. Do not build one cache from two jobs at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
from array_record.python import array_record_module
import flax
from flax import traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import msgpack
import numpy as np

from privattnet_jax import nested
from privattnet_jax.data import input_pipeline

FORMAT = (
  "privattnet_jax.feature_cache"  # A format name, not a module path: existing caches stay valid.
)
FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
DEFAULT_SUBDIR = "feature_cache"
SPLITS = ("train", "validation", "test")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_KEY_FIELDS = (
  "format",
  "encoder",
  "preprocessing",
  "dataset",
)  # The manifest's fields a run must match.
_WRITER_OPTIONS = (
  "group_size:1,uncompressed"  # One record per chunk (random access); features do not compress.
)
_LOG_EVERY_BATCHES = 20


# ----------------------------------------------------------------------------
# Configuration and the key a cache must match.


@dataclasses.dataclass(frozen=True)
class CacheSettings:
  """What a cache's files depend on besides the encoder and the data; the run's setup builds it."""

  cache: Any  # The `feature_cache` config section.
  input: Any  # The `input` config section.
  seed: int  # Seeds the augmented train views.
  compute_dtype: str  # The encoder's: "float32" or "bfloat16".


def encoder_digest(state) -> str:
  """sha256 over the encoder's parameters and BatchNorm statistics: names, dtypes, shapes, bytes."""
  encoder = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(flax.core.unfreeze(encoder)).items()):
    array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{'/'.join(path)}:{array.dtype}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _dataset_dir(sources: Mapping[str, Any]) -> pathlib.Path | None:
  """The TFDS version folder the sources read (tfds' array_record data sources know it)."""
  info = getattr(sources["train"], "dataset_info", None)
  return None if info is None else pathlib.Path(os.fspath(info.data_dir))


def cache_dir(cache, sources: Mapping[str, Any], encoder_sha256: str) -> pathlib.Path:
  """`feature_cache.dir`, or `feature_cache/<encoder digest>/` in the dataset's TFDS version folder.

  One folder per encoder, so runs with other encoders or cuts (demo.py and demo.py:privnet) on one
  dataset keep their caches instead of rebuilding each other's.
  """
  if cache.dir:
    return pathlib.Path(cache.dir).expanduser()
  dataset_dir = _dataset_dir(sources)
  if dataset_dir is None:
    raise ValueError(
      "the data sources name no dataset folder to put the cache beside: set feature_cache.dir"
    )
  return dataset_dir / DEFAULT_SUBDIR / encoder_sha256[:16]


def manifest_key(settings: CacheSettings, sources: Mapping[str, Any], state) -> dict:
  """Everything the cached features depend on; a cache whose manifest differs is rebuilt."""
  cache = settings.cache
  preprocessing = {
    "image_size": settings.input.image_size,
    "dtype": cache.dtype,
    "train_views": cache.train_views,
  }
  if cache.train_views and "train" in cache.splits:  # What the augmented views depend on.
    preprocessing.update(
      resize_size=input_pipeline.resize_size(settings.input),
      crop_scale=list(settings.input.crop_scale),
      crop_ratio=list(settings.input.crop_ratio),
      seed=settings.seed,
    )
  key = {
    "format": {"name": FORMAT, "version": FORMAT_VERSION},
    "encoder": {
      "sha256": encoder_digest(state),
      "compute_dtype": settings.compute_dtype,
    },
    "preprocessing": preprocessing,
    "dataset": {
      "data_dir": os.fspath(_dataset_dir(sources) or ""),
      "num_examples": {split: len(sources[split]) for split in cache.splits},
    },
  }
  return json.loads(json.dumps(key))  # As it reads back from the manifest (tuples -> lists).


# ----------------------------------------------------------------------------
# Records and reading.


def encode_record(
  features: np.ndarray, labels: np.ndarray, image_id: str, boxes: np.ndarray
) -> bytes:
  return msgpack.packb(
    {
      "features": np.ascontiguousarray(features).tobytes(),
      "labels": np.asarray(labels, bool).tobytes(),
      "image_id": str(image_id),
      "boxes": np.asarray(boxes, np.float32).tobytes(),
    }
  )


def decode_record(data: bytes, shape, dtype) -> dict[str, Any]:
  """A record as a dataset-like dict, `features` (not copied) in place of `image`."""
  record = msgpack.unpackb(data)
  return {
    "features": np.frombuffer(record["features"], dtype).reshape(shape),
    "labels": np.frombuffer(record["labels"], bool),
    "image_id": record["image_id"],
    "boxes": np.frombuffer(record["boxes"], np.float32).reshape(-1, 4),
  }


class CachedSplit:
  """A split's records in stream order, decoded; a random-access source for grain.

  Stream row r is record k of process p's file, (p, k) = `ProcessLayout.owner(r)`: the eval
  stream's layout, which each process wrote its file in.
  """

  def __init__(self, directory: pathlib.Path, split: str, manifest: Mapping[str, Any]):
    entry, layout = manifest["splits"][split], manifest["layout"]
    self._name = f"{directory}/{split}"
    self._sources = [
      grain.sources.ArrayRecordDataSource([os.fspath(directory / name)]) for name in entry["files"]
    ]
    self._layout = input_pipeline.ProcessLayout(0, len(self._sources), layout["rows_per_batch"])
    self._length = entry["records"]
    self._shape = tuple(manifest["features"]["shape"])
    self._dtype = np.dtype(DTYPES[manifest["features"]["dtype"]])

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f"record {index} of {self._length}")
    process, record = self._layout.owner(index)
    return decode_record(self._sources[process][record], self._shape, self._dtype)

  def __repr__(self) -> str:
    return f"CachedSplit({self._name}, {self._length} records)"


class FeatureTrainTransform(grain.transforms.Map):
  """Cache record -> {features, score, labels, mask}."""

  def __init__(self, *, preferences, pooling):
    self.preferences = np.asarray(preferences, dtype=np.float32)
    self.pooling = str(pooling)

  def map(self, element) -> dict[str, np.ndarray]:
    return {
      "features": element["features"],
      **input_pipeline.example_targets(element, self.preferences, self.pooling),
    }


class FeatureEvalTransform(input_pipeline.EvalTransform):
  """Cache record (or `{}`, a padding row) -> the eval row with `features` in place of `image`."""

  input_key = "features"

  def __init__(self, *, features_shape, features_dtype, **kwargs):
    super().__init__(**kwargs)
    self.features_shape = tuple(features_shape)
    self.features_dtype = np.dtype(features_dtype)

  def model_input(self, element) -> np.ndarray:
    return element["features"]

  def padding_input(self) -> np.ndarray:
    return np.zeros(self.features_shape, self.features_dtype)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """A checked cache: its folder and manifest, and the loaders that read it."""

  directory: pathlib.Path
  manifest: dict

  def has_train(self) -> bool:
    return "train" in self.manifest["splits"]

  def has_eval(self, split: str) -> bool:
    """Whether `split` is cached through the eval transform (augmented train views are not)."""
    entry = self.manifest["splits"].get(split)
    return entry is not None and not entry["augmented"]

  def source(self, split: str) -> CachedSplit:
    return CachedSplit(self.directory, split, self.manifest)

  def train_loader(self, input_config, seed: int, task) -> grain.DataLoader:
    transform = FeatureTrainTransform(preferences=task.preferences, pooling=task.pooling)
    return input_pipeline.create_train_loader(
      self.source("train"),
      input_config,
      task,
      seed=seed,
      transform=transform,
      views_per_example=self.manifest["splits"]["train"]["views"],
    )

  def eval_batches(self, split: str, input_config, task):
    transform = FeatureEvalTransform(
      features_shape=self.manifest["features"]["shape"],
      features_dtype=DTYPES[self.manifest["features"]["dtype"]],
      image_size=input_config.image_size,
      preferences=task.preferences,
      pooling=task.pooling,
    )
    return input_pipeline.create_eval_batches(
      self.source(split), input_config, task, transform=transform
    )

  def bytes_per_record(self) -> float:
    files = [
      self.directory / name for entry in self.manifest["splits"].values() for name in entry["files"]
    ]
    records = sum(entry["records"] for entry in self.manifest["splits"].values())
    return sum(path.stat().st_size for path in files) / max(records, 1)


# ----------------------------------------------------------------------------
# Checking and building.


def _stale_reason(directory: pathlib.Path, key: dict) -> str | None:
  """Why the cache in `directory` cannot serve `key`, or None when it can."""
  path = directory / MANIFEST_FILENAME
  if not path.exists():
    return "no manifest (a new cache, or an unfinished build)"
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    return f"unreadable manifest ({error})"
  differences = nested.nested_differences(
    {field: manifest.get(field) for field in _KEY_FIELDS}, key
  )
  if differences:
    return "built from other inputs: " + "; ".join(
      f"{path}: {old!r} -> {new!r}" for path, old, new in differences
    )
  for split, entry in manifest["splits"].items():
    layout = input_pipeline.ProcessLayout(
      0, len(entry["files"]), manifest["layout"]["rows_per_batch"]
    )
    for process, name in enumerate(entry["files"]):
      expected = layout.rows_of_process(entry["records"], process)
      try:
        found = len(grain.sources.ArrayRecordDataSource([os.fspath(directory / name)]))
      except Exception as error:  # pylint: disable=broad-except  # A missing or damaged file, whatever riegeli says.
        return f"{split} file {name} is unreadable ({error})"
      if found != expected:
        return f"{split} file {name} holds {found} records, expected {expected}"
  return None


class _ViewRows:
  """Rows (example i, view v) at i * V + v: the record with its index and view attached."""

  def __init__(self, source, views: int):
    self._source = source
    self._views = views

  def __len__(self) -> int:
    return len(self._source) * self._views

  def __getitem__(self, row: int) -> dict[str, Any]:
    index, view = divmod(row, self._views)
    return {**self._source[index], "index": index, "view": view}

  def __repr__(self) -> str:
    return f"_ViewRows({self._source!r}, views={self._views})"


class _ViewTransform(input_pipeline.EvalTransform):
  """A `_ViewRows` row -> the eval row whose image is view v of example i (the train transform)."""

  def __init__(self, *, train_transform: input_pipeline.TrainTransform, seed: int, **kwargs):
    super().__init__(**kwargs)
    self.train_transform = train_transform
    self.seed = int(seed)

  def model_input(self, element) -> np.ndarray:
    rng = np.random.default_rng([self.seed, element["index"], element["view"]])
    return self.train_transform.image(element["image"], rng)


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def _write_rows(writer, features: jax.Array, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  local = _local_rows(features)
  for row in np.flatnonzero(batch["mask"] > 0):
    boxes = batch["boxes"][row, : batch["num_boxes"][row]]
    writer.write(encode_record(local[row], batch["labels"][row] > 0, batch["image_id"][row], boxes))
  return local


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"feature_cache:{name}")


def _file_name(split: str, process: int, process_count: int) -> str:
  return f"{split}-{process:05d}-of-{process_count:05d}.array_record"


def _encode_split(
  directory: pathlib.Path,
  split: str,
  settings: CacheSettings,
  source,
  views: int,
  encode: Callable[[np.ndarray], jax.Array],
  task,
) -> tuple[int, ...] | None:
  """Encodes this process's rows of one split into its file; returns the features' shape."""
  layout = input_pipeline.process_layout(settings.input.batch_size)
  common = dict(
    image_size=settings.input.image_size, preferences=task.preferences, pooling=task.pooling
  )
  if views:
    rows = _ViewRows(source, views)
    transform = _ViewTransform(
      train_transform=input_pipeline.train_transform(settings.input, task),
      seed=settings.seed,
      **common,
    )
  else:
    rows, transform = source, input_pipeline.EvalTransform(**common)
  path = directory / _file_name(split, layout.process_index, layout.process_count)
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
  shape, pending, start = None, None, time.time()
  try:
    # The next batch is dispatched before the previous one is fetched and written.
    for number, batch in enumerate(
      input_pipeline.create_eval_batches(rows, settings.input, task, transform=transform), 1
    ):
      features = encode(batch["image"])
      if pending is not None:
        shape = _write_rows(writer, *pending).shape[1:]
      pending = (features, batch)
      if number % _LOG_EVERY_BATCHES == 0:
        logging.info(
          "feature cache %s: %d / %d rows, %.1f img/s",
          split,
          number * layout.global_batch_size,
          len(rows),
          number * layout.global_batch_size / (time.time() - start),
        )
    if pending is not None:
      shape = _write_rows(writer, *pending).shape[1:]
  finally:
    writer.close()
  logging.info("feature cache %s: %d rows encoded in %.1f s", split, len(rows), time.time() - start)
  return shape


def _build(
  directory: pathlib.Path,
  settings: CacheSettings,
  sources: Mapping[str, Any],
  key: dict,
  encode: Callable[[np.ndarray], jax.Array],
  task,
) -> dict:
  directory.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (directory / MANIFEST_FILENAME).unlink(missing_ok=True)
    for split in SPLITS:
      for old in directory.glob(f"{split}-*-of-*.array_record"):
        old.unlink()
  _sync("cleared")
  cache = settings.cache
  layout = input_pipeline.process_layout(settings.input.batch_size)
  splits, shape = {}, None
  for split in cache.splits:
    views = cache.train_views if split == "train" else 0
    shape = _encode_split(directory, split, settings, sources[split], views, encode, task) or shape
    splits[split] = {
      "examples": len(sources[split]),
      "views": max(views, 1),
      "augmented": views > 0,
      "records": len(sources[split]) * max(views, 1),
      "files": [_file_name(split, p, layout.process_count) for p in range(layout.process_count)],
    }
  manifest = {
    **key,
    "features": {"shape": list(shape or ()), "dtype": cache.dtype},
    "layout": {"process_count": layout.process_count, "rows_per_batch": layout.batch_size},
    "splits": splits,
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  _sync("written")
  if jax.process_index() == 0:
    temporary = directory / (MANIFEST_FILENAME + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, directory / MANIFEST_FILENAME)  # Last: the cache is complete.
  _sync("committed")
  return manifest


def ensure(
  settings: CacheSettings,
  sources: Mapping[str, Any],
  state,
  encode: Callable[[np.ndarray], jax.Array],
  task,
) -> FeatureCache:
  """The run's feature cache, built (or rebuilt, saying why) unless a matching one exists.

  Args:
    settings: the cache's sections, seed and compute dtype.
    sources: {split: dataset source}, as `data.load_data_sources` returns.
    state: the TrainState whose (frozen) encoder the cache must match: after `encoder.pretrained`
      is loaded, or the checkpoint a run resumes.
    encode: per-process images (B, S, S, 3) -> the global, batch-sharded features (jitted,
      data-parallel over the mesh), in the cache's dtype.
    task: the run's score definition (`scoring.Task`); the cache stores labels, not scores,
      so it serves every task, but the encoding pass reads rows through the scoring transforms.
  """
  key = manifest_key(settings, sources, state)
  directory = cache_dir(settings.cache, sources, key["encoder"]["sha256"])
  reason = _stale_reason(directory, key)
  if reason is None:
    manifest = json.loads((directory / MANIFEST_FILENAME).read_text())
    logging.info("Using the feature cache in %s", directory)
  else:
    logging.warning("Building the feature cache in %s: %s", directory, reason)
    manifest = _build(directory, settings, sources, key, encode, task)
  return FeatureCache(directory, manifest)
