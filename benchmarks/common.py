"""What the train-step benchmarks share: the paper's train step ready to run, its FLOPs per image
and the machine's matmul peak (the reference for 'fraction of peak')."""

from __future__ import annotations

import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from privattnet_jax.data import input_pipeline
from privattnet_jax import models
from privattnet_jax.training import train_steps
from privattnet_jax.models import scoring
from privattnet_jax.training import train_state


def matmul_peak_flops(dtype) -> float:
  """FLOP/s of a large square jnp matmul, the best of three timings (a neighbour's burst on
  shared cores only lowers one)."""
  n = 4096 if jax.default_backend() != "cpu" else 2048
  a = jax.numpy.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  repeats = 20 if jax.default_backend() != "cpu" else 5
  best = 0.0
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(repeats):
      out = matmul(a)
    out.block_until_ready()
    best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
  return best


def random_targets(rng: np.random.Generator, size: int) -> dict:
  """A batch's score, labels and mask (every example real)."""
  return {
    "score": rng.uniform(0, 5, size=(size, 1)).astype(np.float32),
    "labels": (rng.uniform(size=(size, 68)) < 0.1).astype(np.float32),
    "mask": np.ones(size, np.float32),
  }


def initial_state(config, mesh):
  """(task, state replicated over `mesh`) for `config`, through the project's public API (a
  regression task, target mean 0)."""
  task = scoring.make_task(
    config.model,
    config.score,
    config.loss,
    np.zeros(1),
    input_pipeline.score_preferences(config.score),
  )
  model = models.create_model(config.model, num_outputs=1, batchnorm_axis_name=train_steps.AXIS)
  shape = (config.input.image_size, config.input.image_size, 3)
  state = train_state.create_train_state(
    model, shape, config.model.encoder, config.optim, 1000, jax.random.PRNGKey(0)
  )
  return task, jax.device_put(state, NamedSharding(mesh, P()))


def train_step_for(config):
  """(state replicated over a mesh of every device, the jitted train step, the mesh) for `config`."""
  mesh = train_steps.create_mesh()
  task, state = initial_state(config, mesh)
  return state, train_steps.parallel_train_step(mesh, task), mesh


def flops_per_image(lowered, batch_size: int) -> float:
  """FLOPs per image, XLA's count for the lowered (unoptimised) step.

  The compiled module's count omits the FLOPs of library calls (cuBLAS/cuDNN on a GPU), which left
  a GPU's FLOPs per image far too small (docs/benchmarks.md, "Train step, full size"; 10-40x).
  """
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / batch_size
