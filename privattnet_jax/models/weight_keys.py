"""Weight names of torchvision, timm and efficientnet_pytorch -> our encoders' variables.

Also which architecture a set of names belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from privattnet_jax.models import efficientnet, resnet

LITE0 = "efficientnet_lite0"


RESNET = "resnet"


FlatKey = tuple[
  str, ...
]  # (collection, module, ..., leaf), e.g. ("params", "layer1_0", "conv1", "kernel").


_BATCHNORM_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


_BATCHNORM_LEAVES_INVERSE = {value: key for key, value in _BATCHNORM_LEAVES.items()}


BLOCK_NAME = re.compile(r"layer([1-4])_(\d+)")


LITE0_BLOCK_NAME = re.compile(r"blocks_(\d+)")


_LITE0_MODULES = {"conv_stem", "bn0", "conv_head", "bn1"}  # Top level; blocks hold the rest.


_LITE0_BLOCK_MODULES = {"expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"}


class WeightImportError(ValueError):
  """A weight file that cannot become this encoder's variables; the message says why."""


def _is_conv(module: str) -> bool:
  return re.fullmatch(r"conv\d", module) is not None or module == "downsample_conv"


def _is_batchnorm(module: str) -> bool:
  return re.fullmatch(r"bn\d", module) is not None or module == "downsample_bn"


def _lite0_key_to_flax(key: str) -> FlatKey | None:
  """`efficientnet_pytorch` key -> flax key, or None when the key is not part of a Lite0 trunk."""
  parts = key.split(".")
  if len(parts) == 2 and parts[0][1:] in _LITE0_MODULES and parts[0].startswith("_"):
    module, leaf = (parts[0][1:],), parts[1]
  elif (
    len(parts) == 4
    and parts[0] == "_blocks"
    and parts[1].isdigit()
    and parts[2].startswith("_")
    and parts[2][1:] in _LITE0_BLOCK_MODULES
  ):
    module, leaf = (f"blocks_{int(parts[1])}", parts[2][1:]), parts[3]
  else:
    return None
  if "conv" in module[-1] and leaf == "weight":
    return ("params", *module, "kernel")
  if module[-1].startswith("bn") and leaf in _BATCHNORM_LEAVES:
    collection, flax_leaf = _BATCHNORM_LEAVES[leaf]
    return (collection, *module, flax_leaf)
  return None


def torch_key_to_flax(key: str) -> FlatKey | None:
  """torchvision or `efficientnet_pytorch` key -> flax key, or None when no trunk has it."""
  if key.startswith("_"):
    return _lite0_key_to_flax(key)
  parts = key.split(".")
  if parts[0] in ("conv1", "bn1") and len(parts) == 2:
    module, leaf = (parts[0],), parts[1]
  elif re.fullmatch(r"layer[1-4]", parts[0]) and len(parts) >= 4 and parts[1].isdigit():
    block = f"{parts[0]}_{int(parts[1])}"
    if parts[2] == "downsample" and len(parts) == 5 and parts[3] in ("0", "1"):
      module, leaf = (block, "downsample_conv" if parts[3] == "0" else "downsample_bn"), parts[4]
    elif len(parts) == 4:
      module, leaf = (block, parts[2]), parts[3]
    else:
      return None
  else:
    return None
  if _is_conv(module[-1]) and leaf == "weight":
    return ("params", *module, "kernel")
  if _is_batchnorm(module[-1]) and leaf in _BATCHNORM_LEAVES:
    collection, flax_leaf = _BATCHNORM_LEAVES[leaf]
    return (collection, *module, flax_leaf)
  return None


def flax_key_to_torch(key: FlatKey, layout: str = RESNET) -> str:
  """The inverse of `torch_key_to_flax` for an encoder of `layout` (RESNET or LITE0)."""
  collection, *module, leaf = key
  if layout == LITE0:
    match = LITE0_BLOCK_NAME.fullmatch(module[0])
    prefix = ["_blocks", match.group(1)] if match else []
    torch_leaf = "weight" if leaf == "kernel" else _BATCHNORM_LEAVES_INVERSE[(collection, leaf)]
    return ".".join([*prefix, f"_{module[-1]}", torch_leaf])
  match = BLOCK_NAME.fullmatch(module[0])
  prefix = [f"layer{match.group(1)}", match.group(2)] if match else []
  name = module[-1]
  if name == "downsample_conv":
    name = "downsample.0"
  elif name == "downsample_bn":
    name = "downsample.1"
  torch_leaf = "weight" if leaf == "kernel" else _BATCHNORM_LEAVES_INVERSE[(collection, leaf)]
  return ".".join([*prefix, name, torch_leaf])


def is_dropped_torch_key(key: str) -> bool:
  """Keys a ResNet or Lite0 file holds that no encoder uses: the classifier, counters."""
  return key.split(".")[0] in ("fc", "_fc") or key.endswith(".num_batches_tracked")


def oihw_to_hwio(array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (2, 3, 1, 0))


