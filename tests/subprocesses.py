"""Scripts in fresh Python processes: fake CPU devices, and two processes joined by jax.distributed.

The device count of a JAX process is fixed when it starts, so tests of 2-device meshes and of
multi-host runs run their code in child processes (cwd and PYTHONPATH: the repository).
"""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVICES_FLAG = "--xla_force_host_platform_device_count={}"

# Prepended to a script run by `run_on_two_processes`: joins the run, defines `process_id`.
_DISTRIBUTED_PROLOGUE = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id = int(sys.argv[1])
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=process_id)
"""


def _env(devices: int, compilation_cache: bool = True) -> dict:
  """The parent's environment (with conftest's compilation cache, unless `compilation_cache` is
  False), the repository importable, `devices` CPU devices."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG.format(devices)}".strip()
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=flags)
  if not compilation_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = ""
  return env


def _free_port() -> int:
  """A loopback port nothing listens on now (the OS picks it)."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def run_script(script: str, *, devices: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
  """`script` (indented as in the test) in one process with `devices` CPU devices."""
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)],
    env=_env(devices),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_on_two_processes(script: str, *, devices: int = 2, timeout: int = 900) -> list[str]:
  """`script` in two processes of `devices` CPU devices each, joined by jax.distributed on loopback
  with gloo collectives (`process_id` is defined); asserts both exit 0 and returns their stdouts."""
  port = _free_port()  # Parallel test workers each start their own pairs.
  code = _DISTRIBUTED_PROLOGUE.format(port=port) + textwrap.dedent(script)
  # No persistent compilation cache: JAX writes it from process 0 only, and each process's cache key
  # differs (checked on jax 0.10.2 CPU), so process 0 would load its steps while process 1 compiles
  # them, and gloo gives up waiting for process 1 after 30 s on busy cores.
  env = _env(devices, compilation_cache=False)
  processes = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(i)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [process.communicate(timeout=timeout) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-4000:]
  return [stdout for stdout, _ in outputs]


def hold_workdir_lock(workdir: pathlib.Path) -> subprocess.Popen:
  """A child process that holds `workdir`'s run lock until killed (returns once it holds it)."""
  code = (
    "import sys, time; from privattnet_jax.training import workdir_lock; workdir_lock.acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(120)"
  )
  child = subprocess.Popen(
    [sys.executable, "-c", code, str(workdir)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
  )
  assert child.stdout.readline().strip() == "held"
  return child


def start_run_py(commands: dict[str, list[str]]) -> dict[str, subprocess.Popen]:
  """`run.py <args>` for each named argument list, all started at once, output captured."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return {
    name: subprocess.Popen(
      [sys.executable, "run.py", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, args in commands.items()
  }
