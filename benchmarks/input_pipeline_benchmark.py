"""Input-pipeline throughput: images/s at 224 px from a 256-px build, by worker or thread count.

  python -m benchmarks.input_pipeline_benchmark                       # 0 and 2 workers
  python -m benchmarks.input_pipeline_benchmark --workers=0,2,4 --batch_size=128
  python -m benchmarks.input_pipeline_benchmark --source=memory      # no TFDS, records in a list
  python -m benchmarks.input_pipeline_benchmark --loader=eval --threads=1,2   # the cache build's stream

`--loader=train` (default) times the train loader (decode, random resized crop, flip) by grain
worker count; `--loader=eval` times the eval stream (decode, resize to 224) that the feature-cache
build and the evaluation passes read, by decode-thread count (no workers).

The images are photo-like JPEGs (gradients, shapes, texture, sensor noise; ~30
KB at quality 90) with the shorter side 256 px and aspect ratios 4:3, 3:2, 1:1
and portrait, as the `max256` build stores VISPR's photos. `--source=tfds`
(default) lays them out as a VISPR download (the synthetic generator's
annotations, with these images put in place of its drawings), builds the real
`vispr` TFDS builder into a temporary folder and reads its array_record files,
so the figure includes the record reads; `--source=memory` holds the same
records in a list. Prints one line per worker count: images/s, the CPU the
process tree used (cores busy), images per CPU-second (the per-core figure),
the cores other processes kept busy meanwhile, and the transform alone on one
core as the ceiling. Run it on quiet cores: other work distorts the figures.
"""

import io
import json
import os
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

from configs import default
from privattnet_jax.data import attributes
from privattnet_jax.data import input_pipeline
from privattnet_jax.models import scoring

flags.DEFINE_enum(
  "source", "tfds", ["tfds", "memory"], "Read a real TFDS build, or records in a list."
)
flags.DEFINE_enum("loader", "train", ["train", "eval"], "The train loader, or the eval stream.")
flags.DEFINE_list("workers", ["0", "2"], "train: grain worker counts to measure.")
flags.DEFINE_list(
  "threads", [], "eval: decode-thread counts to measure; empty: the default (one per core)."
)
flags.DEFINE_integer("image_size", 224, "Train crop size.")
flags.DEFINE_integer("build_size", 256, "Shorter side of the stored JPEGs.")
flags.DEFINE_integer("num_images", 512, "Distinct stored images (the epoch).")
flags.DEFINE_integer("batch_size", 64, "Global batch (one process).")
flags.DEFINE_integer("warmup_batches", 4, "Batches before timing starts (worker start-up).")
flags.DEFINE_integer("batches", 40, "Timed batches per worker count.")
flags.DEFINE_integer("quality", 90, "JPEG quality of the stored images.")
flags.DEFINE_integer("seed", 0, "Seed of the generated images.")
FLAGS = flags.FLAGS

_ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (2, 3))


