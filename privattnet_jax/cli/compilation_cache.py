"""JAX's persistent compilation cache: each step compiles once per machine, not once per process.

Most of a short run's start-up, and most of the test suite's time, is XLA compiling the same train,
eval and encode steps again. JAX can keep the compiled executables on disk, keyed by the program
and the compile options (device count and kind included), so a later process that builds the same
step loads it instead (on the CPU backend too). `run.py` and the test suite turn it on before
anything compiles; child processes get the same cache through `environment()`.

The folder is a config's `compilation_cache_dir`: "auto" (the default) is JAX's own environment
variable when it is set (CI points it at a folder it keeps between runs), else DEFAULT_DIR; ""
is off.
"""

from __future__ import annotations

import os
import pathlib

import jax

AUTO = "auto"
DEFAULT_DIR = "~/.cache/privattnet_jax/jax_cache"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def resolve(directory: str) -> str:
  """The folder `directory` names: AUTO is $JAX_COMPILATION_CACHE_DIR, else DEFAULT_DIR.

  $JAX_COMPILATION_CACHE_DIR set but empty is off; any value other than AUTO is itself.
  """
  return os.environ.get(ENV_VAR, DEFAULT_DIR) if directory == AUTO else directory


def enable(directory: str) -> pathlib.Path | None:
  """Caches every compilation in `directory`; returns the folder used, or None ("": off).

  AUTO is resolved and `~` expanded; the folder is created on first write.

  JAX caches only compilations above 1 s by default; the CPU compiles of small test models take
  less and would never be cached, so every compilation is cached (the entries are small).
  """
  directory = resolve(directory)
  if not directory:
    return None
  path = pathlib.Path(directory).expanduser().absolute()
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def environment(directory: str) -> dict[str, str]:
  """Environment variables that give a child process the cache `enable(directory)` gives this one.

  JAX reads them when it is imported; none for "" (off).
  """
  directory = resolve(directory)
  if not directory:
    return {}
  return {
    ENV_VAR: str(pathlib.Path(directory).expanduser().absolute()),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
