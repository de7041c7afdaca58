"""`nn.Conv` with 1x1 convolutions computed as matrix products.

A 1x1 convolution is a matrix product over the channel axis, but XLA:CPU runs it through its
convolution kernel, several times slower than the same product as a `dot_general`. Its weight
gradient is worse: XLA differentiates it as a convolution with batch and channels swapped, behind a
transpose of the whole feature map (docs/benchmarks.md, "Where the image step's time went, and what
changed"). Most of ResNet-50's and all of EfficientNet-Lite0's pointwise layers are 1x1, so every
encoder and the attention head build their convolutions from `Conv` here. The kernel keeps
`nn.Conv`'s shape (1, 1, C_in, C_out): the parameters, checkpoints and weight files are those of
`nn.Conv`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def _is_pointwise(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """True when the convolution is a strided 1x1 NHWC/HWIO one without padding or grouping."""
  if rhs.ndim != 4 or rhs.shape[:2] != (1, 1) or feature_group_count != 1:
    return False
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return False
  if dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC):
    return False
  # With a 1x1 kernel 'SAME' and 'VALID' both pad nothing; explicit padding must be zero.
  return isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
) -> jax.Array:
  """`lax.conv_general_dilated`, but a 1x1 convolution is a strided slice and a `dot_general`.

  The `dot_general` runs over the channel axis: the same sums, in another order.
  """
  if not _is_pointwise(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  stride_h, stride_w = window_strides
  if (stride_h, stride_w) != (1, 1):
    lhs = lhs[:, ::stride_h, ::stride_w, :]
  return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision, **kwargs)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
