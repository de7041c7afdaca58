"""Cached features held in device memory: head training and validation with no host pipeline.

With `feature_cache.mode='device'`, the train and validation splits of the feature cache are read
once into arrays sharded over the mesh's batch axis (each device holds 1/N of the records), and
every train step gathers its batch from them inside the jitted step. The host then only
dispatches steps: at the paper's size a step reads 100 MB of features (256 x 14x14x1024 bf16),
which a host loader could not supply at an accelerator's step rate (docs/benchmarks.md, "On one
H100: the paper's whole run"). The
price is device memory: 402 KB per record (bf16, 224 px), 4.0 GB for VISPR's 10,000 training
images plus 1.7 GB for its 4,167 validation images, split over the devices.

Train order: device d holds examples d, d + N, d + 2N, ... (N devices) and each epoch draws its
share of every global batch from its own records in a fresh permutation seeded by (config.seed,
epoch, d), without replacement; with K cached views one view per draw. The permutation depends
on the step number alone, so a resumed run continues exactly where the checkpoint was taken,
with nothing but the TrainState saved. Batches differ from the grain loader's (which shuffles
per process), not in their statistics: every epoch draws `steps_per_epoch` x batch distinct
examples.

Eval rows keep the grain eval stream's order (`input_pipeline.create_eval_batches`): global batch
b holds records [b x B, (b + 1) x B), the last padded with mask 0, so the metrics, the report and
the image ids are those of the host path.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from typing import Any

from absl import logging
import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from privattnet_jax.training import feature_cache
from privattnet_jax.data import input_pipeline

_READ_THREADS = 8


def _local_positions(mesh) -> list[int]:
  """This process's device positions along the (one-axis) mesh, in mesh order.

  They must be contiguous, as `jax.make_array_from_process_local_data` lays a process's rows out.
  """
  positions = [
    k for k, device in enumerate(mesh.devices.flat) if device.process_index == jax.process_index()
  ]
  if positions != list(range(positions[0], positions[0] + len(positions))):
    raise ValueError(
      "feature_cache.mode='device' needs each process's devices next to each other "
      f"on the mesh; process {jax.process_index()} has positions {positions}"
    )
  return positions


class _Rows:
  """Row j of this process's share: records `rows[j]` read and made one dict by `make_row`.

  `rows[j]` is a list of record indices, empty for padding.
  """

  def __init__(self, source, rows: list[list[int]], make_row):
    self._source, self._rows, self._make_row = source, rows, make_row

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, j: int):
    return self._make_row([self._source[i] for i in self._rows[j]])


def _read_rows(source, rows: list[list[int]], make_row) -> dict[str, np.ndarray]:
  """The rows, read with parallel threads, stacked into one array per key.

  Strings, such as image ids, are as wide as the longest: a width taken from the first row would
  cut longer ones.
  """
  stream = grain.MapDataset.source(_Rows(source, rows, make_row)).to_iter_dataset(
    grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2 * _READ_THREADS)
  )
  arrays: dict[str, np.ndarray] = {}
  for j, row in enumerate(stream):
    if not arrays:
      arrays = {
        key: np.empty(
          (len(rows), *np.shape(value)),
          object if np.asarray(value).dtype.kind in "USO" else np.asarray(value).dtype,
        )
        for key, value in row.items()
      }
    for key, value in row.items():
      arrays[key][j] = value
  return {
    key: value.astype(str) if value.dtype == object else value for key, value in arrays.items()
  }


def _to_device(arrays: dict[str, np.ndarray], mesh, axis: str) -> dict[str, jax.Array]:
  """This process's rows (its devices' blocks, in mesh order) -> global arrays split over `axis`."""
  sharding = NamedSharding(mesh, P(axis))
  return {
    key: jax.make_array_from_process_local_data(sharding, value) for key, value in arrays.items()
  }


def _check_fits(num_bytes: int, mesh, what: str) -> None:
  """Refuses, with the numbers, to fill over 3/4 of a device's memory (where the backend says)."""
  device = mesh.devices.flat[_local_positions(mesh)[0]]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit and num_bytes > 0.75 * limit:
    raise ValueError(
      f"feature_cache.mode='device': the {what} take {num_bytes / 2**30:.1f} GiB per device, "
      f"more than 3/4 of the {limit / 2**30:.1f} GiB of a {device.device_kind}: "
      "set feature_cache.mode='host' (the host loader reads the same cache), or use more devices "
      "or a bfloat16 cache"
    )


