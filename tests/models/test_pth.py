"""pth: torch.save files read without torch, and without running anything from the pickle."""

import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from privattnet_jax.models import pth
from privattnet_jax.models import weights


@pytest.fixture
def zip_pth(tmp_path):
  """A torch.save'd (zip layout) state dict: conv, BatchNorm (with its int64 counter) and linear."""
  torch.manual_seed(0)
  model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
  path = tmp_path / "small.pth"
  torch.save(model.state_dict(), path)
  return path


def assert_same_as_torch_load(path):
  expected = torch.load(path, map_location="cpu", weights_only=True)
  actual = pth.load(path)
  assert list(actual) == list(expected)
  for key, tensor in expected.items():
    assert actual[key].dtype == tensor.numpy().dtype, key
    np.testing.assert_array_equal(actual[key], tensor.numpy(), err_msg=key)


def test_reader_gives_what_torch_load_gives(zip_pth, tmp_path):
  assert_same_as_torch_load(zip_pth)  # torch's zip layout (a small state dict with BatchNorm).
  assert_same_as_torch_load(
    weights.installed_weights_path("efficientnet_lite0")
  )  # The legacy layout.
  # Views, strides, offsets, parameters and dtypes the state dicts above do not have.
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  odd = {
    "transposed": base.t(),
    "offset": base[1:, 2:],
    "strided": base[:, ::2],
    "empty": torch.zeros(0, 3),
    "parameter": torch.nn.Parameter(torch.ones(3)),
    "bf16": torch.ones(2, dtype=torch.bfloat16) / 3,
    "half": torch.ones(2, dtype=torch.float16),
    "int": torch.arange(3),
    "bool": torch.tensor([True, False]),
  }
  torch.save(odd, tmp_path / "odd.pth")
  actual = pth.load(tmp_path / "odd.pth")
  for key, tensor in odd.items():
    tensor = tensor.detach()
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    assert actual[key].shape == expected.shape, key
    np.testing.assert_array_equal(np.asarray(actual[key], expected.dtype), expected, err_msg=key)


class _RunsShell:
  """A pickle payload that runs a shell command when an unrestricted loader unpickles it."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_file(path, info, obj) -> pathlib.Path:
  """torch's legacy layout up to the object: magic number, protocol, system info, object."""
  with open(path, "wb") as file:
    for value in (pth.LEGACY_MAGIC, pth.LEGACY_PROTOCOL, info, obj):
      pickle.dump(value, file, protocol=2)
  return path


def test_a_pickle_naming_os_system_is_refused_in_one_line_and_never_runs(tmp_path):
  marker = tmp_path / "ran"
  zipped = tmp_path / "zip.pth"
  torch.save({"weight": torch.zeros(2), "payload": _RunsShell(marker)}, zipped)
  legacy = _legacy_file(tmp_path / "legacy.pth", {"little_endian": True}, _RunsShell(marker))
  plain = tmp_path / "plain.pth"  # A bare pickle: refused by the header reader, no globals at all.
  plain.write_bytes(pickle.dumps(_RunsShell(marker)))
  refused = (
    "refused: not a plain state dict of tensors (it refers to posix.system); "
    "this reader never runs code from a pickle"
  )
  for path, expected in ((zipped, refused), (legacy, refused), (plain, "not a torch.save file")):
    with pytest.raises(pth.PthError) as error:
      pth.load(path)
    assert expected in str(error.value) and "\n" not in str(error.value), path.name
  assert not marker.exists()


def test_legacy_layout_gives_what_torch_load_gives(tmp_path):
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  state_dict = {"w": base, "t": base.t(), "offset": base[1:, 1:], "n": torch.tensor(7)}
  path = tmp_path / "legacy.pth"
  torch.save(state_dict, path, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(path)
  assert_same_as_torch_load(path)


def test_big_endian_and_foreign_files_are_refused(tmp_path):
  big = _legacy_file(tmp_path / "big.pth", {"little_endian": False}, {})
  with pytest.raises(pth.PthError, match="big-endian tensors are not supported"):
    pth.load(big)
  (tmp_path / "text.pth").write_text("not a torch file\n")
  with pytest.raises(pth.PthError, match="not a torch.save file"):
    pth.load(tmp_path / "text.pth")
