"""ResNet v1.5 encoder in torchvision's layout, so ImageNet weights map onto it mechanically.

Layout and parameter shapes follow `torchvision.models.resnet`: a 7x7/2 stem conv, BatchNorm,
ReLU and a 3x3/2 max pool (padding 1), then four stages of blocks; bottleneck blocks carry the
stride in their 3x3 conv (v1.5), BasicBlocks serve depths 18 and 34. Convolutions have no bias
and pad symmetrically like torch (explicit `((p, p), (p, p))`, never 'SAME', which pads
asymmetrically at stride 2 and would shift every feature map against PyTorch's).

Names mirror torchvision's state-dict keys with dots inside a block path turned into `_`:
`conv1`, `bn1`, `layer3_5/conv2`, `layer2_0/downsample_conv`, `layer2_0/downsample_bn`
(torchvision's `layer2.0.downsample.0` / `.1`). `privattnet_jax.models.weights` relies on this.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from privattnet_jax.models import convolution

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
TORCHVISION_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.BatchNorm2d(eps=1e-5, momentum=0.1): flax's momentum is the running average's decay.
BATCHNORM_EPSILON = 1e-5
BATCHNORM_MOMENTUM = 0.9

ModuleDef = Callable[..., nn.Module]


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); the stride sits in the first."""

  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(
      self.planes,
      (3, 3),
      strides=(self.stride, self.stride),
      padding=((1, 1), (1, 1)),
      name="conv1",
    )(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes * self.expansion:
      residual = self.conv(
        self.planes * self.expansion,
        (1, 1),
        strides=(self.stride, self.stride),
        padding=((0, 0), (0, 0)),
        name="downsample_conv",
      )(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50)."""

  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.planes, (1, 1), padding=((0, 0), (0, 0)), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(
      self.planes,
      (3, 3),
      strides=(self.stride, self.stride),
      padding=((1, 1), (1, 1)),
      name="conv2",
    )(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.planes * self.expansion, (1, 1), padding=((0, 0), (0, 0)), name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != self.planes * self.expansion:
      residual = self.conv(
        self.planes * self.expansion,
        (1, 1),
        strides=(self.stride, self.stride),
        padding=((0, 0), (0, 0)),
        name="downsample_conv",
      )(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


# depth -> (block, blocks per stage). Depth 0 is the tiny encoder for tests and the demo: one
# bottleneck per stage, so it keeps every code path (downsample, stride in the 3x3) at a fraction
# of the cost; pair it with a small `width`.
ARCHITECTURES: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
  0: (Bottleneck, (1, 1, 1, 1)),
  18: (BasicBlock, (2, 2, 2, 2)),
  34: (BasicBlock, (3, 4, 6, 3)),
  50: (Bottleneck, (3, 4, 6, 3)),
}


def output_channels(depth: int, width: int, stages: int) -> int:
  """Channels D of the encoder's last feature map (1024 for ResNet-50 cut after conv4_x)."""
  block, _ = ARCHITECTURES[depth]
  return width * 2 ** (stages - 1) * block.expansion


def output_stride(stages: int) -> int:
  """Input pixels per feature-map cell: 16 after conv4_x (14x14 at 224 px), 32 after conv5_x."""
  return 2 ** (stages + 1)


def validate(depth: int, width: int, stages: int) -> None:
  if depth not in ARCHITECTURES:
    raise ValueError(
      f"model.encoder.depth must be one of {sorted(ARCHITECTURES)} (0: the tiny test encoder), got {depth!r}"
    )
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"model.encoder.width must be a positive integer, got {width!r}")
  if stages not in (3, 4):
    raise ValueError(
      f"model.encoder.stages must be 3 (cut after conv4_x) or 4 (through conv5_x), got {stages!r}"
    )


class ResNet(nn.Module):
  """The trunk without its classifier: (B, S, S, 3) images -> (B, S/r, S/r, D), r = 16 or 32.

  Attributes:
    depth: 18, 34, 50, or 0 (tiny).
    width: stem width; 64 is torchvision's, stage k has width * 2**k planes.
    stages: 3 stops after conv4_x (torchvision `layer3`, the paper's cut), 4 runs through conv5_x.
    dtype: compute dtype; parameters stay float32.
    batchnorm_axis_name: the device axis over which training-mode BatchNorm pools its batch
      statistics (synchronised BatchNorm: results independent of the device count), or None.
  """

  depth: int = 50
  width: int = 64
  stages: int = 3
  dtype: Any = jnp.float32
  batchnorm_axis_name: str | None = None

  def __post_init__(self):
    validate(self.depth, self.width, self.stages)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, use_running_average: bool):
    """`use_running_average`: BatchNorm uses, and leaves alone, its running statistics."""
    block, blocks_per_stage = ARCHITECTURES[self.depth]
    conv = functools.partial(
      convolution.Conv,
      use_bias=False,
      kernel_init=TORCHVISION_CONV_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
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
    x = conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in range(self.stages):
      for index in range(blocks_per_stage[stage]):
        stride = 2 if stage > 0 and index == 0 else 1
        x = block(self.width * 2**stage, stride, conv, norm, name=f"layer{stage + 1}_{index}")(x)
    return x
