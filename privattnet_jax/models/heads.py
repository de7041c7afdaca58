"""Output heads: the per-step MLP regressor and the pooled heads of PrivNet, AP-PR and PR-CNN.

Every head takes encoder features (B, h, w, D) and returns the model-output dict of
docs/design.md, so `head_from_features` (the frozen-encoder feature cache) works for every model.
Layers are initialised as PyTorch initialises them (`nn.Linear`, `nn.Conv2d`, `nn.LSTM`: uniform
in +-1/sqrt(fan_in)), so training from the authors' hyperparameters starts from the same
distribution as their code.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from privattnet_jax.models import dropout


def symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """U(-bound, bound): torch's default for Linear/Conv weights and biases and for LSTM tensors."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(
  features: int,
  fan_in: int,
  *,
  use_bias: bool = True,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Dense:
  """`nn.Dense` initialised like `torch.nn.Linear(fan_in, features, bias=use_bias)`."""
  init = symmetric_uniform(1.0 / math.sqrt(fan_in))
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=init,
    bias_init=init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def global_average_pool(features):
  """(B, h, w, D) -> (B, D), torchvision's `avgpool` (AMNet's AvgPool2d(7) at 224 px)."""
  return jnp.mean(features, axis=(1, 2))


class MLPRegressor(nn.Module):
  """Dense(hidden) -> ReLU -> dropout -> Dense(num_outputs): AMNet's `regnet1`/`regnet4`.

  The per-step head of the attention models: P scores for PrivAttNet, 67 attribute logits for
  PrivAttNet_MLC.
  """

  hidden: int
  num_outputs: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = torch_linear(self.hidden, x.shape[-1], dtype=self.dtype, name="hidden")(x)
    x = dropout.Dropout(self.dropout_rate, name="dropout")(nn.relu(x), deterministic=deterministic)
    return torch_linear(self.num_outputs, self.hidden, dtype=self.dtype, name="output")(x)


class PooledLinearHead(nn.Module):
  """Global average pool -> Dense(num_outputs), returned under `output_key`.

  PrivNet (`score`): AMNet's fine-tune baseline `ResNet50FT` (avgpool, then `Linear(2048, 1)`).
  AP-PR (`attribute_logits`, 68): VISPR's attribute predictor, a linear multi-label classifier.
  """

  num_outputs: int
  output_key: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool):
    del train  # No dropout or BatchNorm here; the argument keeps every head's signature alike.
    pooled = global_average_pool(features)
    out = torch_linear(self.num_outputs, pooled.shape[-1], dtype=self.dtype, name="output")(pooled)
    return {self.output_key: out.astype(jnp.float32)}


class ProfileHead(nn.Module):
  """PR-CNN (Orekondy et al. 2017): pool -> dropout -> 68 -> 128 sigmoid -> 128 sigmoid -> P.

  As VISPR's `googlenet-prcnn` prototxt: GoogLeNet's pool5 and its dropout 0.4, the 68-way
  attribute layer (linear, no loss of its own), `fc_ps_1`/`fc_ps_2` with sigmoids, `fc9` with
  one output per profile. Our ResNet replaces GoogLeNet.
  """

  num_outputs: int
  num_attributes: int = 68
  hidden: int = 128
  dropout_rate: float = 0.4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool):
    x = global_average_pool(features)
    x = dropout.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)
    x = torch_linear(self.num_attributes, x.shape[-1], dtype=self.dtype, name="attributes")(x)
    x = nn.sigmoid(
      torch_linear(self.hidden, self.num_attributes, dtype=self.dtype, name="profile_hidden1")(x)
    )
    x = nn.sigmoid(
      torch_linear(self.hidden, self.hidden, dtype=self.dtype, name="profile_hidden2")(x)
    )
    out = torch_linear(self.num_outputs, self.hidden, dtype=self.dtype, name="output")(x)
    return {"score": out.astype(jnp.float32)}
