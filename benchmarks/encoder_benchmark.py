"""Encoder cost: XLA's FLOPs per image and inference images/s of Lite0 against ResNet-50.

    python -m benchmarks.encoder_benchmark [--image_size 224] [--batch_size 32] [--repeats 3]

Frozen-BatchNorm inference (what the feature cache runs), fp32, one jitted call per batch; one
warm-up call, then `repeats` timed. Prints the 1-minute load average beside the numbers: on a
shared machine, other processes' load lowers the images/s.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from privattnet_jax.models.efficientnet import EfficientNetLite0
from privattnet_jax.models.resnet import ResNet


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  images = jnp.asarray(
    np.random.default_rng(0)
    .standard_normal((args.batch_size, args.image_size, args.image_size, 3))
    .astype(np.float32)
  )
  encoders = {
    "EfficientNet-Lite0, stride-16 cut (112 ch)": EfficientNetLite0(stages=3),
    "EfficientNet-Lite0, whole trunk (1280 ch)": EfficientNetLite0(stages=4),
    "ResNet-50 to conv4_x (1024 ch)": ResNet(depth=50, stages=3),
    "ResNet-50 whole trunk (2048 ch)": ResNet(depth=50, stages=4),
  }
  for name, encoder in encoders.items():
    variables = encoder.init(jax.random.key(0), images[:1], use_running_average=True)
    apply = jax.jit(lambda v, x, e=encoder: e.apply(v, x, use_running_average=True))
    compiled = apply.lower(variables, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    compiled(variables, images).block_until_ready()
    start = time.perf_counter()
    for _ in range(args.repeats):
      compiled(variables, images).block_until_ready()
    rate = args.repeats * args.batch_size / (time.perf_counter() - start)
    print(
      f"{name}: {cost['flops'] / args.batch_size / 1e9:.2f} GFLOP/image, {params / 1e6:.2f} M parameters, "
      f"{rate:.1f} images/s at {args.image_size} px (load {os.getloadavg()[0]:.1f})",
      flush=True,
    )


if __name__ == "__main__":
  main()
