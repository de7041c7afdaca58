"""The grain input pipeline on tiny in-memory records: transforms, batches, sharding, resume, eval padding."""

import io
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from PIL import Image

from configs import default
from privattnet_jax.data import attributes
from privattnet_jax.data import input_pipeline
from privattnet_jax.models import scoring
from privattnet_jax.inference import preprocessing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ID_BITS = 7  # Record i's labels spell i in binary over attributes 1..7, so train batches name their records.


def _gradient(height, width, offset=0):
  """RGB with red rising left to right, green rising top to bottom: crops and flips show."""
  y, x = np.mgrid[0:height, 0:width]
  red = 255 * x / (width - 1)
  green = 255 * y / (height - 1)
  blue = np.full_like(red, (40 * offset) % 256)
  return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def _jpeg(pixels, quality=95):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def _record(i, height=48, width=64):
  labels = np.zeros(attributes.NUM_ATTRIBUTES, bool)
  for bit in range(_ID_BITS):
    labels[1 + bit] = (i >> bit) & 1
  if i == 0:
    labels[0] = True  # a0_safe: scores 0.
  boxes = np.array([[0.1 * k, 0.2, 0.5 + 0.1 * k, 0.9] for k in range(i % 3)], np.float32).reshape(
    -1, 4
  )
  return {
    "image": _jpeg(_gradient(height, width, i)),
    "image_id": f"2017_{i:05d}".encode(),
    "labels": labels,
    "height": np.int32(height),
    "width": np.int32(width),
    "boxes": boxes,
  }


def _record_index(labels_row):
  return int(sum(int(labels_row[1 + bit]) << bit for bit in range(_ID_BITS)))


class ListSource:
  """A random-access source over dataset records; a stable repr, as grain's checkpoint check wants."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __repr__(self):
    return f"ListSource(n={len(self.records)})"


_RECORDS = [_record(i) for i in range(12)]


def _source(n=10):
  return ListSource(_RECORDS[:n])


def _config(batch_size=4, seed=7, **data):
  config = default.get_config()
  config.input.image_size = 32
  config.input.batch_size = batch_size
  config.seed = seed
  config.input.update(data)
  return config


def _task(config):
  """The run's score definition, as experiment_lib.Experiment builds it (the target mean is not used here)."""
  preferences = input_pipeline.score_preferences(config.score)
  return scoring.make_task(
    config.model, config.score, config.loss, np.zeros(preferences.shape[1]), preferences
  )


def _train(source, config, process_index=0, process_count=1, **kwargs):
  return input_pipeline.create_train_loader(
    source,
    config.input,
    _task(config),
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    local_device_count=1,
    **kwargs,
  )


def _eval(source, config, process_index=0, process_count=1, **kwargs):
  return list(
    input_pipeline.create_eval_batches(
      source,
      config.input,
      _task(config),
      process_index=process_index,
      process_count=process_count,
      local_device_count=1,
      **kwargs,
    )
  )


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _ids(batch):
  return [_record_index(row) for row in batch["labels"]]


_LOW = float(((0 - preprocessing.IMAGENET_MEAN) / preprocessing.IMAGENET_STD).min())
_HIGH = float(((1 - preprocessing.IMAGENET_MEAN) / preprocessing.IMAGENET_STD).max())


# --- Transforms --------------------------------------------------------------


