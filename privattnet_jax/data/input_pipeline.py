"""The grain input pipeline: decode, augment, normalise, score, batch, shard.

Records are the dataset records of docs/design.md (`image` as encoded JPEG
bytes, `image_id`, multi-hot `labels`, `boxes`, ...), read from any random-access
source (the TFDS `vispr` data source, or a list in tests). The privacy score is
computed here from the labels and a preference table, so one dataset build
serves every score definition (see `privattnet_jax/data/attributes.py`).

Train (`create_train_loader`): a `grain.DataLoader` that shards the records per
JAX process, shuffles them afresh every epoch, decodes, takes a random resized
crop (torchvision's algorithm) of the image resized to `resize_size` squared,
flips horizontally with p = 0.5 and normalises with ImageNet statistics. The
resize and the crop are one PIL `resize(box=...)` call on the original pixels
(one resampling instead of two). Shuffling and augmentation depend only on the
seed and the position in the stream: each record's generator is grain's
`Philox(key=sampler_seed + global_index)`, the index counting across epochs.
Its iterator state is checkpointable (`get_state`/`set_state`, or orbax through
`grain.checkpoint.CheckpointSave/CheckpointRestore`), so a resumed run continues
at the exact next batch.

Eval (`create_eval_batches`): one pass over every record, resized to
`image_size` squared; the last global batch is padded with `mask` 0 rows, and
every process yields `ceil(N / global_batch)` batches, so each example counts
exactly once across processes and no process waits on another.

Worker processes (`config.input.num_workers > 0`) are started with `spawn`: each
re-imports the main module (guard its entry point with
`if __name__ == "__main__":`), so its absl flags are defined again but never
parsed there. The transforms here hold plain values taken from the config and
read no flag, so workers do not depend on flag parsing. grain itself reads an
absl flag in the parent when it starts workers, so parse flags (`app.run`)
before creating a loader; outside an absl app (tests, notebooks) the loaders
mark the flags parsed with their defaults, with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np
from PIL import Image

from privattnet_jax.data import attributes
from privattnet_jax.inference import preprocessing


MAX_BOXES = 16  # Eval batches carry boxes zero-padded to this many per image.


# The paper resizes to 264 before cropping 224; other image sizes keep the ratio.
_REFERENCE_RESIZE, _REFERENCE_CROP = 264, 224


_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.


# Train: grain threads reading encoded records (~30 KB each) ahead of the transform, in
# each process. grain polls every buffered read per element, so the buffer stays small.
_READ_THREADS, _READ_AHEAD = 4, 16


_SCORE_CHUNK = 1024  # split_scores: records per read; bounds the (chunk, 68, P) score intermediate.


def score_preferences(score) -> np.ndarray:
  """The (68, P) preference table the `score` config section selects (P = 1, or 30 per profile)."""
  return attributes.preference_table(
    score.source,
    profile_index=score.profile_index,
    preferences_file=score.preferences_file,
    per_profile=score.per_profile,
    missing_value=score.missing_value,
  )


def split_scores(source, preferences: np.ndarray, pooling: str) -> np.ndarray:
  """The (N, P) float32 privacy scores of every record of `source`, in source order.

  Reads the labels only: the records' images stay encoded, so this is cheap
  enough to run at start-up for the training mean of the target.
  """
  scores = np.zeros((len(source), preferences.shape[1]), dtype=np.float32)
  for start, labels in _label_chunks(source):
    scores[start : start + len(labels)] = attributes.privacy_score(labels, preferences, pooling)
  return scores


def split_labels(source) -> np.ndarray:
  """The (N, 68) bool labels of every record of `source`, in source order (read as split_scores)."""
  labels = np.zeros((len(source), attributes.NUM_ATTRIBUTES), dtype=bool)
  for start, chunk in _label_chunks(source):
    labels[start : start + len(chunk)] = chunk
  return labels


def _label_chunks(source):
  """(first row, (n, 68) bool labels) for `source`'s records, _SCORE_CHUNK at a time."""
  for start in range(0, len(source), _SCORE_CHUNK):
    indices = list(range(start, min(start + _SCORE_CHUNK, len(source))))
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(indices)
    else:
      records = [source[i] for i in indices]
    yield start, np.stack([_labels(record) for record in records])


