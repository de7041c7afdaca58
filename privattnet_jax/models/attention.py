"""The PrivAttNet head: soft attention over the encoder grid driving an LSTM for T steps.

It is AMNet's head (Fajtl et al. 2018; the authors' PrivAttNet code is AMNet with a VISPR loader),
step for step:

1. a = dropout0.8(ReLU(BN(conv1x1_D->D(features)))), flattened to (B, L, D), L = h * w.
2. h0 = tanh(Dense(mean_L a)), c0 = tanh(Dense(mean_L a)).
3. keys, once: e = dropout0.5(ReLU(Dense_noBias D->D(a))). Its dropout mask, like a's, is drawn
   once and shared by all steps.
4. per step, from the query q (h0 first, then the previous step's h_out):
   s = Dense_noBias D->1(dropout0.5(ReLU(e + Dense H->L(q)[:, :, None]))), alpha = softmax_L(s),
   z = sum_L alpha * a, (c, h) = LSTM((c, h), z), h_out = dropout0.5(h),
   y = Dense P(dropout0.5(ReLU(Dense 512(h_out)))).
5. output: the mean of y_1..y_T (or the last step).

The grid-size tie: the query projection Dense H->L has one output per grid cell, so its kernel
is (H, L) with L fixed by the input used at `init` (196 at 224 px with the conv4_x cut). Applying
the head to another grid (another image size) raises a ValueError naming both grids; this is the
authors' design, kept on purpose. Train, evaluate and predict at `config.input.image_size` (the input
pipeline resizes every eval image to that square).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from privattnet_jax.models import convolution
from privattnet_jax.models import dropout
from privattnet_jax.models import heads
from privattnet_jax.models.resnet import BATCHNORM_EPSILON, BATCHNORM_MOMENTUM

OUTPUT_MODES = ("mean", "last")


class AttentionStep(nn.Module):
  """One step: attend from the query, advance the LSTM, score. `nn.scan` unrolls it T times.

  The carry is `((c, h), query)`. As in AMNet's code (`h, rnn_state = self.rnn(z, rnn_state);
  h = self.drop50(h)`), the LSTM's own state (c, h) goes to the next step undropped, while the
  next step's attention query and this step's regressor read h_out = dropout(h). In eval mode
  the two coincide.
  """

  hidden_size: int
  regressor_hidden: int
  num_outputs: int
  dropout_rate: float
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, features, keys):
    lstm_state, query = carry
    num_locations, channels = features.shape[1], features.shape[2]
    # H -> L with bias: one scalar per grid cell, added to all D channels of that cell's key.
    location_bias = heads.torch_linear(
      num_locations, self.hidden_size, dtype=self.dtype, name="query"
    )(query)
    energy = nn.relu(keys + location_bias[:, :, None])
    energy = dropout.Dropout(self.dropout_rate, name="energy_dropout")(
      energy, deterministic=self.deterministic
    )
    logits = heads.torch_linear(
      1, channels, use_bias=False, dtype=self.dtype, name="attention_logit"
    )(energy)
    attention = jax.nn.softmax(logits[..., 0].astype(jnp.float32), axis=-1)  # (B, L), fp32 always.
    context = jnp.einsum("bl,bld->bd", attention, features.astype(jnp.float32)).astype(self.dtype)

    lstm_init = heads.symmetric_uniform(1.0 / math.sqrt(self.hidden_size))  # torch.nn.LSTM's init.
    lstm_state, hidden = nn.OptimizedLSTMCell(
      self.hidden_size,
      kernel_init=lstm_init,
      recurrent_kernel_init=lstm_init,
      bias_init=lstm_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="lstm",
    )(lstm_state, context)
    hidden_out = dropout.Dropout(self.dropout_rate, name="hidden_dropout")(
      hidden, deterministic=self.deterministic
    )
    step_output = heads.MLPRegressor(
      self.regressor_hidden, self.num_outputs, self.dropout_rate, dtype=self.dtype, name="regressor"
    )(hidden_out, self.deterministic)
    return (lstm_state, hidden_out), (attention, step_output.astype(jnp.float32))


class AttentionHead(nn.Module):
  """Encoder features (B, h, w, D) -> {output_key: (B, P), 'attention': (B, T, L), ...}.

  Attributes:
    num_outputs: P, the per-step output width (1 or 30 scores; 67 attribute logits for MLC).
    output_key: 'score' (PrivAttNet; `step_scores` (B, T, P) is returned too) or
      'attribute_logits' (PrivAttNet_MLC: the per-step head is a 67-way logit head and the
      output is the mean of the per-step logits).
    steps: T. hidden_size: H, the LSTM width. regressor_hidden: the per-step MLP width.
    feature_dropout: on a (0.8). dropout: everywhere else (0.5).
    output: 'mean' over steps, or 'last' step only.
    batchnorm_axis_name: device axis for synchronised BatchNorm statistics in training, or None.
  """

  num_outputs: int
  output_key: str = "score"
  steps: int = 3
  hidden_size: int = 1024
  regressor_hidden: int = 512
  feature_dropout: float = 0.8
  dropout: float = 0.5
  output: str = "mean"
  dtype: Any = jnp.float32
  batchnorm_axis_name: str | None = None

  def __post_init__(self):
    if self.output not in OUTPUT_MODES:
      raise ValueError(f"model.attention.output must be one of {OUTPUT_MODES}, got {self.output!r}")
    if self.output_key not in ("score", "attribute_logits"):
      raise ValueError(f"output_key must be 'score' or 'attribute_logits', got {self.output_key!r}")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"model.attention.steps must be a positive integer, got {self.steps!r}")
    for name in ("hidden_size", "regressor_hidden", "num_outputs"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("feature_dropout", "dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.attention.{name} must lie in [0, 1), got {getattr(self, name)!r}")
    super().__post_init__()

  def _check_grid(self, num_locations: int, grid: tuple[int, int]) -> None:
    """Raises if the query projection was built for another grid (see the module docstring)."""
    if self.is_initializing():
      return
    query = self.variables.get("params", {}).get("steps", {}).get("query", {})
    if "kernel" in query and query["kernel"].shape[-1] != num_locations:
      raise ValueError(
        f"PrivAttNet's attention head was initialised for a grid of {query['kernel'].shape[-1]} "
        f"cells but got a {grid[0]}x{grid[1]} grid ({num_locations} cells): its H->L query "
        "projection ties it to one grid size (as in the authors' model). Use the image size "
        "the model was initialised and trained with (config.input.image_size)."
      )

  @nn.compact
  def __call__(self, features, train: bool):
    batch, height, width, channels = features.shape
    num_locations = height * width
    self._check_grid(num_locations, (height, width))
    deterministic = not train

    # Step 1: the annotation vectors a.
    conv_init = heads.symmetric_uniform(1.0 / math.sqrt(channels))  # torch.nn.Conv2d's init.
    x = convolution.Conv(
      channels,
      (1, 1),
      use_bias=True,
      kernel_init=conv_init,
      bias_init=conv_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="feature_conv",
    )(features.astype(self.dtype))
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=BATCHNORM_MOMENTUM,
      epsilon=BATCHNORM_EPSILON,
      axis_name=self.batchnorm_axis_name if train else None,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="feature_bn",
    )(x)
    x = dropout.Dropout(self.feature_dropout, name="feature_dropout")(
      nn.relu(x), deterministic=deterministic
    )
    annotations = x.reshape(batch, num_locations, channels)  # Row-major: cell = row * width + col.

    # Step 2: the initial LSTM state; h0 is also the first attention query.
    mean_annotation = jnp.mean(annotations, axis=1)
    h0 = jnp.tanh(
      heads.torch_linear(self.hidden_size, channels, dtype=self.dtype, name="init_h")(
        mean_annotation
      )
    )
    c0 = jnp.tanh(
      heads.torch_linear(self.hidden_size, channels, dtype=self.dtype, name="init_c")(
        mean_annotation
      )
    )
    h0, c0 = h0.astype(self.dtype), c0.astype(self.dtype)

    # Step 3: the attention keys, computed once outside the step loop.
    keys = heads.torch_linear(channels, channels, use_bias=False, dtype=self.dtype, name="keys")(
      annotations
    )
    keys = dropout.Dropout(self.dropout, name="key_dropout")(
      nn.relu(keys), deterministic=deterministic
    )

    # Step 4: T steps, one set of parameters, a fresh dropout key per step. Unrolled (the same
    # values): a rolled loop stacks each step's (B, L, D) residuals into buffers it first zeroes,
    # a cost the head step need not pay (docs/benchmarks.md, "Where the image step's time went").
    steps = nn.scan(
      AttentionStep,
      variable_broadcast="params",
      split_rngs={"params": False, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast),
      out_axes=1,
      length=self.steps,
      unroll=self.steps,
    )(
      self.hidden_size,
      self.regressor_hidden,
      self.num_outputs,
      self.dropout,
      deterministic,
      dtype=self.dtype,
      name="steps",
    )
    _, (attention, step_outputs) = steps(((c0, h0), h0), annotations, keys)

    # Step 5: pool the per-step outputs.
    pooled = jnp.mean(step_outputs, axis=1) if self.output == "mean" else step_outputs[:, -1]
    outputs = {self.output_key: pooled, "attention": attention}
    if self.output_key == "score":
      outputs["step_scores"] = step_outputs
    return outputs