def _record_shape(cache: feature_cache.FeatureCache) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(cache.manifest["features"]["shape"]), np.dtype(
    feature_cache.DTYPES[cache.manifest["features"]["dtype"]]
  )


# ----------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """The train split on the devices; row block d of `arrays` belongs to device d.

  `arrays`: {features (R, V, h, w, D), score (R, P), labels (R, 68), valid (R,)},
  R = ceil(num_examples / devices) x devices.
  """

  arrays: dict[str, jax.Array]
  views: int
  num_examples: int


def load_train(cache: feature_cache.FeatureCache, mesh, axis: str, task) -> TrainSet:
  """Reads this process's share of the cached train split into the memory of its devices."""
  entry = cache.manifest["splits"]["train"]
  views, num_examples = entry["views"], entry["examples"]
  devices = mesh.devices.size
  rows_per_device = -(-num_examples // devices)
  shape, dtype = _record_shape(cache)
  _check_fits(
    rows_per_device * views * int(np.prod(shape)) * dtype.itemsize,
    mesh,
    f"{num_examples} x {views} cached train views",
  )
  preferences = task.preferences

  def make_row(records):
    if not records:  # Padding, never drawn (see `gather_batch`).
      return {
        "features": np.zeros((views, *shape), dtype),
        "score": np.zeros(preferences.shape[1], np.float32),
        "labels": np.zeros(len(preferences), np.float32),
        "valid": False,
      }
    targets = input_pipeline.example_targets(records[0], preferences, task.pooling)
    return {
      "features": np.stack([record["features"] for record in records]),
      "score": targets["score"],
      "labels": targets["labels"],
      "valid": True,
    }

  rows = [
    [example * views + v for v in range(views)] if example < num_examples else []
    for d in _local_positions(mesh)
    for example in range(d, rows_per_device * devices, devices)
  ]
  start = time.time()
  arrays = _read_rows(cache.source("train"), rows, make_row)
  logging.info(
    "feature cache: train split on the devices, %d examples x %d views, %.2f GB read in %.1f s",
    num_examples,
    views,
    arrays["features"].nbytes / 1e9,
    time.time() - start,
  )
  return TrainSet(_to_device(arrays, mesh, axis), views, num_examples)


def gather_batch(
  arrays: dict, step, *, axis: str, steps_per_epoch: int, local_batch: int, views: int, seed: int
) -> dict:
  """This device's share of the batch of global step `step` (0-based), inside shard_map.

  Each epoch permutes the device's valid rows afresh (padding rows sort last) and takes the
  `position`-th slice of it: steps_per_epoch x local_batch <= floor(N / devices) <= every
  device's valid count, so padding is never drawn and no row twice in an epoch.
  """
  epoch, position = step // steps_per_epoch, step % steps_per_epoch
  key = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(seed), epoch), jax.lax.axis_index(axis)
  )
  order_key, view_key = jax.random.split(key)
  valid = arrays["valid"]
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(order_key, valid.shape), 2.0))
  rows = jax.lax.dynamic_slice_in_dim(order, position * local_batch, local_batch)
  view = jax.random.randint(jax.random.fold_in(view_key, position), rows.shape, 0, views)
  return {
    "features": arrays["features"][rows, view],
    "score": arrays["score"][rows],
    "labels": arrays["labels"][rows],
    "mask": jnp.ones(rows.shape, jnp.float32),
  }


def parallel_train_step(
  mesh, axis: str, step_fn, train_set: TrainSet, steps_per_epoch: int, batch_size: int, seed: int
):
  """jit(shard_map) of the per-device `step_fn(state, batch)` on a batch gathered on the devices.

  The batch is gathered from `train_set.arrays`: call it as `step(state, train_set.arrays)`. Built
  once per distinct (mesh, step_fn, batch layout, views, seed) in a process, as train_steps' steps.
  """
  devices = mesh.devices.size
  local_batch = batch_size // devices
  if steps_per_epoch * local_batch > train_set.num_examples // devices:
    raise ValueError(
      f"{steps_per_epoch} steps of batch {batch_size} per epoch exceed the "
      f"{train_set.num_examples} cached train examples"
    )
  return _parallel_train_step(
    mesh,
    axis,
    step_fn,
    steps_per_epoch,
    local_batch,
    train_set.views,
    input_pipeline.sampler_seed(seed),
  )