def test_normalize_is_imagenet_normalisation():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  got = preprocessing.normalize(pixels)
  assert got.dtype == np.float32 and got.shape == (5, 7, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_resize_size_default_scales_264_over_224():
  assert input_pipeline.resize_size(_config().input) == 38  # round(32 * 264 / 224)
  config = _config()
  config.input.image_size = 224
  assert input_pipeline.resize_size(config.input) == 264
  assert input_pipeline.resize_size(_config(resize_size=40).input) == 40
  with pytest.raises(ValueError, match="resize_size"):
    input_pipeline.resize_size(_config(resize_size=0).input)


def test_crop_box_fallback_is_the_central_crop_clamped_to_ratio():
  rng = np.random.default_rng(0)
  # Full-area crops of a 3:1 frame never fit an aspect ratio <= 4/3: all ten attempts fail.
  assert input_pipeline.random_resized_crop_box(rng, 100, 300, (1.0, 1.0), (3 / 4, 4 / 3)) == (
    0,
    83,
    100,
    133,
  )
  assert input_pipeline.random_resized_crop_box(rng, 300, 100, (1.0, 1.0), (3 / 4, 4 / 3)) == (
    83,
    0,
    133,
    100,
  )
  assert input_pipeline.random_resized_crop_box(rng, 50, 50, (1.0, 1.0), (1.0, 1.0)) == (
    0,
    0,
    50,
    50,
  )


def test_crop_boxes_lie_in_the_frame_with_requested_area_and_ratio():
  rng = np.random.default_rng(1)
  boxes = np.array([input_pipeline.random_resized_crop_box(rng, 264, 264) for _ in range(2000)])
  top, left, h, w = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 264) & (left + w <= 264) & (h > 0) & (w > 0))
  area, ratio = h * w / 264**2, w / h
  assert area.min() >= 0.07 and area.max() <= 1.0 and ratio.min() > 0.7 and ratio.max() < 1.43
  assert area.min() < 0.12 and area.max() > 0.9  # the whole 0.08..1 range is used
  assert len(set(map(tuple, boxes))) > 1900
  assert np.all(
    np.array(
      [
        input_pipeline.random_resized_crop_box(rng, 264, 264, (0.5, 0.5), (1, 1))[2]
        for _ in range(50)
      ]
    )
    == round(264 * 0.5**0.5)
  )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_image_is_resize_then_crop_then_flip(seed):
  """One resampling from the original equals torchvision's resize -> crop -> resize on a smooth image."""
  pixels = _gradient(48, 64)
  data = _jpeg(pixels, quality=100)
  got = input_pipeline.train_image(data, np.random.default_rng(seed), image_size=32, resize_size=40)
  rng = np.random.default_rng(seed)
  top, left, h, w = input_pipeline.random_resized_crop_box(rng, 40, 40)
  flip = rng.random() < 0.5
  reference = Image.open(io.BytesIO(data)).convert("RGB").resize((40, 40), Image.BILINEAR)
  reference = reference.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR)
  reference = np.asarray(reference)[:, ::-1] if flip else np.asarray(reference)
  reference = preprocessing.normalize(reference)
  assert got.shape == (32, 32, 3) and got.dtype == np.float32
  # Channels: red rises along x (flips reverse it), green along y.
  assert np.abs(got - reference)[2:-2, 2:-2].mean() < 0.03
  assert np.abs(got - reference).max() < 0.35
  red_slope = np.mean(got[:, -1, 0] - got[:, 0, 0])
  assert (red_slope < 0) == flip


def test_train_flips_half_the_time_and_varies_crops():
  data = _jpeg(_gradient(48, 64))
  images = [
    input_pipeline.train_image(data, np.random.default_rng(s), image_size=16, resize_size=20)
    for s in range(200)
  ]
  flips = sum(np.mean(image[:, -1, 0] - image[:, 0, 0]) < 0 for image in images)
  assert 70 < flips < 130
  assert (
    len({image.tobytes() for image in images}) > 150
  )  # integer boxes in a 20 x 20 frame repeat a little


def test_eval_transform_is_a_plain_resize():
  pixels = _gradient(48, 64)
  data = _jpeg(pixels)
  expected = np.asarray(
    Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR)
  )
  expected = (expected / 255.0 - preprocessing.IMAGENET_MEAN) / preprocessing.IMAGENET_STD
  np.testing.assert_allclose(preprocessing.eval_image(data, 32), expected, atol=1e-5)
  np.testing.assert_allclose(
    preprocessing.preprocess_image(Image.open(io.BytesIO(data)), 32), expected, atol=1e-5
  )


