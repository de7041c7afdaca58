"""The persistent compilation cache: a second process loads what the first compiled."""

import subprocess
import sys
import textwrap

from privattnet_jax import compilation_cache
from tests import subprocesses

# Enables the cache in `sys.argv[1]` ("" : off), compiles a small step, prints the cache hits.
_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from privattnet_jax import compilation_cache

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
