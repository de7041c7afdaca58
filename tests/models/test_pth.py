"""pth: torch.save files read without torch, and without running anything from the pickle."""

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
