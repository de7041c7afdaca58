"""Head training from the frozen-encoder feature cache against the image path, and a full run's cost.

  python -m benchmarks.feature_cache_benchmark          # CPU: 224 px, ResNet-50 to conv4_x, batch 32
  python -m benchmarks.feature_cache_benchmark --synthetic_features --batch_size=256 \
      --dtype=bfloat16 --num_images=10000 --full_run_epochs=100          # a GPU, VISPR-sized

Image mode (default): generates a synthetic VISPR-format dataset of --num_images JPEGs
(--source_size px), builds the feature cache of its train split with `feature_cache.ensure`,
then times head training both ways through the real loaders: images (grain decode + random
resized crop + flip, frozen encoder forward, head forward/backward) and cached features (grain
read of array_record records, head forward/backward). Synthetic-features mode skips the images:
an in-memory VISPR-sized feature set is read through the same grain transform, and also held
on the devices as `feature_cache.mode='device'` holds it, each batch gathered inside the train step
(no host pipeline at all); --full_run_epochs then runs that many real epochs of head training.

Both modes print XLA's FLOPs per image of each train step (compiled cost analysis), the
step-only rates (one device-resident batch, repeated) beside the loader-fed rates, the bytes
per cached image, and the cost of one full PrivAttNet run from the measured rates: the
--project_encode images encoded once, then --project_epochs epochs over --project_train from
the cache (the per-epoch validation pass is not included).
"""

import functools
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from benchmarks import common
from configs import privattnet
from privattnet_jax import data as data_lib
from privattnet_jax.training import device_features
from privattnet_jax.training import feature_cache
from privattnet_jax.cli import host_memory
from privattnet_jax.data import input_pipeline
from privattnet_jax.training import train_steps

flags.DEFINE_integer("image_size", 224, "Crop side in pixels (the grid is image_size / 16).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("steps", 6, "Steps per timed window, after two warm-up steps.")
flags.DEFINE_integer(
  "windows", 3, "Timed windows per measurement; the best is reported (the cores are shared)."
)
flags.DEFINE_integer(
  "num_images", 256, "Training images (image mode) or feature records (synthetic mode)."
)
flags.DEFINE_integer(
  "source_size", 256, "Side of the generated JPEGs (VISPR's max256 build: shorter side 256)."
)
flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (config.model.half_precision)."
)
flags.DEFINE_enum("cache_dtype", "bfloat16", list(feature_cache.DTYPES), "Stored feature dtype.")
flags.DEFINE_bool(
  "synthetic_features", False, "Skip the images: time the cache path on a synthetic feature set."
)
flags.DEFINE_integer(
  "full_run_epochs", 0, "Synthetic mode: run this many epochs from device-resident features."
)
flags.DEFINE_string("workdir", "", "Where the dataset and cache go; empty: a temporary folder.")
flags.DEFINE_integer(
  "project_encode", 22167, "Full-run projection: images encoded once (VISPR: all splits)."
)
flags.DEFINE_integer("project_train", 10000, "Full-run projection: training images per epoch.")
flags.DEFINE_integer("project_epochs", 100, "Full-run projection: epochs.")
FLAGS = flags.FLAGS


def make_config(workdir: pathlib.Path):
  config = privattnet.get_config()  # ResNet-50 to conv4_x, frozen: the paper's model.
  config.input.image_size = FLAGS.image_size
  config.input.batch_size = FLAGS.batch_size
  config.model.half_precision = FLAGS.dtype == "bfloat16"
  config.model.encoder.batchnorm = "frozen"
  config.data.data_dir = str(workdir / "data")
  config.data.synthetic.num_train = FLAGS.num_images
  config.data.synthetic.num_val = config.data.synthetic.num_test = 8
  config.data.synthetic.image_size = FLAGS.source_size
  config.feature_cache.mode = "host"
  config.feature_cache.dtype = FLAGS.cache_dtype
  config.feature_cache.splits = ("train",)
  config.feature_cache.dir = str(workdir / "feature_cache")
  return config