def example_targets(element, preferences: np.ndarray, pooling: str) -> dict[str, np.ndarray]:
  """A real example's `score`, `labels` and `mask`: every batch's keys beside the model input."""
  labels = _labels(element)
  return {
    "score": attributes.privacy_score(labels, preferences, pooling),
    "labels": labels.astype(np.float32),
    "mask": np.float32(1.0),
  }


def _labels(record) -> np.ndarray:
  labels = np.asarray(record["labels"], dtype=bool)
  if labels.shape != (attributes.NUM_ATTRIBUTES,):
    raise ValueError(
      f"record {record.get('image_id')!r}: labels have shape {labels.shape}, "
      f"expected ({attributes.NUM_ATTRIBUTES},)"
    )
  return labels


def resize_size(input_config) -> int:
  """The train resize before the random crop: `input.resize_size`, or 264/224 of the crop."""
  size = input_config.resize_size
  if size == -1:
    size = round(input_config.image_size * _REFERENCE_RESIZE / _REFERENCE_CROP)
  if size <= 0:
    raise ValueError(f"input.resize_size must be positive or -1, got {input_config.resize_size}")
  return int(size)


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the crop.

  Ten attempts at a crop of random area fraction in `scale` and random
  log-uniform aspect ratio in `ratio` that fits; otherwise the central crop
  clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_image(
  data: bytes,
  rng: np.random.Generator,
  *,
  image_size: int,
  resize_size: int,
  crop_scale: Sequence[float] = (0.08, 1.0),
  crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Encoded image -> float32 (S, S, 3): resize to R x R, random resized crop to S, flip, normalise.

  The crop is drawn in the R x R frame (as torchvision would, after the
  resize) and mapped back to the decoded image, so resize, crop and rescale
  are one bilinear resampling of the original pixels.
  """
  image = preprocessing.decode_image(data, resize_size)
  top, left, h, w = random_resized_crop_box(rng, resize_size, resize_size, crop_scale, crop_ratio)
  sx, sy = image.width / resize_size, image.height / resize_size
  box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return preprocessing.normalize(np.asarray(image))


class TrainTransform(grain.transforms.RandomMap):
  """Record -> {image, score, labels, mask}; `rng` is the record's own generator from grain."""

  def __init__(self, *, image_size, resize_size, crop_scale, crop_ratio, preferences, pooling):
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
      raise ValueError(f"input.crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
    if not (0 < crop_ratio[0] <= crop_ratio[1]):
      raise ValueError(f"input.crop_ratio must satisfy 0 < lo <= hi, got {tuple(crop_ratio)}")
    self.image_size = int(image_size)
    self.resize_size = int(resize_size)
    self.crop_scale = tuple(float(s) for s in crop_scale)
    self.crop_ratio = tuple(float(r) for r in crop_ratio)
    self.preferences = np.asarray(preferences, dtype=np.float32)
    self.pooling = str(pooling)

  def image(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    """One augmented view of encoded image bytes (also the feature cache's train views)."""
    return train_image(
      data,
      rng,
      image_size=self.image_size,
      resize_size=self.resize_size,
      crop_scale=self.crop_scale,
      crop_ratio=self.crop_ratio,
    )

  def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
    targets = example_targets(element, self.preferences, self.pooling)
    return {"image": self.image(element["image"], rng), **targets}


class EvalTransform(grain.transforms.Map):
  """Record (or `{}`, a padding row) -> {image, score, labels, mask, image_id, boxes, num_boxes}.

  Subclasses change the model input (`input_key`, `model_input`, `padding_input`), e.g. the
  feature cache's cached features or augmented views; the other keys stay the same.
  """

  input_key = "image"

  def __init__(self, *, image_size, preferences, pooling):
    self.image_size = int(image_size)
    self.preferences = np.asarray(preferences, dtype=np.float32)
    self.pooling = str(pooling)

  def model_input(self, element) -> np.ndarray:
    return preprocessing.eval_image(element["image"], self.image_size)

  def padding_input(self) -> np.ndarray:
    return np.zeros((self.image_size, self.image_size, 3), np.float32)

  def map(self, element) -> dict[str, np.ndarray]:
    num_outputs = self.preferences.shape[1]
    if not element:
      return {
        self.input_key: self.padding_input(),
        "score": np.zeros((num_outputs,), np.float32),
        "labels": np.zeros((attributes.NUM_ATTRIBUTES,), np.float32),
        "mask": np.float32(0.0),
        "image_id": np.str_(""),
        "boxes": np.zeros((MAX_BOXES, 4), np.float32),
        "num_boxes": np.int32(0),
      }
    image_id = element["image_id"]
    if isinstance(image_id, bytes):
      image_id = image_id.decode("utf-8")
    boxes = np.asarray(element.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
    if len(boxes) > MAX_BOXES:
      raise ValueError(
        f"record {image_id!r} has {len(boxes)} boxes; eval batches hold at most {MAX_BOXES}"
      )
    padded_boxes = np.zeros((MAX_BOXES, 4), np.float32)
    padded_boxes[: len(boxes)] = boxes
    return {
      self.input_key: self.model_input(element),
      **example_targets(element, self.preferences, self.pooling),
      "image_id": np.str_(image_id),
      "boxes": padded_boxes,
      "num_boxes": np.int32(len(boxes)),
    }


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
  """Where this process sits: its index, the process count and its share of the global batch.

  The one place of the padded eval stream's row layout: global batch b holds stream rows
  [b x G, (b + 1) x G) and process p its slice [b x G + p x B, b x G + (p + 1) x B) (G global,
  B per process). The eval loader, the feature cache's per-process files and the device-resident
  eval split (with devices as the "processes") all lay rows out through it.
  """

  process_index: int
  process_count: int
  batch_size: int  # Per process.

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.process_count

  def stream_index(self, row: int) -> int:
    """The stream row of this process's `row`-th row."""
    batch, offset = divmod(row, self.batch_size)
    return batch * self.global_batch_size + self.process_index * self.batch_size + offset

  def owner(self, index: int) -> tuple[int, int]:
    """(process, that process's row) of stream row `index`: the inverse of `stream_index`."""
    batch, rest = divmod(index, self.global_batch_size)
    process, offset = divmod(rest, self.batch_size)
    return process, batch * self.batch_size + offset

  def rows_of_process(self, num_rows: int, process: int) -> int:
    """How many of the first `num_rows` stream rows belong to `process`."""
    full, rest = divmod(num_rows, self.global_batch_size)
    return full * self.batch_size + min(self.batch_size, max(0, rest - process * self.batch_size))


def process_layout(
  global_batch_size: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  local_device_count: int | None = None,
) -> ProcessLayout:
  """Splits the global batch across processes; None: ask JAX (tests pass explicit values)."""
  if process_index is None or process_count is None or local_device_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # Workers unpickling transforms skip it.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = (
      jax.local_device_count() if local_device_count is None else local_device_count
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"batch_size {global_batch_size} (global) must be a positive multiple of the "
      f"process count {process_count}"
    )
  batch_size = global_batch_size // process_count
  if batch_size % local_device_count:
    raise ValueError(
      f"the per-process batch {batch_size} (batch_size {global_batch_size} / {process_count} "
      f"processes) must be divisible by the {local_device_count} local devices"
    )
  return ProcessLayout(process_index, process_count, batch_size)


def sampler_seed(seed: int) -> int:
  """A well-mixed 31-bit seed for grain's sampler.

  grain keys epoch e's shuffle by `seed + e` and record i's generator by
  `seed + i`; mixing keeps runs with neighbouring `config.seed`s unrelated.
  """
  return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0] >> 1)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global train batches per epoch (batches run across epoch boundaries: create_train_loader).

  Each of P processes reads floor(N / P) examples in batches of G / P, which makes the same count:
  floor(floor(N / P) / (G / P)) = floor(N / G).
  """
  return num_examples // global_batch_size


def create_train_loader(
  source,
  input_config,
  task,
  *,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  local_device_count: int | None = None,
  num_epochs: int | None = None,
  transform: grain.transforms.Map | grain.transforms.RandomMap | None = None,
  views_per_example: int = 1,
) -> grain.DataLoader:
  """The train loader over `source`; iterate it for per-process batches (design.md, Batches).

  Each process reads its own contiguous 1/process_count of the examples
  (the remainder of N / process_count is dropped), shuffled afresh every
  epoch. `num_epochs` None repeats forever. Batches run across epoch
  boundaries; with a finite `num_epochs` the final partial batch is dropped.

  `task` is the run's score definition (`scoring.Task`: its `preferences` and `pooling`).
  `transform` replaces the image transform (`train_transform(input_config, task)`), e.g. to read
  cached features. With `views_per_example` V > 1, `source` holds V records per
  example (record i * V + v is view v of example i) and every draw of an example
  reads one view, chosen from the seed and the stream position (see `ViewSampler`).

  `iter(loader)` is a `grain.DataLoaderIterator`: `get_state()` / `set_state()`
  (JSON bytes) or `grain.checkpoint.CheckpointSave/CheckpointRestore` with
  orbax. Restoring checks that the seed, the sharding, the worker count and
  `repr(source)` match. The batch composition depends on
  `input_config.num_workers` (each worker batches its own share of the
  stream), so keep the worker count when resuming.
  """
  layout = process_layout(
    input_config.batch_size,
    process_index=process_index,
    process_count=process_count,
    local_device_count=local_device_count,
  )
  if input_config.num_workers > 0:
    _ensure_flags_parsed()
  if views_per_example < 1 or len(source) % views_per_example:
    raise ValueError(f"{len(source)} records are not {views_per_example} views per example")
  num_examples = len(source) // views_per_example
  if num_examples < layout.process_count:
    raise ValueError(
      f"{num_examples} examples cannot be sharded across {layout.process_count} processes"
    )
  shard_options = grain.sharding.ShardOptions(
    shard_index=layout.process_index, shard_count=layout.process_count, drop_remainder=True
  )
  sampler = grain.samplers.IndexSampler(
    num_records=num_examples,
    shard_options=shard_options,
    shuffle=True,
    num_epochs=num_epochs,
    seed=sampler_seed(seed),
  )
  if views_per_example > 1:
    sampler = ViewSampler(sampler, views_per_example, sampler_seed(seed))
  batch = grain.transforms.Batch(layout.batch_size, drop_remainder=True)
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[transform or train_transform(input_config, task), batch],
    worker_count=input_config.num_workers,
    worker_buffer_size=input_config.prefetch_buffer_size,
    shard_options=shard_options,
    read_options=grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD),
  )


def train_transform(input_config, task) -> TrainTransform:
  """The image train transform of the `input` section, scoring with `task`'s preference table.

  Decode, random resized crop, flip, normalise; the score pools with `task`'s pooling.
  """
  return TrainTransform(
    image_size=input_config.image_size,
    resize_size=resize_size(input_config),
    crop_scale=input_config.crop_scale,
    crop_ratio=input_config.crop_ratio,
    preferences=task.preferences,
    pooling=task.pooling,
  )


class ViewSampler:
  """An `IndexSampler` over examples, reading one of V stored views per draw (record i * V + v).

  The view depends only on the seed and the draw's position in the stream, so a run is
  reproducible and resumes exactly; each draw picks a view uniformly, like online augmentation
  drawing from V precomputed augmentations.
  """

  def __init__(self, sampler: grain.samplers.IndexSampler, views: int, seed: int):
    self._sampler = sampler
    self._views = int(views)
    self._seed = int(seed)

  def __len__(self) -> int:
    return len(self._sampler)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    metadata = self._sampler[index]
    view = (
      int(np.random.SeedSequence([self._seed, metadata.index]).generate_state(1)[0]) % self._views
    )
    return grain.RecordMetadata(
      index=metadata.index, record_key=metadata.record_key * self._views + view, rng=metadata.rng
    )

  def __repr__(self) -> str:
    return f"ViewSampler({self._sampler!r}, views={self._views}, seed={self._seed})"


class _EvalRows:
  """This process's rows of the padded eval stream (`ProcessLayout`): a record, or `{}` for padding.

  Padding rows are the indices >= N; `{}`, not None, which grain's MapDataset treats as filtered
  out.
  """

  def __init__(self, source, layout: ProcessLayout, num_batches: int):
    self._source = source
    self._layout = layout
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches * self._layout.batch_size

  def __getitem__(self, row: int):
    index = self._layout.stream_index(row)
    return self._source[index] if index < len(self._source) else {}

  def __repr__(self) -> str:
    return f"_EvalRows({self._source!r}, {self._layout}, num_batches={self._num_batches})"


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Batches every process yields in one eval pass: ceil(N / global batch)."""
  return -(-num_examples // global_batch_size)


def create_eval_batches(
  source,
  input_config,
  task,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  local_device_count: int | None = None,
  batch_size: int | None = None,
  transform: EvalTransform | None = None,
  read_threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `source` in per-process batches, the last padded with `mask` 0.

  Every process yields `num_eval_batches(len(source), global batch)` batches,
  and each record appears in exactly one row with mask 1 across all
  processes. Batches also carry host-side `image_id` (str), `boxes`
  (B, MAX_BOXES, 4) and `num_boxes`. `batch_size` overrides the global
  `input_config.batch_size`; `task` scores the rows (as in `create_train_loader`); `transform` replaces
  the image transform (the feature cache's transforms); `read_threads` the decode threads
  (default: `decode_threads()`; with workers, two per worker). Argument errors raise here, not at
  the first `next`.
  """
  layout = process_layout(
    input_config.batch_size if batch_size is None else batch_size,
    process_index=process_index,
    process_count=process_count,
    local_device_count=local_device_count,
  )
  rows = _EvalRows(source, layout, num_eval_batches(len(source), layout.global_batch_size))
  transform = transform or EvalTransform(
    image_size=input_config.image_size,
    preferences=task.preferences,
    pooling=task.pooling,
  )
  dataset = grain.MapDataset.source(rows).map(transform)
  copy = input_config.num_workers > 0
  if copy:
    # Workers take whole batches in turn, so the order and the batch shapes do not
    # depend on the worker count; each assembles its batches in two read threads.
    stream = dataset.batch(layout.batch_size).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    )
    _ensure_flags_parsed()
    stream = stream.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=input_config.num_workers,
        per_worker_buffer_size=input_config.prefetch_buffer_size,
      )
    )
  else:
    # Rows are decoded and resized in one read thread per core (PIL works without
    # the GIL) and batched in order: the feature-cache build and the evaluation
    # passes run at the host's decode rate while the device computes.
    threads = decode_threads() if read_threads is None else read_threads
    stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    ).batch(layout.batch_size)
  return _iterate_and_close(stream, copy) if len(rows) else iter(())


def decode_threads() -> int:
  """Eval-stream read threads: one per core this process may run on."""
  return max(len(os.sched_getaffinity(0)), 2)


def _iterate_and_close(stream, copy: bool) -> Iterator[dict[str, np.ndarray]]:
  """Yields the batches, as plain arrays when `copy`; closes the iterator however the loop ends.

  Workers hand over shared-memory arrays, which callers keeping host-side keys for a whole pass
  would otherwise pin.
  """
  iterator = iter(stream)
  try:
    for batch in iterator:
      yield {key: np.array(value) for key, value in batch.items()} if copy else batch
  finally:
    iterator.close()


def _ensure_flags_parsed() -> None:
  """grain reads an absl flag when it starts workers; unparsed flags would raise there."""
  if not flags.FLAGS.is_parsed():
    logging.warning(
      "absl flags are not parsed; marking them parsed with their defaults so that grain "
      "can start its workers (parse flags first, e.g. with absl.app.run)."
    )
    flags.FLAGS.mark_as_parsed()