def hwio_shape_to_oihw(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else tuple(shape)


def variables_to_state_dict(encoder_variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Encoder variables -> a torchvision-named float32 state dict (without `fc`).

  Arrays are C-contiguous: `safetensors.numpy.save_file` writes a transposed view's raw buffer,
  silently scrambling it.
  """
  state_dict = {}
  flat = traverse_util.flatten_dict(dict(encoder_variables))
  layout = encoder_layout(flat)
  for key, value in flat.items():
    value = np.asarray(value, np.float32)
    if key[-1] == "kernel":
      value = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    state_dict[flax_key_to_torch(key, layout)] = value
  return state_dict


def encoder_layout(flat_keys) -> str | None:
  """RESNET or LITE0: which encoder a flat key set belongs to (None: neither)."""
  for key in flat_keys:
    if len(key) > 1 and (
      key[1] in ("conv_stem", "conv_head") or LITE0_BLOCK_NAME.fullmatch(key[1])
    ):
      return LITE0
    if len(key) > 1 and (key[1] == "conv1" or BLOCK_NAME.fullmatch(key[1])):
      return RESNET
  return None


def lite0_blocks(flat_keys) -> tuple[int, bool]:
  """(number of MBConv blocks, whether the head conv is there) of a flat Lite0 key set."""
  blocks = [int(m.group(1)) + 1 for key in flat_keys if (m := LITE0_BLOCK_NAME.fullmatch(key[1]))]
  return max(blocks, default=0), any(key[1] in ("conv_head", "bn1") for key in flat_keys)


def describe_any(flat_keys) -> str:
  """A reader's name for the encoder a flat key set holds."""
  if encoder_layout(flat_keys) == LITE0:
    blocks, head = lite0_blocks(flat_keys)
    full = len(efficientnet.block_specs(4))
    if head:
      return (
        "EfficientNet-Lite0 (the whole trunk)"
        if blocks == full
        else f"EfficientNet-Lite0 with {blocks} blocks"
      )
    cut = len(efficientnet.block_specs(3))
    return (
      "EfficientNet-Lite0 cut at output stride 16"
      if blocks == cut
      else f"EfficientNet-Lite0 cut after {blocks} blocks"
    )
  return describe(*architecture(flat_keys))


def architecture(flat_keys) -> tuple[str, tuple[int, ...]]:
  """('bottleneck' | 'basic', blocks per stage) of a flat encoder key set."""
  blocks: dict[int, int] = {}
  bottleneck = False
  for key in flat_keys:
    match = BLOCK_NAME.fullmatch(key[1]) if len(key) > 2 else None
    if match:
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index + 1)
      bottleneck |= key[2] == "conv3"
  counts = tuple(blocks.get(stage, 0) for stage in range(1, 5))
  while counts and counts[-1] == 0:
    counts = counts[:-1]
  return ("bottleneck" if bottleneck else "basic"), counts


def describe(block: str, blocks: tuple[int, ...]) -> str:
  for depth, (block_cls, full_blocks) in resnet.ARCHITECTURES.items():
    if (block_cls is resnet.Bottleneck) == (block == "bottleneck") and full_blocks[
      : len(blocks)
    ] == blocks:
      name = f"ResNet-{depth}" if depth else "the tiny test ResNet (depth 0)"
      cut = "" if len(blocks) == 4 else f" cut after conv{len(blocks) + 1}_x"
      return f"{name}{cut}"
  return f"a ResNet with {block} blocks {list(blocks)}"


def check_architecture(source: Mapping[FlatKey, Any], target: Mapping[FlatKey, Any], path) -> None:
  """Fails, naming the mismatch, when the file's encoder cannot fill ours; before any key check.

  Compared: encoder kind, block type, blocks per stage, stem width and stage count (a file may
  hold more stages than the encoder runs).
  """
  source_layout, target_layout = encoder_layout(source), encoder_layout(target)
  if source_layout != target_layout:
    raise WeightImportError(
      f"{path}: wrong architecture: the file holds {describe_any(source)} but the encoder is "
      f"{describe_any(target)} (set model.encoder.name={source_layout} to match)"
    )
  if source_layout == LITE0:
    source_blocks, source_head = lite0_blocks(source)
    target_blocks, target_head = lite0_blocks(target)
    if source_blocks < target_blocks or (target_head and not source_head):
      raise WeightImportError(
        f"{path}: the file holds {describe_any(source)} but the encoder is {describe_any(target)}"
      )
    return
  source_block, source_blocks = architecture(source)
  target_block, target_blocks = architecture(target)
  common = min(len(source_blocks), len(target_blocks))
  if source_block != target_block or source_blocks[:common] != target_blocks[:common]:
    raise WeightImportError(
      f"{path}: depth mismatch: the file holds {describe(source_block, source_blocks)} "
      f"but the encoder is {describe(target_block, target_blocks)} (set model.encoder.depth to match)"
    )
  stem = ("params", "conv1", "kernel")
  if (
    stem in source and stem in target and source[stem].shape[-1:] != tuple(target[stem].shape[-1:])
  ):
    raise WeightImportError(
      f"{path}: width mismatch: the file's stem has {source[stem].shape[-1]} channels, the encoder's "
      f"{target[stem].shape[-1]} (set model.encoder.width to match)"
    )
  if len(source_blocks) < len(target_blocks):
    raise WeightImportError(
      f"{path}: the file stops after conv{len(source_blocks) + 1}_x but the encoder runs through "
      f"conv{len(target_blocks) + 1}_x (model.encoder.stages={len(target_blocks)})"
    )
