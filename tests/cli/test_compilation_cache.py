"""Compile once: a second process loads what the first compiled (the persistent cache), and runs
of equal configs in one process share their steps (the resume tests check that the resumed run
traces nothing)."""

import subprocess
import sys
import textwrap

import ml_collections
import numpy as np

from configs import default
from privattnet_jax.cli import compilation_cache
from privattnet_jax.models import scoring
from privattnet_jax.training import optimizer as optimizer_lib
from tests import subprocesses
from tests.conftest import make_tiny_config

# Enables the cache in `sys.argv[1]` ("" : off), compiles a small step, prints the cache hits.
_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from privattnet_jax.cli import compilation_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    compilation_cache.enable(sys.argv[1])
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())  # Compiles in far less than JAX's 1 s default floor.
    step(jnp.ones((8, 8))).block_until_ready()
    print(len(hits))
""")


def _run(directory: str) -> int:
  env = dict(subprocesses._env(1), JAX_COMPILATION_CACHE_DIR="")  # pylint: disable=protected-access
  result = subprocess.run(
    [sys.executable, "-c", _SCRIPT, directory],
    env=env,
    cwd=subprocesses.REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return int(result.stdout.split()[-1])


def test_a_second_process_loads_the_compiled_step(tmp_path):
  directory = tmp_path / "jax_cache"
  assert _run(str(directory)) == 0  # Compiled, and written even though it compiled in milliseconds.
  assert any(directory.iterdir())
  assert _run(str(directory)) >= 1


def test_an_empty_directory_turns_the_cache_off():
  assert compilation_cache.enable("") is None and compilation_cache.environment("") == {}
  assert _run("") == 0
  env = compilation_cache.environment("~/x")
  assert env["JAX_COMPILATION_CACHE_DIR"].endswith("/x") and not env[
    "JAX_COMPILATION_CACHE_DIR"
  ].startswith("~")


def test_auto_is_the_environment_variable_else_the_default_folder(monkeypatch):
  """The config stays pure: the environment is read where the folder is resolved."""
  assert default.get_config().compilation_cache_dir == compilation_cache.AUTO
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/ci/jax_cache")
  assert compilation_cache.resolve("auto") == "/ci/jax_cache"
  assert compilation_cache.environment("auto")["JAX_COMPILATION_CACHE_DIR"] == "/ci/jax_cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # Set but empty: off, as the config's "".
  assert compilation_cache.resolve("auto") == "" and compilation_cache.environment("auto") == {}
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compilation_cache.resolve("auto") == compilation_cache.DEFAULT_DIR
  assert compilation_cache.resolve("/runs/cache") == "/runs/cache"
  assert compilation_cache.resolve("") == ""


def test_what_a_step_is_built_from_is_shared_only_between_equal_configs(tiny_data_dir):
  """Reuse must never hand a run another config's optimizer, model or task constants."""
  from privattnet_jax import models
  from privattnet_jax.training import train_steps  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(tiny_data_dir)
  params = {"encoder": {}, "head": {}}
  optimizer = optimizer_lib.create_optimizer(
    config.optim, config.model.encoder.trainable, params, 10
  )
  assert (
    optimizer_lib.create_optimizer(
      (ml_collections.ConfigDict(config.to_dict())).optim,
      (ml_collections.ConfigDict(config.to_dict())).model.encoder.trainable,
      params,
      10,
    )
    is optimizer
  )
  assert (
    optimizer_lib.create_optimizer(config.optim, config.model.encoder.trainable, params, 11)
    is not optimizer
  )  # demo: warmup_cosine.
  other_rate = ml_collections.ConfigDict(config.to_dict())
  other_rate.optim.learning_rate *= 2
  assert (
    optimizer_lib.create_optimizer(other_rate.optim, other_rate.model.encoder.trainable, params, 10)
    is not optimizer
  )
  config.optim.schedule = "constant"  # A constant rate does not depend on the run's length.
  assert optimizer_lib.create_optimizer(
    config.optim, config.model.encoder.trainable, params, 10
  ) is optimizer_lib.create_optimizer(config.optim, config.model.encoder.trainable, params, 11)

  model = models.create_model(config.model, 1)
  assert models.create_model((ml_collections.ConfigDict(config.to_dict())).model, 1) is model
  config.model.attention.hidden_size += 1
  assert models.create_model(config.model, 1) is not model

  preferences = np.ones((68, 1), np.float32)
  task = scoring.make_task(config.model, config.score, config.loss, [0.5], preferences)
  assert (
    scoring.make_task(
      config.model, config.score, config.loss, np.float32([0.5]), preferences.copy()
    )
    == task
  )
  assert train_steps.parallel_eval_step(train_steps.create_mesh(), task) is (
    train_steps.parallel_eval_step(
      train_steps.create_mesh(),
      scoring.make_task(config.model, config.score, config.loss, [0.5], preferences),
    )
  )
  assert scoring.make_task(config.model, config.score, config.loss, [0.25], preferences) != task
