"""The models: an encoder and the head of the variant `config.model.name` names.

Every model is a `PrivacyModel`: an `encoder` and a `head`, the two top-level parameter
names the optimiser mask uses to freeze the encoder. `model.apply(variables, images, train=...)`
returns the output dict of docs/design.md; `method="head_from_features"` runs the head alone on
encoder features, `method="encode"` the encoder alone.

The heads come from the variant registry (registry.py): the paper's five register in
variants.py, a new one anywhere (docs/extending.md). The encoder is `model.encoder.name`:
`resnet` (the paper's ResNet-50; `depth` 0 is the tiny test encoder) or `efficientnet_lite0`
(ImageNet weights installed with the package). `stages` 3 cuts either at output stride 16
(ResNet: after conv4_x; Lite0: after its 112-channel stage), 4 runs the whole trunk; a variant
may fix its own cut (the pooled baselines use the whole trunk). The heads take whatever channel
count the encoder gives.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from privattnet_jax.models import (
  efficientnet,
  registry,
  resnet,
  variants,  # noqa: F401  Registers the paper's five.
)

# The variants the package registers itself; `registry.names()` lists every registered one.
MODEL_NAMES = registry.names()
ENCODER_NAMES = ("resnet", "efficientnet_lite0")

BATCHNORM_MODES = ("update", "frozen")
ATTRIBUTE_BIAS_INITS = ("prior", "uniform")  # model.attribute_bias_init


class PrivacyModel(nn.Module):
  """Encoder + head, with the encoder's freezing and BatchNorm behaviour.

  Attributes:
    encoder: the trunk (`resnet.ResNet` or `efficientnet.EfficientNetLite0`).
    head: a module mapping features (B, h, w, D) and `train` to the output dict.
    encoder_trainable: False (the paper): the encoder's output is `stop_gradient`ed, so its
      parameters get exactly zero gradient (the optimiser mask then gives them no update).
    encoder_batchnorm: 'update' (the authors' PyTorch behaviour: in training the encoder's
      BatchNorm normalises with batch statistics and its running averages keep updating, even
      when frozen) or 'frozen' (running averages always, never updated; needed for a feature
      cache). Applies whether or not the encoder is trainable.
  """

  encoder: nn.Module
  head: nn.Module
  encoder_trainable: bool = False
  encoder_batchnorm: str = "update"

  def __post_init__(self):
    if self.encoder_batchnorm not in BATCHNORM_MODES:
      raise ValueError(
        f"model.encoder.batchnorm must be one of {BATCHNORM_MODES}, got {self.encoder_batchnorm!r}"
      )
    super().__post_init__()

  def encode(self, images, train: bool):
    """(B, S, S, 3) ImageNet-normalised images -> encoder features (B, h, w, D)."""
    use_running_average = self.encoder_batchnorm == "frozen" or not train
    features = self.encoder(images, use_running_average=use_running_average)
    if not self.encoder_trainable:
      features = jax.lax.stop_gradient(features)
    return features

  def head_from_features(self, features, train: bool):
    """The head alone on encoder features (B, h, w, D), e.g. read from a feature cache."""
    return self.head(features, train=train)

  def __call__(self, images, train: bool):
    return self.head_from_features(self.encode(images, train), train)


def _positive_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field} must be a positive integer, got {value!r}")
  return value


def encoder_stages(model_config) -> int:
  """The encoder cut of the variant `model_config` names: its own, or `model.encoder.stages`."""
  return registry.lookup(model_config).stages(model_config.encoder)


def _encoder_name(encoder_config) -> str:
  name = encoder_config.get("name", "resnet")
  if name not in ENCODER_NAMES:
    raise ValueError(f"model.encoder.name must be one of {ENCODER_NAMES}, got {name!r}")
  return name


def encoder_output_stride(encoder_config, stages: int) -> int:
  """Input pixels per encoder output cell (16 at the conv4_x-like cut, 32 for the whole trunk)."""
  if _encoder_name(encoder_config) == "efficientnet_lite0":
    efficientnet.validate(stages)
    return efficientnet.output_stride(stages)
  resnet.validate(encoder_config.depth, encoder_config.width, stages)
  return resnet.output_stride(stages)


def encoder_output_channels(encoder_config, stages: int) -> int:
  """Channels D of the encoder's output (ResNet-50 at conv4_x: 1024; Lite0 at stride 16: 112)."""
  if _encoder_name(encoder_config) == "efficientnet_lite0":
    efficientnet.validate(stages)
    return efficientnet.output_channels(stages)
  resnet.validate(encoder_config.depth, encoder_config.width, stages)
  return resnet.output_channels(encoder_config.depth, encoder_config.width, stages)