def test_preprocess_image_accepts_any_mode_and_large_jpegs():
  for mode in ("L", "RGBA", "P", "CMYK"):
    image = Image.fromarray(_gradient(40, 30)).convert(mode)
    out = preprocessing.preprocess_image(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and np.all(np.isfinite(out))
  # A JPEG 16x larger than needed decodes at 1/8 scale (draft); the result matches a full decode.
  data = _jpeg(_gradient(512, 640), quality=100)
  assert preprocessing.decode_image(data, 32).size == (80, 64)
  assert preprocessing.decode_image(data, 100).size == (160, 128)  # 1/4: both sides stay >= 100
  full = Image.open(io.BytesIO(data))
  np.testing.assert_allclose(
    preprocessing.eval_image(data, 32), preprocessing.preprocess_image(full, 32), atol=0.1
  )
  assert full.size == (640, 512)  # the caller's image is left as it was


# --- Train batches -----------------------------------------------------------


def test_train_batches_shapes_dtypes_ranges_and_scores():
  config = _config(batch_size=4)
  config.score.pooling = "sum"
  batches = _take(iter(_train(_source(), config)), 5)
  preferences = input_pipeline.score_preferences(config.score)
  for batch in batches:
    assert set(batch) == {"image", "score", "labels", "mask"}
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["score"].shape == (4, 1) and batch["score"].dtype == np.float32
    assert batch["labels"].shape == (4, 68) and batch["labels"].dtype == np.float32
    assert (
      batch["mask"].shape == (4,)
      and batch["mask"].dtype == np.float32
      and np.all(batch["mask"] == 1)
    )
    assert np.all(np.isfinite(batch["image"]))
    assert _LOW - 1e-5 <= batch["image"].min() and batch["image"].max() <= _HIGH + 1e-5
    for row, record_index in enumerate(_ids(batch)):
      np.testing.assert_array_equal(batch["labels"][row], _RECORDS[record_index]["labels"])
      expected = attributes.privacy_score(_RECORDS[record_index]["labels"], preferences, "sum")
      np.testing.assert_allclose(batch["score"][row], expected, rtol=1e-6)
  assert np.ptp(batches[0]["image"]) > 1.0  # not blank


def test_per_profile_target_has_30_scores():
  config = _config()
  config.score.per_profile = True
  batch = next(iter(_train(_source(), config)))
  assert batch["score"].shape == (4, 30)
  record_index = _ids(batch)[0]
  np.testing.assert_allclose(
    batch["score"][0],
    attributes.privacy_score(
      _RECORDS[record_index]["labels"], attributes.preference_table(per_profile=True), "max"
    ),
  )


def test_each_epoch_is_a_fresh_permutation_and_the_remainder_is_dropped():
  batches = list(_train(_source(10), _config(batch_size=5), num_epochs=3))
  assert len(batches) == 6
  epochs = [sum((_ids(b) for b in batches[2 * e : 2 * e + 2]), []) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  # 10 records in batches of 4: two full batches per epoch; the last one of the run is partial and dropped.
  assert len(list(_train(_source(10), _config(batch_size=4), num_epochs=1))) == 2
  assert input_pipeline.steps_per_epoch(10, 4) == 2


def test_same_seed_same_batches_other_seed_other_batches():
  first = _take(iter(_train(_source(), _config(seed=7))), 4)
  again = _take(iter(_train(_source(), _config(seed=7))), 4)
  other = _take(iter(_train(_source(), _config(seed=8))), 4)
  for a, b in zip(first, again):
    _assert_batches_equal(a, b)
  assert [_ids(b) for b in first] != [_ids(b) for b in other]
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  assert input_pipeline.sampler_seed(7) != input_pipeline.sampler_seed(8)
  assert 0 <= input_pipeline.sampler_seed(2**40) < 2**31


def test_train_shards_are_disjoint_per_process():
  """3 processes, 10 records: each reads its own 3 (one dropped), with a third of the global batch."""
  config = _config(batch_size=6)
  seen = []
  for process_index in range(3):
    batches = list(_train(_source(10), config, process_index, 3, num_epochs=2))
    assert len(batches) == 3 and all(b["image"].shape == (2, 32, 32, 3) for b in batches)
    ids = sum((_ids(b) for b in batches), [])
    assert sorted(ids[:3]) == sorted(ids[3:])  # the same shard again in epoch two
    seen.append(set(ids))
  assert all(len(s) == 3 for s in seen) and len(set.union(*seen)) == 9
  assert input_pipeline.steps_per_epoch(10, 6) == 1  # 3 examples per process in batches of 2.


def test_resume_continues_at_the_exact_next_batch():
  config = _config()
  uninterrupted = _take(iter(_train(_source(), config)), 7)
  iterator = iter(_train(_source(), config))
  _take(iterator, 4)  # crosses the first epoch boundary (10 records, batch 4)
  state = iterator.get_state()
  resumed = iter(_train(_source(), config))
  resumed.set_state(state)
  for expected in uninterrupted[4:]:
    _assert_batches_equal(next(resumed), expected)
  # The state names the seed: restoring into a loader with another seed is refused.
  with pytest.raises(ValueError, match="Sampler"):
    iter(_train(_source(), _config(seed=8))).set_state(state)


def test_resume_through_an_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as orbax  # pylint: disable=g-import-not-at-top  (a hard dependency: never skipped)

  config = _config()
  uninterrupted = _take(iter(_train(_source(), config)), 4)
  iterator = iter(_train(_source(), config))
  _take(iterator, 3)
  checkpointer = orbax.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "iterator", args=grain.checkpoint.CheckpointSave(iterator))
  resumed = iter(_train(_source(), config))
  checkpointer.restore(tmp_path / "iterator", args=grain.checkpoint.CheckpointRestore(resumed))
  _assert_batches_equal(next(resumed), uninterrupted[3])


def test_workers_are_deterministic_and_resume_exactly():
  """Two spawn workers, absl flags unparsed in this process (pytest): same batches twice, exact resume."""
  config = _config(num_workers=2)
  iterator = iter(_train(_source(), config))
  batches = _take(iterator, 6)
  state = iterator.get_state()
  expected_next = next(iterator)
  # Each worker batches every other record of the stream: 6 batches are stream positions 0..23,
  # two whole epochs of the 10 records and 4 records of the third.
  counts = np.bincount(sum((_ids(b) for b in batches), []), minlength=10)
  assert counts.sum() == 24 and counts.min() == 2 and counts.max() == 3
  again = iter(_train(_source(), config))
  for batch in batches[:2]:
    _assert_batches_equal(next(again), batch)
  resumed = iter(_train(_source(), config))
  resumed.set_state(state)
  _assert_batches_equal(next(resumed), expected_next)
  assert batches[0]["image"].shape == (4, 32, 32, 3)


def test_workers_start_under_an_absl_app(tmp_path):
  """The production path: flags defined in __main__ (re-imported by the spawn workers) and parsed by app.run."""
  script = tmp_path / "main.py"
  script.write_text(
    textwrap.dedent(f"""
      import sys
      sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests", "data")!r}]
      from absl import app, flags
      from configs import default
      from privattnet_jax.data import input_pipeline
      import test_input_pipeline as t

      _SIZE = flags.DEFINE_integer("size", 8, "Image size.")

      def main(argv):
        config = t._config(num_workers=2)
        config.input.image_size = _SIZE.value
        batch = next(iter(t._train(t._source(), config)))
        evals = list(input_pipeline.create_eval_batches(
            t._source(),config.input, t._task(config), process_index=0, process_count=1, local_device_count=1))
        print("OK", batch["image"].shape, len(evals), type(evals[-1]["image"]).__name__)

      if __name__ == "__main__":
        app.run(main)
  """)
  )
  result = subprocess.run(
    [sys.executable, str(script), "--size=24"], capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK (4, 24, 24, 3) 3 ndarray" in result.stdout


# --- Process layout ----------------------------------------------------------


def test_per_process_batch_errors():
  with pytest.raises(ValueError, match="multiple of the process count 4"):
    _train(_source(), _config(batch_size=6), 0, 4)
  with pytest.raises(ValueError, match="multiple of the process count 4"):
    input_pipeline.create_eval_batches(
      _source(),
      _config(batch_size=6).input,
      _task(_config()),
      process_index=0,
      process_count=4,
      local_device_count=1,
    )
  with pytest.raises(ValueError, match="divisible by the 2 local devices"):
    input_pipeline.create_train_loader(
      _source(),
      _config(batch_size=6).input,
      _task(_config()),
      seed=_config(batch_size=6).seed,
      process_index=0,
      process_count=2,
      local_device_count=2,
    )
  with pytest.raises(ValueError, match="divisible by the 4 local devices"):
    input_pipeline.create_eval_batches(
      _source(),
      _config(batch_size=6).input,
      _task(_config()),
      process_index=0,
      process_count=1,
      local_device_count=4,
    )
  with pytest.raises(ValueError, match="process_index 2 is not in 0..1"):
    _train(_source(), _config(), 2, 2)
  layout = input_pipeline.process_layout(8, process_index=1, process_count=2, local_device_count=2)
  assert (layout.batch_size, layout.global_batch_size) == (4, 8)


@pytest.mark.parametrize(
  "num_rows, batch_size, process_count", [(10, 2, 3), (12, 2, 3), (5, 4, 2), (0, 3, 1)]
)
def test_process_layout_gives_every_stream_row_to_one_process(num_rows, batch_size, process_count):
  """The eval stream's layout (eval loader, feature-cache files, device eval split): the processes'
  rows partition the stream, in global batches of batch_size x process_count."""
  layouts = [
    input_pipeline.ProcessLayout(p, process_count, batch_size) for p in range(process_count)
  ]
  owned = {}
  for layout in layouts:
    count = layout.rows_of_process(num_rows, layout.process_index)
    indices = [layout.stream_index(row) for row in range(count)]
    assert all(index < num_rows for index in indices)
    if count < -(-num_rows // layout.global_batch_size) * batch_size:  # The next row is padding.
      assert layout.stream_index(count) >= num_rows
    for row, index in enumerate(indices):
      assert index not in owned
      owned[index] = (layout.process_index, row)
      assert layout.owner(index) == (layout.process_index, row)
      assert index // layout.global_batch_size == row // batch_size  # Same global batch.
  assert sorted(owned) == list(range(num_rows))


# --- Eval batches ------------------------------------------------------------


@pytest.mark.parametrize(
  "num_records, batch_size, process_count",
  [
    (10, 4, 1),
    (10, 6, 3),
    (12, 6, 3),
    (7, 6, 3),
    (1, 6, 3),
    (12, 4, 1),
    (0, 4, 2),
  ],
)
def test_eval_counts_every_example_exactly_once(num_records, batch_size, process_count):
  source = ListSource([_record(i) for i in range(num_records)])
  config = _config(batch_size=batch_size)
  preferences = input_pipeline.score_preferences(config.score)
  expected_batches = -(-num_records // batch_size)
  assert input_pipeline.num_eval_batches(num_records, batch_size) == expected_batches
  ids = []
  for process_index in range(process_count):
    batches = _eval(source, config, process_index, process_count)
    assert len(batches) == expected_batches
    for batch in batches:
      local = batch_size // process_count
      assert batch["image"].shape == (local, 32, 32, 3) and batch["image"].dtype == np.float32
      assert batch["score"].shape == (local, 1) and batch["labels"].shape == (local, 68)
      assert batch["mask"].dtype == np.float32 and batch["image_id"].dtype.kind == "U"
      assert (
        batch["boxes"].shape == (local, input_pipeline.MAX_BOXES, 4)
        and batch["num_boxes"].dtype == np.int32
      )
      for row in range(local):
        image_id = str(batch["image_id"][row])
        if batch["mask"][row] == 0:
          assert image_id == "" and batch["num_boxes"][row] == 0
          for key in ("image", "score", "labels", "boxes"):
            assert not np.any(batch[key][row]), key
          continue
        assert batch["mask"][row] == 1
        ids.append(image_id)
        record = source[int(image_id[5:])]
        np.testing.assert_array_equal(batch["labels"][row], record["labels"])
        np.testing.assert_allclose(
          batch["score"][row], attributes.privacy_score(record["labels"], preferences, "max")
        )
        n = len(record["boxes"])
        assert batch["num_boxes"][row] == n
        np.testing.assert_array_equal(batch["boxes"][row, :n], record["boxes"])
        assert not np.any(batch["boxes"][row, n:])
        np.testing.assert_allclose(
          batch["image"][row], preprocessing.eval_image(record["image"], 32)
        )
  assert sorted(ids) == [f"2017_{i:05d}" for i in range(num_records)]  # each once, across processes


def test_eval_with_workers_matches_in_process_eval():
  config = _config(batch_size=4)
  expected = _eval(_source(10), config)
  config.input.num_workers = 2
  got = _eval(_source(10), config)
  assert len(got) == len(expected) == 3
  for a, b in zip(got, expected):
    assert all(type(v) is np.ndarray for v in a.values())  # copied out of shared memory
    _assert_batches_equal(a, b)


def test_eval_decode_threads_keep_the_order():
  """The cache build decodes in one thread per core: rows must still come in source order."""
  config = _config(batch_size=4)
  expected = _eval(_source(10), config, read_threads=1)
  got = _eval(_source(10), config, read_threads=5)
  assert [list(b["image_id"]) for b in got] == [list(b["image_id"]) for b in expected]
  for a, b in zip(got, expected):
    _assert_batches_equal(a, b)


def test_eval_batch_size_override_and_box_limit():
  batches = _eval(_source(10), _config(batch_size=4), batch_size=8)
  assert [b["mask"].sum() for b in batches] == [8, 2]
  record = dict(_record(1), boxes=np.zeros((input_pipeline.MAX_BOXES + 1, 4), np.float32))
  with pytest.raises(ValueError, match="boxes"):
    _eval(ListSource([record]), _config(batch_size=4))


# --- split_scores ------------------------------------------------------------


class _LabelsOnlySource(ListSource):
  """Images that do not decode and a batched read: split_scores must read labels only, in chunks."""

  def __init__(self, records):
    super().__init__([dict(r, image=b"not a jpeg") for r in records])
    self.batched_reads = 0

  def __getitems__(self, indices):
    self.batched_reads += 1
    return [self.records[i] for i in indices]


def test_split_scores_reads_labels_only(monkeypatch):
  source = _LabelsOnlySource(_RECORDS[:10])
  scores = input_pipeline.split_scores(source, attributes.preference_table(), "max")
  labels = np.stack([r["labels"] for r in _RECORDS[:10]])
  assert scores.shape == (10, 1) and scores.dtype == np.float32 and source.batched_reads == 1
  np.testing.assert_allclose(
    scores, attributes.privacy_score(labels, attributes.preference_table(), "max")
  )
  assert scores[0, 0] == 0  # record 0 is a0_safe
  monkeypatch.setattr(input_pipeline, "_SCORE_CHUNK", 4)  # reads of 4, 4 and 2 records
  source.batched_reads = 0
  np.testing.assert_array_equal(
    input_pipeline.split_scores(source, attributes.preference_table(), "max"), scores
  )
  assert source.batched_reads == 3
  per_profile = input_pipeline.split_scores(
    ListSource(source.records), attributes.preference_table(per_profile=True), "mean"
  )
  np.testing.assert_allclose(
    per_profile,
    attributes.privacy_score(labels, attributes.preference_table(per_profile=True), "mean"),
  )
  with pytest.raises(ValueError, match="labels have shape"):
    input_pipeline.split_scores(
      ListSource([dict(_RECORDS[1], labels=np.zeros(67, bool))]),
      attributes.preference_table(),
      "max",
    )


# --- The TFDS `vispr` source (the tiny synthetic build the training tests share) ---


def test_tfds_vispr_records_flow_through(tiny_data_dir):
  from privattnet_jax import data  # pylint: disable=g-import-not-at-top
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(tiny_data_dir)
  sources = data.load_data_sources(config.data)
  iterator = iter(_train(sources["train"], config))
  batch = _take(iterator, 2)[0]
  assert batch["image"].shape == (config.input.batch_size, 32, 32, 3) and batch["score"].shape == (
    config.input.batch_size,
    1,
  )
  state = iterator.get_state()
  resumed = iter(
    _train(data.load_data_sources(config.data)["train"], config)
  )  # a new source object, same repr
  resumed.set_state(state)
  _assert_batches_equal(next(resumed), next(iterator))

  test = sources["test"]
  records = {test[i]["image_id"].decode(): test[i] for i in range(len(test))}
  seen = []
  for process_index in range(2):
    for batch in _eval(test, config, process_index, 2):
      for row in np.flatnonzero(batch["mask"]):
        record = records[str(batch["image_id"][row])]
        n = len(record["boxes"])
        assert batch["num_boxes"][row] == n
        np.testing.assert_array_equal(batch["boxes"][row, :n], record["boxes"])
        seen.append(str(batch["image_id"][row]))
  assert sorted(seen) == sorted(records)
  assert any(len(r["boxes"]) for r in records.values())
