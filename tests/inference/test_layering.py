"""The inference package stands alone: it imports neither tensorflow_datasets nor training code."""

import pkgutil
import subprocess
import sys

from privattnet_jax import inference
from tests import subprocesses

_PROBE = """
import importlib, sys
sys.modules["tensorflow_datasets"] = None  # `import tensorflow_datasets` now raises ImportError.
for name in {modules!r}:
  importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith(("privattnet_jax.training", "grain")))
print("LOADED", loaded)
"""


def test_inference_imports_without_tfds_or_training_code():
  modules = [f"privattnet_jax.inference.{m.name}" for m in pkgutil.iter_modules(inference.__path__)]
  assert (
    "privattnet_jax.inference.predict" in modules and "privattnet_jax.inference.redact" in modules
  )
  result = subprocess.run(
    [sys.executable, "-c", _PROBE.format(modules=modules)],
    cwd=subprocesses.REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "LOADED []" in result.stdout, result.stdout
