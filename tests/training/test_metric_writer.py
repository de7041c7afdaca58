"""metric_writer: metrics.jsonl lines and TensorBoard scalars, without importing torch."""

import json
import struct

from privattnet_jax.training import metric_writer
from tests import subprocesses


def _tensorboard_scalars(folder) -> dict:
  """{(tag, step): value} of the scalar events in `folder`'s event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  scalars = {}
  for path in folder.glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_metric_writer_logs_scalars_without_importing_torch(tmp_path):
  """After run.py's process setup the TensorBoard writer costs no torch import at start-up, and
  torch stays importable."""
  script = f"""
    import pathlib, sys
    from privattnet_jax.cli import process
    from privattnet_jax.training import metric_writer
    process.configure_process({str(tmp_path)!r}, None, writes_metrics=True)
    writer = metric_writer.MetricWriter(pathlib.Path({str(tmp_path)!r}))
    writer.write(3, {{"loss": 1.5, "images_per_second": 2.0}})
    writer.close()
    print("torch imported:", "torch" in sys.modules)
    import torch
  """
  result = subprocesses.run_script(script, devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "torch imported: False" in result.stdout
  assert _tensorboard_scalars(tmp_path / "tensorboard")[("loss", 3)] == 1.5
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.5


def test_every_value_goes_to_the_json_lines_and_finite_numbers_to_tensorboard(tmp_path):
  writer = metric_writer.MetricWriter(tmp_path)
  writer.write(2, {"loss": 0.5, "validation/n": 12, "note": "text", "nan": float("nan")})
  writer.write(4, {"loss": 0.25})
  writer.close()
  scalars = _tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars == {("loss", 2): 0.5, ("validation/n", 2): 12.0, ("loss", 4): 0.25}
  resumed = metric_writer.MetricWriter(tmp_path)  # A resumed run appends to metrics.jsonl.
  resumed.write(6, {"loss": 0.125})
  resumed.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [2, 4, 6]
  assert lines[0]["note"] == "text" and lines[0]["validation/n"] == 12
  assert lines[0]["nan"] != lines[0]["nan"]  # NaN kept in the JSON line.
