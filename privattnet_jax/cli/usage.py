"""Which flags each mode needs: a command line that lacks one is refused before any work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from absl import app


def check(values: Mapping[str, Any], extra: Sequence[str]) -> None:
  """Raises app.UsageError when the mode lacks a flag it needs.

  `values`: {flag name: value}, as FLAGS.flag_values_dict() gives; `extra`: the plain arguments
  after the flags.
  """
  mode = values["mode"]

  def require(*names: str) -> None:
    missing = [f"--{name}" for name in names if not values[name]]
    if missing:
      raise app.UsageError(f"--mode={mode} needs {' and '.join(missing)}")

  if extra and mode not in ("predict", "redact"):
    raise app.UsageError(f"unexpected arguments: {list(extra)}")
  if values["redaction_quality"] and mode != "evaluate":
    raise app.UsageError("--redaction_quality is a flag of --mode=evaluate")
  if mode in ("train", "evaluate", "cache_features"):
    require("config", "workdir")
  elif mode in ("predict", "redact"):
    require("output")
    if not (values["images"] or extra):
      raise app.UsageError(f"--mode={mode} needs --images")
    if bool(values["workdir"]) == bool(values["exported"]):
      raise app.UsageError(
        f"--mode={mode} needs --workdir (a checkpoint) or --exported (an artifact), not both"
      )
  elif mode == "export":
    require("workdir")
  elif mode == "compare":
    require("workdirs", "output")
