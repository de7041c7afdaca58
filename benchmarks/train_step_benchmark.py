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

from benchmarks import common
from configs import privattnet
from privattnet_jax.cli import host_memory
from privattnet_jax.training import train_steps

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


def benchmark(encoder_mode: str, batch_size: int, peak: float) -> None:
  config = privattnet.get_config()
  config.model.name = FLAGS.model
  config.input.image_size = FLAGS.image_size
  config.input.batch_size = batch_size
  config.model.half_precision = FLAGS.dtype == "bfloat16"
  config.model.encoder.trainable = encoder_mode == "trainable"
  state, step, mesh = common.train_step_for(config)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(
      size=(batch_size, config.input.image_size, config.input.image_size, 3)
    ).astype(np.float32),
    **common.random_targets(rng, batch_size),
  }
  device_batch = train_steps.shard_batch(batch, mesh)
  lowered = step.lower(state, device_batch)
  compiled = lowered.compile()
  flops_per_image = common.flops_per_image(lowered, batch_size)
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
  peak = common.matmul_peak_flops(dtype)
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
