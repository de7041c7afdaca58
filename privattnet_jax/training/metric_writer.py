"""Metric logging: one JSON line per logged step plus TensorBoard events, without TensorFlow."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX's writer imports torch whenever it is installed (the test extra installs it), only
  to accept torch tensors: 1.7 s of a run's start-up for scalars that are Python floats here.
  Hiding torch during that one import makes it fall back to numpy; torch stays importable after.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard events (no TensorFlow)."""

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._jsonl = open(workdir / "metrics.jsonl", "a")
      self._tensorboard = _summary_writer_class()(str(workdir / "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      if isinstance(value, (int, float)) and np.isfinite(value):
        self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
