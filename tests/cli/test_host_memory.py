"""host_memory.keep_freed_memory: repeated executions of a compiled step reuse the pages of the
last one instead of page-faulting fresh ones (the cost it removes is in docs/benchmarks.md)."""

import sys

import pytest

from tests import subprocesses

# Minor page faults per execution of a step whose 64 MiB intermediate XLA:CPU allocates anew each
# time, in a fresh process (malloc's settings are process-wide and must precede the allocations).
SCRIPT = """
import resource
from privattnet_jax.cli import host_memory
applied = host_memory.keep_freed_memory() if {keep} else False
import jax, jax.numpy as jnp
x, w = jnp.ones((4096, 256)), jnp.ones((256, 4096))
step = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T))
step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  step(x, w).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_step(keep: bool) -> tuple[str, int]:
  result = subprocesses.run_script(SCRIPT.format(keep=keep), devices=1, timeout=300)
  assert result.returncode == 0, result.stderr
  applied, faults = result.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_steps_reuse_the_memory_the_last_step_freed():
  applied, kept = faults_per_step(keep=True)
  assert applied == "True"
  _, default = faults_per_step(keep=False)
  assert default > 4096, "the default allocator no longer faults: this test measures nothing"
  assert kept < default / 20, (kept, default)
