"""The paper's five variants, registered like any other (see registry.py and docs/extending.md).

| name | encoder | head | outputs |
|---|---|---|---|
| privattnet | stages from config (3: conv4_x, the paper) | attention + LSTM, per-step MLP regressor | score, step_scores, attention |
| privattnet_mlc | same | same trunk, per-step 67-way logit head | attribute_logits (67), attention |
| privnet | always through conv5_x | global average pool, Dense(P) | score |
| ap_pr | always through conv5_x | global average pool, Dense(68) | attribute_logits (68) |
| pr_cnn | always through conv5_x | pool, dropout 0.4, 68, 128 sigmoid, 128 sigmoid, P | score |

The pooled models (privnet, ap_pr, pr_cnn) ignore `model.encoder.stages`: they are defined on the
full trunk (AMNet's `ResNet50FT`, VISPR's classifiers). Attribute models ignore `num_outputs`
(their width is the attribute count).
"""

from __future__ import annotations

from privattnet_jax.data import attributes
from privattnet_jax.models import heads, registry
from privattnet_jax.models.attention import AttentionHead

NUM_NON_SAFE_ATTRIBUTES = attributes.NUM_ATTRIBUTES - 1  # 67: every attribute but a0_safe.


def _attention_head(model_config, num_outputs, dtype, batchnorm_axis_name, mlc: bool):
  attention_config = model_config.attention
  return AttentionHead(
    num_outputs=NUM_NON_SAFE_ATTRIBUTES if mlc else num_outputs,
    output_key="attribute_logits" if mlc else "score",
    steps=attention_config.steps,
    hidden_size=attention_config.hidden_size,
    regressor_hidden=attention_config.regressor_hidden,
    feature_dropout=attention_config.feature_dropout,
    dropout=attention_config.dropout,
    output=attention_config.output,
    dtype=dtype,
    batchnorm_axis_name=batchnorm_axis_name,
  )


def privattnet(model_config, num_outputs, dtype, batchnorm_axis_name):
  """PrivAttNet: the score regressed from attention-pooled features."""
  return _attention_head(model_config, num_outputs, dtype, batchnorm_axis_name, mlc=False)


def privattnet_mlc(model_config, num_outputs, dtype, batchnorm_axis_name):
  """PrivAttNet_MLC: the same trunk predicting the 67 non-safe attributes."""
  return _attention_head(model_config, num_outputs, dtype, batchnorm_axis_name, mlc=True)


def privnet(model_config, num_outputs, dtype, batchnorm_axis_name):
  """PrivNet: the score from globally pooled features, the no-attention baseline."""
  return heads.PooledLinearHead(num_outputs, "score", dtype=dtype)


def ap_pr(model_config, num_outputs, dtype, batchnorm_axis_name):
  """AP-PR: the 68 attributes from globally pooled features; the score pooled from them."""
  return heads.PooledLinearHead(attributes.NUM_ATTRIBUTES, "attribute_logits", dtype=dtype)


def pr_cnn(model_config, num_outputs, dtype, batchnorm_axis_name):
  """PR-CNN: the score through an attribute-width bottleneck of sigmoid layers."""
  return heads.ProfileHead(num_outputs, num_attributes=attributes.NUM_ATTRIBUTES, dtype=dtype)


registry.register("privattnet", privattnet, kind="regression", attention=True)
registry.register(
  "privattnet_mlc",
  privattnet_mlc,
  kind="attributes",
  attention=True,
  logits_bias=("steps", "regressor", "output", "bias"),
)
registry.register("privnet", privnet, kind="regression", encoder_stages=4)
registry.register(
  "ap_pr", ap_pr, kind="attributes", encoder_stages=4, logits_bias=("output", "bias")
)
registry.register("pr_cnn", pr_cnn, kind="regression", encoder_stages=4)
