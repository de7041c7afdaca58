"""Shared fixtures: a tiny synthetic VISPR-format dataset built once per session, and a tiny config.

The suite uses run.py's persistent compilation cache (the default config's folder), it and every
child process: most of the suite's time is XLA compiling the same small steps, which a cache hit
turns into a file read, within one run (tests that rebuild a step) and across runs. pytest-xdist
runs the tests on every core (setup.cfg); each worker builds its own tiny dataset.
"""

import contextlib
import logging
import os
import signal

import jax
import numpy as np
import pytest

from configs import default
from configs import demo
from privattnet_jax.cli import compilation_cache
from privattnet_jax.cli import process

COMPILATION_CACHE_DIR = compilation_cache.resolve(default.get_config().compilation_cache_dir)
# LLVM optimisation level 0. The programs and their numerics are XLA's; only the machine code is
# less optimised, which the suite's tiny models do not notice, while the compiles that no cache can
# serve (the two-process run) get cheaper, and so does the whole suite (docs/benchmarks.md, "The
# suite on both cores"). The compilation cache keys include the flag, so run.py's entries and the
# suite's never mix.
XLA_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
  """The suite's process settings, before any test starts JAX's backend (XLA reads XLA_FLAGS then),
  for this process and, through the environment, the child processes the tests start."""
  del config
  flags = os.environ.get("XLA_FLAGS", "")
  if XLA_FLAG not in flags.split():  # xdist workers inherit the controller's.
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
  compilation_cache.enable(COMPILATION_CACHE_DIR)
  os.environ.update(compilation_cache.environment(COMPILATION_CACHE_DIR))
  process.import_tensorboard_without_torch()  # As run.py's train mode: the metric writer's import.


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A data_dir whose synthetic dataset (generated + built on first use) all training tests share."""
  return str(tmp_path_factory.mktemp("tiny_data"))


def make_tiny_config(data_dir: str, model_name: str = "privattnet"):
  """A config small enough for a train step in seconds on one CPU core."""
  config = demo.get_config(f"{model_name},tiny")
  config.input.image_size = 32
  config.input.batch_size = 8
  config.num_epochs = 1
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.input.resize_size = 36
  config.data.data_dir = data_dir
  config.data.synthetic.num_train = 48
  config.data.synthetic.num_val = 12
  config.data.synthetic.num_test = 12
  config.data.synthetic.image_size = 48
  config.model.encoder.width = 8
  config.model.attention.hidden_size = 16
  config.model.attention.regressor_hidden = 8
  return config


@pytest.fixture
def tiny_config(tiny_data_dir):
  return make_tiny_config(tiny_data_dir)


@contextlib.contextmanager
def jit_traces(caplog):
  """Yields a list that, after the block, holds JAX's "Finished tracing <function> ..." lines for
  every function traced for jit inside it (compile once: a repeated run should add none)."""
  traces = []
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax._src.dispatch"):
    start = len(caplog.records)
    yield traces
  traces.extend(
    r.getMessage() for r in caplog.records[start:] if r.getMessage().startswith("Finished tracing")
  )


HANG_LIMIT_S = (
  20  # A FIFO that is opened for reading blocks forever: the alarm turns that into a failure.
)


@pytest.fixture
def no_hang():
  """Fails a test that blocks (e.g. on a FIFO) instead of letting it hang the suite."""

  def _raise(signum, frame):
    raise TimeoutError(f"blocked for {HANG_LIMIT_S} s")

  previous = signal.signal(signal.SIGALRM, _raise)
  signal.alarm(HANG_LIMIT_S)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def make_task(kind, preferences, target_mean=None, pooling="max"):
  """A Task built by hand (no config): no attention penalty, target mean 0 unless given."""
  from privattnet_jax.models import scoring  # pylint: disable=g-import-not-at-top  # Model code.

  target_mean = np.zeros(preferences.shape[1], np.float32) if target_mean is None else target_mean
  return scoring.Task(
    kind=kind,
    target_mean=target_mean,
    preferences=preferences,
    pooling=pooling,
    attention_gamma=0.0,
    attention_tau=0.0,
  )