def flops_per_image(lowered) -> float:
  """XLA's FLOPs per image of the lowered (unoptimised) HLO: the compiled module's count omits
  library calls (cuBLAS/cuDNN on a GPU), so it is backend-dependent and far too small there."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / FLAGS.batch_size


def timed_rate(step, state, next_batch):
  """Images/s of the best of --windows windows of --steps steps fed by `next_batch()`, dispatched
  as the train loop does (the best: other jobs' bursts on shared cores only slow a window down)."""
  for _ in range(2):
    state, metrics = step(state, next_batch())
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(FLAGS.windows):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
  return max(rates), state


def copy_state(state):
  return jax.tree_util.tree_map(lambda x: x.copy(), state)  # The train step donates its state.


def synthetic_feature_records(num: int, shape, dtype, rng) -> list:
  """`num` cache-like records over a pool of distinct feature maps (the loader copies them anyway)."""
  pool = [rng.standard_normal(shape, np.float32).astype(dtype) for _ in range(min(num, 256))]
  labels = rng.uniform(size=(num, 68)) < 0.1
  return [
    {
      "features": pool[i % len(pool)],
      "labels": labels[i],
      "image_id": f"synthetic_{i}",
      "boxes": np.zeros((0, 4), np.float32),
    }
    for i in range(num)
  ]


def device_resident_rate(state, mesh, task, config, num: int, shape, dtype, epochs: int):
  """Head training as `feature_cache.mode='device'` runs it (`device_features`: features held on the
  devices, each batch gathered inside the train step): (img/s, wall s of `epochs` epochs)."""
  devices = mesh.devices.size
  num -= num % devices
  sharding = NamedSharding(mesh, P(train_steps.AXIS))
  features = jax.jit(
    lambda key: jax.random.normal(key, (num, 1, *shape), jnp.float32).astype(dtype),
    out_shardings=sharding,
  )(jax.random.PRNGKey(0))
  targets = common.random_targets(np.random.default_rng(1), num)
  arrays = {
    "features": features,
    "score": targets["score"],
    "labels": targets["labels"],
    "valid": np.ones(num, bool),
  }
  arrays = {key: jax.device_put(value, sharding) for key, value in arrays.items()}
  train_set = device_features.TrainSet(arrays, 1, num)
  steps_per_epoch = num // FLAGS.batch_size
  step = device_features.parallel_train_step(
    mesh,
    train_steps.AXIS,
    functools.partial(train_steps.train_step, task=task),
    train_set,
    steps_per_epoch,
    config.input.batch_size,
    config.seed,
  )
  rate, state = timed_rate(step, state, lambda: arrays)
  run_seconds = None
  if epochs:
    start = time.perf_counter()
    for _ in range(epochs * steps_per_epoch):
      state, metrics = step(state, arrays)
    jax.block_until_ready(metrics)
    run_seconds = time.perf_counter() - start
  return rate, run_seconds


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # As run.py: every step reuses the pages of the last.
  workdir = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="feature_cache_benchmark_"))
  config = make_config(workdir)
  mesh = train_steps.create_mesh()
  task, state = common.initial_state(config, mesh)
  image_shape = (config.input.image_size, config.input.image_size, 3)
  cache_dtype = np.dtype(feature_cache.DTYPES[FLAGS.cache_dtype])
  encode_step = train_steps.parallel_encode_step(mesh, cache_dtype)
  rng = np.random.default_rng(0)
  local_batch = FLAGS.batch_size // jax.process_count()
  images = rng.standard_normal((local_batch, *image_shape), np.float32)
  image_batch = train_steps.shard_batch(
    {"image": images, **common.random_targets(rng, local_batch)}, mesh
  )
  lowered = {"encoder": encode_step.lower(state, image_batch["image"])}
  encoder = lowered["encoder"].compile()
  features = np.asarray(jax.device_get(encoder(state, image_batch["image"])))
  shape = features.shape[1:]
  feature_batch = train_steps.shard_batch(
    {"features": features, **common.random_targets(rng, local_batch)}, mesh
  )
  train_fn = train_steps.parallel_train_step(mesh, task)
  lowered.update(
    image_step=train_fn.lower(state, image_batch), feature_step=train_fn.lower(state, feature_batch)
  )
  image_step, feature_step = lowered["image_step"].compile(), lowered["feature_step"].compile()
  print(
    f"backend={jax.default_backend()} devices={jax.device_count()} ({jax.devices()[0].device_kind}); "
    f"{config.input.image_size} px, ResNet-50 to conv4_x (frozen, random weights), features {tuple(shape)} "
    f"{FLAGS.cache_dtype}, batch {FLAGS.batch_size}, compute {FLAGS.dtype}",
    flush=True,
  )
  results = {f"flops_{name}": flops_per_image(value) for name, value in lowered.items()}
  flop_ratio = results["flops_image_step"] / results["flops_feature_step"]
  print(
    f"GFLOP per image: image train step {results['flops_image_step'] / 1e9:.2f} "
    f"(encoder forward {results['flops_encoder'] / 1e9:.2f}), feature train step "
    f"{results['flops_feature_step'] / 1e9:.2f}; ratio {flop_ratio:.2f}",
    flush=True,
  )

  results["images_step_only"], _ = timed_rate(image_step, copy_state(state), lambda: image_batch)
  results["features_step_only"], _ = timed_rate(
    feature_step, copy_state(state), lambda: feature_batch
  )
  print(
    f"step only (one device-resident batch): images {results['images_step_only']:.1f} img/s, "
    f"features {results['features_step_only']:.1f} img/s",
    flush=True,
  )

  feature_train = feature_cache.FeatureTrainTransform(
    preferences=task.preferences, pooling=task.pooling
  )
  if FLAGS.synthetic_features:
    records = synthetic_feature_records(FLAGS.num_images, shape, cache_dtype, rng)
    loader = iter(
      input_pipeline.create_train_loader(
        records, config.input, task, seed=config.seed, transform=feature_train
      )
    )
    results["features_loader"], _ = timed_rate(
      feature_step, copy_state(state), lambda: train_steps.shard_batch(next(loader), mesh)
    )
    first = records[0]
    results["bytes_per_record"] = len(
      feature_cache.encode_record(
        first["features"], first["labels"], first["image_id"], first["boxes"]
      )
    )
    results["features_device"], run_seconds = device_resident_rate(
      copy_state(state),
      mesh,
      task,
      config,
      FLAGS.num_images,
      shape,
      cache_dtype,
      FLAGS.full_run_epochs,
    )
    print(
      f"loader-fed: features (grain, in-memory records) {results['features_loader']:.1f} img/s; "
      f"device-resident features, gathered per step: {results['features_device']:.1f} img/s",
      flush=True,
    )
    if run_seconds is not None:
      print(
        f"full run: {FLAGS.full_run_epochs} epochs x {FLAGS.num_images} images from device-resident features "
        f"in {run_seconds:.1f} s",
        flush=True,
      )
    cache_rate, encode_rate = results["features_loader"], None
  else:
    start = time.perf_counter()
    sources = data_lib.load_data_sources(config.data)
    print(
      f"generated and built {FLAGS.num_images} training JPEGs ({FLAGS.source_size} px) in "
      f"{time.perf_counter() - start:.1f} s",
      flush=True,
    )
    start = time.perf_counter()
    settings = feature_cache.CacheSettings(
      cache=config.feature_cache,
      input=config.input,
      seed=config.seed,
      compute_dtype="bfloat16" if config.model.half_precision else "float32",
    )
    cache = feature_cache.ensure(
      settings,
      sources,
      state,
      lambda batch: encoder(state, train_steps.shard_batch({"image": batch}, mesh)["image"]),
      task,
    )
    encode_rate = FLAGS.num_images / (time.perf_counter() - start)
    results["bytes_per_record"] = cache.bytes_per_record()
    image_loader = iter(
      input_pipeline.create_train_loader(sources["train"], config.input, task, seed=config.seed)
    )
    results["images_loader"], _ = timed_rate(
      image_step, copy_state(state), lambda: train_steps.shard_batch(next(image_loader), mesh)
    )
    feature_loader = iter(cache.train_loader(config.input, config.seed, task))
    results["features_loader"], _ = timed_rate(
      feature_step, copy_state(state), lambda: train_steps.shard_batch(next(feature_loader), mesh)
    )
    print(f"cache build (decode + resize + encoder + write): {encode_rate:.1f} img/s", flush=True)
    print(
      f"loader-fed: images (decode + augment + frozen encoder + head) {results['images_loader']:.1f} img/s, "
      f"cached features {results['features_loader']:.1f} img/s: "
      f"{results['features_loader'] / results['images_loader']:.2f}x",
      flush=True,
    )
    cache_rate = results["features_loader"]

  what = (
    "serialised record, before array_record's framing" if FLAGS.synthetic_features else "on disk"
  )
  print(
    f"cache: {results['bytes_per_record'] / 1e3:.0f} KB per image {what} "
    f"({np.prod(shape)} x {cache_dtype.itemsize} B of features + labels, id, boxes)",
    flush=True,
  )
  train_seconds = FLAGS.project_epochs * FLAGS.project_train / cache_rate
  line = (
    f"full run ({FLAGS.project_encode} images encoded once, {FLAGS.project_epochs} epochs x "
    f"{FLAGS.project_train} from the cache): "
  )
  if encode_rate is not None:
    encode_seconds = FLAGS.project_encode / encode_rate
    image_seconds = FLAGS.project_epochs * FLAGS.project_train / results["images_loader"]
    line += (
      f"{(encode_seconds + train_seconds) / 3600:.1f} h (encode {encode_seconds / 3600:.2f} h + train "
      f"{train_seconds / 3600:.1f} h) against {image_seconds / 3600:.1f} h on the image path; "
    )
  else:
    line += f"training {train_seconds:.0f} s with the grain loader, "
    line += f"{FLAGS.project_epochs * FLAGS.project_train / results['features_device']:.0f} s device-resident; "
  line += f"cache {FLAGS.project_encode * results['bytes_per_record'] / 1e9:.1f} GB"
  print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
