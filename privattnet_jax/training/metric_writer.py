"""Metric logging: one JSON line per logged step plus TensorBoard events, without TensorFlow."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard events (no TensorFlow).

  tensorboardX imports torch when it is installed, unless the process imported tensorboardX with
  torch hidden first, as run.py's process setup does (cli/process.py).
  """

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._jsonl = open(workdir / "metrics.jsonl", "a")
      self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

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