def create_encoder(
  encoder_config, stages: int, dtype: Any = jnp.float32, batchnorm_axis_name: str | None = None
) -> nn.Module:
  """The trunk named by `model.encoder.name`, cut after `stages` (see the module docstring)."""
  if _encoder_name(encoder_config) == "efficientnet_lite0":
    return efficientnet.EfficientNetLite0(
      stages=stages, dtype=dtype, batchnorm_axis_name=batchnorm_axis_name
    )
  return resnet.ResNet(
    depth=encoder_config.depth,
    width=encoder_config.width,
    stages=stages,
    dtype=dtype,
    batchnorm_axis_name=batchnorm_axis_name,
  )


def create_model(
  model_config, num_outputs: int, batchnorm_axis_name: str | None = None
) -> PrivacyModel:
  """The model the `model` config section names, in its compute dtype (`half_precision`).

  num_outputs: P, the score width (1, or 30 with `score.per_profile`); attribute models
  (privattnet_mlc: 67, ap_pr: 68) do not use it.
  batchnorm_axis_name: the named device axis (inside shard_map/pmap) over which training-mode
  BatchNorm averages its statistics when `model.sync_batchnorm` is set; None outside one.
  """
  dtype = jnp.bfloat16 if model_config.half_precision else jnp.float32
  return build_model(model_config, num_outputs, dtype, batchnorm_axis_name)


def build_model(
  model_config,
  num_outputs: int,
  dtype: Any = jnp.float32,
  batchnorm_axis_name: str | None = None,
) -> PrivacyModel:
  """The model of a `config.model` section computing in `dtype`; see `create_model`."""
  variant = registry.lookup(model_config)
  num_outputs = _positive_int(num_outputs, "num_outputs")
  axis_name = batchnorm_axis_name if model_config.get("sync_batchnorm", True) else None
  encoder_config = model_config.encoder
  if not isinstance(encoder_config.trainable, bool):
    raise ValueError(
      f"model.encoder.trainable must be True or False, got {encoder_config.trainable!r}"
    )

  head = variant.build_head(
    model_config, num_outputs=num_outputs, dtype=dtype, batchnorm_axis_name=axis_name
  )
  encoder = create_encoder(encoder_config, variant.stages(encoder_config), dtype, axis_name)
  model = PrivacyModel(
    encoder=encoder,
    head=head,
    encoder_trainable=encoder_config.trainable,
    encoder_batchnorm=encoder_config.batchnorm,
  )
  return _interned(model)


def with_attribute_bias(params: dict, model_config, bias: np.ndarray) -> dict:
  """`params` with the attribute head's logit bias set from `bias` (68,), in attributes.tsv order.

  The variant names where its head keeps that bias (`registry.Variant.logits_bias`); a head of K
  attributes takes the last K entries (PrivAttNet_MLC's 67 leave out a0_safe; its logits are
  averaged over the steps, so each step's bias is the logit itself).
  """
  path = registry.lookup(model_config).logits_bias
  if path is None:
    raise ValueError(f"model {model_config.name!r} names no attribute logits' bias")

  def replaced(tree: dict, keys: tuple[str, ...]) -> dict:
    if len(keys) == 1:
      size = tree[keys[0]].shape[-1]
      return {**tree, keys[0]: jnp.asarray(np.asarray(bias, np.float32)[-size:])}
    return {**tree, keys[0]: replaced(dict(tree[keys[0]]), keys[1:])}

  return {**params, "head": replaced(dict(params["head"]), path)}


@functools.lru_cache(maxsize=32)
def _interned(model: PrivacyModel) -> PrivacyModel:
  """The first of the equal models made in this process: one object per config.

  Linen modules compare by value, but a TrainState holds the bound `model.apply`, which compares by
  identity: one object per config lets a second run with an equal config reuse the steps jitted
  for the first.
  """
  return model