def photo_like_jpeg(rng: np.random.Generator, shorter: int, quality: int) -> bytes:
  """A JPEG whose size and decode cost resemble a photo's: gradient, shapes, texture, noise."""
  a, b = _ASPECTS[rng.integers(len(_ASPECTS))]
  width, height = (shorter * a // b, shorter) if a >= b else (shorter, shorter * b // a)
  coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(8, 20)):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
  image = image.filter(ImageFilter.GaussianBlur(1.5))
  texture = rng.normal(0.0, 9.0, (height, width, 1)) + rng.normal(0.0, 3.0, (height, width, 3))
  pixels = np.clip(np.asarray(image, np.float32) + texture, 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


class InMemorySource:
  """Dataset records (design.md) in a list; a stable repr keeps grain's checkpoint check happy."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]

  def __repr__(self):
    return f"InMemorySource(n={len(self._records)})"


def make_memory_source(num_images: int, shorter: int, quality: int, seed: int) -> InMemorySource:
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num_images):
    labels = np.zeros(attributes.NUM_ATTRIBUTES, bool)
    labels[rng.integers(0, attributes.NUM_ATTRIBUTES, rng.integers(1, 4))] = True
    data = photo_like_jpeg(rng, shorter, quality)
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
    records.append(
      {
        "image": data,
        "image_id": f"bench_{i:05d}".encode(),
        "labels": labels,
        "height": np.int32(height),
        "width": np.int32(width),
        "boxes": np.zeros((0, 4), np.float32),
      }
    )
  return InMemorySource(records)


def make_tfds_source(root: pathlib.Path, num_images: int, shorter: int, quality: int, seed: int):
  """The train split of a real `vispr` build over a VISPR layout holding photo-like images."""
  from privattnet_jax.data import synthetic, vispr  # pylint: disable=g-import-not-at-top

  manual_dir = synthetic.generate(root / "vispr", num_images, 1, 1, seed, image_size=32)
  rng = np.random.default_rng(seed)
  for annotation in sorted((manual_dir / "annotations" / "train2017").glob("*.json")):
    image_path = json.loads(annotation.read_text())["image_path"]
    (manual_dir / image_path).write_bytes(photo_like_jpeg(rng, shorter, quality))
  builder = vispr.prepare(manual_dir, root / "tfds", "max256", splits_dir=manual_dir)
  return vispr.data_sources(builder)["train"]


def tree_cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live children (grain workers), from /proc."""
  ticks = os.sysconf("SC_CLK_TCK")
  me = os.getpid()
  total = 0.0
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    pid, ppid = int(entry), int(fields[1])
    if pid == me or ppid == me:
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
  return total


def machine_busy_seconds() -> float:
  """CPU seconds all processes on the machine have used (non-idle time in /proc/stat)."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:9]]
  return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def transform_ceiling(source, config, repeats: int = 2) -> float:
  """Images/s of the transform (train or eval) alone, in this process, on one core."""
  transform = input_pipeline.TrainTransform(
    image_size=config.input.image_size,
    resize_size=input_pipeline.resize_size(config.input),
    crop_scale=config.input.crop_scale,
    crop_ratio=config.input.crop_ratio,
    preferences=input_pipeline.score_preferences(config.score),
    pooling=config.score.pooling,
  )
  eval_transform = input_pipeline.EvalTransform(
    image_size=config.input.image_size,
    preferences=input_pipeline.score_preferences(config.score),
    pooling=config.score.pooling,
  )
  records = [source[i] for i in range(len(source))]
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for _ in range(repeats):
    for record in records:
      if FLAGS.loader == "train":
        transform.random_map(record, rng)
      else:
        eval_transform.map(record)
  return repeats * len(records) / (time.perf_counter() - start)


def eval_stream(source, config, task, threads: int | None):
  """Eval passes over `source` one after another, as one stream of batches."""
  while True:
    yield from input_pipeline.create_eval_batches(
      source,
      config.input,
      task,
      process_index=0,
      process_count=1,
      local_device_count=1,
      read_threads=threads,
    )


def measure(source, config, threads: int | None = None) -> tuple[float, float, float]:
  """(images/s, cores busy here, cores busy elsewhere) over FLAGS.batches batches after the warm-up."""
  preferences = input_pipeline.score_preferences(config.score)
  task = scoring.make_task(
    config.model, config.score, config.loss, np.zeros(preferences.shape[1]), preferences
  )
  if FLAGS.loader == "train":
    loader = input_pipeline.create_train_loader(
      source,
      config.input,
      task,
      seed=config.seed,
      process_index=0,
      process_count=1,
      local_device_count=1,
    )
  else:
    loader = eval_stream(source, config, task, threads)
  iterator = iter(loader)
  for _ in range(FLAGS.warmup_batches):
    next(iterator)
  cpu_start, machine_start, start = tree_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(iterator)
    assert batch["image"].shape == (
      config.input.batch_size,
      config.input.image_size,
      config.input.image_size,
      3,
    )
  elapsed = time.perf_counter() - start
  cores_busy = (tree_cpu_seconds() - cpu_start) / elapsed
  machine_busy = (machine_busy_seconds() - machine_start) / elapsed
  del batch, iterator, loader
  return (
    FLAGS.batches * config.input.batch_size / elapsed,
    cores_busy,
    max(machine_busy - cores_busy, 0.0),
  )


def main(argv):
  del argv
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    if FLAGS.source == "tfds":
      source = make_tfds_source(
        pathlib.Path(root), FLAGS.num_images, FLAGS.build_size, FLAGS.quality, FLAGS.seed
      )
    else:
      source = make_memory_source(FLAGS.num_images, FLAGS.build_size, FLAGS.quality, FLAGS.seed)
    run(source, time.perf_counter() - start)


def run(source, setup_seconds: float) -> None:
  mean_kb = np.mean([len(source[i]["image"]) for i in range(len(source))]) / 1024
  config = default.get_config()
  config.input.image_size = FLAGS.image_size
  config.input.batch_size = FLAGS.batch_size
  print(
    f"cpus={os.cpu_count()} load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())} "
    f"loader={FLAGS.loader} source={FLAGS.source} images={len(source)} (shorter side {FLAGS.build_size} px, mean {mean_kb:.1f} KB, "
    f"ready in {setup_seconds:.1f} s) crop={config.input.image_size} "
    f"resize={input_pipeline.resize_size(config.input)} batch={config.input.batch_size}"
  )
  ceiling = transform_ceiling(source, config)
  print(f"transform alone (1 core, no grain): {ceiling:7.1f} img/s  ({1000 / ceiling:.2f} ms/img)")
  if FLAGS.loader == "train":
    settings = [(f"workers={w}", int(w), None) for w in FLAGS.workers]
  else:
    settings = [
      (f"threads={t or input_pipeline.decode_threads()}", 0, t)
      for t in ([int(t) for t in FLAGS.threads] or [None])
    ]
  for name, workers, threads in settings:
    config.input.num_workers = workers
    images_per_second, cores_busy, others = measure(source, config, threads)
    print(
      f"{name}: {images_per_second:7.1f} img/s  cores busy {cores_busy:4.2f}  "
      f"per core {images_per_second / max(cores_busy, 1e-9):7.1f} img/s  "
      f"per available core {images_per_second / os.cpu_count():7.1f} img/s  "
      f"(other processes: {others:4.2f} cores)"
    )
  print(f"load_avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  app.run(main)
