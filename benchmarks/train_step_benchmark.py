"""Train-step throughput of PrivAttNet at full size, with FLOPs and the fraction of matmul peak.

  python -m benchmarks.train_step_benchmark                      # CPU, fp32, batch 8 and 32
  python -m benchmarks.train_step_benchmark --dtype=bfloat16 --batch_sizes=32,128   # a GPU

Prints one line per (encoder mode, batch size): images/s, XLA's FLOPs per image
(cost analysis of the compiled step), the achieved FLOP/s and its fraction of
this machine's measured matmul peak (a large jnp.dot in the same dtype).
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import privattnet
from privattnet_jax import host_memory
from privattnet_jax import input_pipeline
from privattnet_jax import models
from privattnet_jax import train_steps

flags.DEFINE_list("batch_sizes", ["8", "32"], "Global batch sizes.")
flags.DEFINE_list(
  "encoder_modes", ["frozen", "trainable"], "ResNet-50 trunk frozen (the paper) or trained."
)
flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay fp32)."
)
flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
flags.DEFINE_integer("steps", 5, "Timed steps after two warm-up steps.")
flags.DEFINE_string("model", "privattnet", "Model name (config.model.name).")
FLAGS = flags.FLAGS


def matmul_peak_flops(dtype) -> float:
  """Measured FLOP/s of a large square matmul: the reference for 'fraction of peak'."""
  n = 4096 if jax.default_backend() != "cpu" else 2048
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  repeats = 20 if jax.default_backend() != "cpu" else 5
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def benchmark(encoder_mode: str, batch_size: int, peak: float) -> None:
  config = privattnet.get_config()
  config.model.name = FLAGS.model
  config.image_size = FLAGS.image_size
  config.batch_size = batch_size
  config.half_precision = FLAGS.dtype == "bfloat16"
  config.model.encoder.trainable = encoder_mode == "trainable"
  task = train_steps.make_task(config, np.zeros(1), input_pipeline.preferences_from_config(config))
  model = models.create_model(config, num_outputs=1, batchnorm_axis_name=train_steps.AXIS)
  mesh = train_steps.create_mesh()
  state = train_steps.create_train_state(
    config, model, task, (config.image_size, config.image_size, 3), 1000, jax.random.PRNGKey(0)
  )
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(batch_size, config.image_size, config.image_size, 3)).astype(
      np.float32
    ),
    "score": rng.uniform(0, 5, size=(batch_size, 1)).astype(np.float32),
    "labels": (rng.uniform(size=(batch_size, 68)) < 0.1).astype(np.float32),
    "mask": np.ones(batch_size, np.float32),
  }
  device_batch = train_steps.shard_batch(batch, mesh)
  step = train_steps.parallel_train_step(mesh, task)
  lowered = step.lower(state, device_batch)
  compiled = lowered.compile()
  # The lowered (unoptimised) HLO's count: the compiled module's omits the FLOPs of library calls
  # (cuBLAS/cuDNN on a GPU), which made the GPU's FLOPs per image 10-40x too small.
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_image = float(cost.get("flops", float("nan"))) / batch_size
  for _ in range(2):
    state, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  images_per_second = FLAGS.steps * batch_size / elapsed
  achieved = images_per_second * flops_per_image
  print(
    f"{FLAGS.model:12s} encoder={encoder_mode:9s} batch={batch_size:4d} {FLAGS.dtype:8s} "
    f"{images_per_second:9.1f} img/s  {flops_per_image / 1e9:6.2f} GFLOP/img  "
    f"{achieved / 1e12:7.3f} TFLOP/s  {achieved / peak:6.1%} of matmul peak",
    flush=True,
  )


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # As run.py: every step reuses the pages of the last.
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  peak = matmul_peak_flops(dtype)
  print(
    f"backend={jax.default_backend()} devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
    f"measured {FLAGS.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s",
    flush=True,
  )
  for encoder_mode in FLAGS.encoder_modes:
    for batch_size in FLAGS.batch_sizes:
      benchmark(encoder_mode, int(batch_size), peak)


if __name__ == "__main__":
  app.run(main)