@functools.lru_cache(maxsize=16)
def _parallel_train_step(mesh, axis, step_fn, steps_per_epoch, local_batch, views, seed):
  gather = functools.partial(
    gather_batch,
    axis=axis,
    steps_per_epoch=steps_per_epoch,
    local_batch=local_batch,
    views=views,
    seed=seed,
  )

  def step(state, arrays):
    return step_fn(state, gather(arrays, state.step))

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P())),
    donate_argnums=(0,),
  )


# ----------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalSet:
  """An eval split on the devices; `batches()` is one pass in the grain eval stream's order.

  Device d's rows are, batch after batch, its slice [d x b, (d + 1) x b) of each global batch
  (b = B / devices), so slicing rows [i x b, (i + 1) x b) on every device is global batch i.
  """

  arrays: dict[str, jax.Array]  # features, score, labels, mask.
  host: dict[str, np.ndarray]  # image_id, boxes, num_boxes by global row (single process only).
  num_batches: int
  global_batch: int
  slice_batch: Any  # jitted (arrays, i) -> global batch i, sharded over the batch axis.

  def batches(self) -> Iterator[dict[str, Any]]:
    for i in range(self.num_batches):
      rows = slice(i * self.global_batch, (i + 1) * self.global_batch)
      yield {
        **self.slice_batch(self.arrays, i),
        **{key: value[rows] for key, value in self.host.items()},
      }


def load_eval(
  cache: feature_cache.FeatureCache, split: str, input_config, mesh, axis: str, task
) -> EvalSet:
  """Reads this process's share of a cached eval split into the memory of its devices."""
  source = cache.source(split)
  devices, global_batch = mesh.devices.size, input_config.batch_size
  local_batch = global_batch // devices
  num_batches = input_pipeline.num_eval_batches(len(source), global_batch)
  shape, dtype = _record_shape(cache)
  _check_fits(
    num_batches * local_batch * int(np.prod(shape)) * dtype.itemsize, mesh, f"cached {split} split"
  )
  transform = feature_cache.FeatureEvalTransform(
    features_shape=shape,
    features_dtype=dtype,
    image_size=input_config.image_size,
    preferences=task.preferences,
    pooling=task.pooling,
  )

  def make_row(records):
    return transform.map(records[0] if records else {})

  # The grain eval stream's layout, with the devices in the place of the processes.
  rows = []
  for d in _local_positions(mesh):
    layout = input_pipeline.ProcessLayout(d, devices, local_batch)
    indices = (layout.stream_index(j) for j in range(num_batches * local_batch))
    rows.extend([i] if i < len(source) else [] for i in indices)
  start = time.time()
  arrays = _read_rows(source, rows, make_row)
  logging.info(
    "feature cache: %s split on the devices, %d records read in %.1f s",
    split,
    len(source),
    time.time() - start,
  )
  host_keys = ("image_id", "boxes", "num_boxes")
  host = {}
  if jax.process_count() == 1:  # Back to global row order (device-major within each batch).
    order = (
      np.arange(len(rows)).reshape(devices, num_batches, local_batch).transpose(1, 0, 2).reshape(-1)
    )
    host = {key: arrays[key][order] for key in host_keys}
  device_arrays = _to_device(
    {key: value for key, value in arrays.items() if key not in host_keys}, mesh, axis
  )

  return EvalSet(
    device_arrays, host, num_batches, global_batch, _batch_slicer(mesh, axis, local_batch)
  )


@functools.lru_cache(maxsize=16)
def _batch_slicer(mesh, axis: str, local_batch: int):
  """jitted (arrays, i) -> global batch i: rows [i x b, (i + 1) x b) of every device's share."""

  def local_slice(arrays, i):
    return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, i * local_batch, local_batch), arrays
    )

  return jax.jit(jax.shard_map(local_slice, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis)))
