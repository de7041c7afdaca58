"""Model shapes, parameter counts, the attention head against a numpy transcription of the spec,
encoder freezing and BatchNorm modes, the grid-size tie and the bf16 path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from privattnet_jax import models
from privattnet_jax.models import convolution
from privattnet_jax.models.attention import AttentionHead
from privattnet_jax.models.dropout import Dropout
from privattnet_jax.models.resnet import ResNet

IMAGE_SIZE = 64  # Tiny encoder: grid 4x4 after conv4_x, 2x2 after conv5_x.


def tiny_config(name="privattnet", **attention):
  config = default.get_config()
  config.model.name = name
  config.model.encoder.depth = 0
  config.model.encoder.width = 8
  config.model.attention.hidden_size = 16
  config.model.attention.regressor_hidden = 8
  for key, value in attention.items():
    config.model.attention[key] = value
  return config


def images(batch=2, size=IMAGE_SIZE, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def init(model, x):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def randomise_batch_stats(variables, seed=3):
  """Running statistics unlike their init values, so eval-mode BatchNorm is not an identity."""
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5) for k, leaf in zip(keys, leaves)]
  return {**variables, "batch_stats": jax.tree.unflatten(treedef, new)}


EXPECTED_KEYS = {
  "privattnet": {"score": 3, "step_scores": (3, 3), "attention": (3, 16)},
  "privattnet_mlc": {"attribute_logits": 67, "attention": (3, 16)},
  "privnet": {"score": 3},
  "ap_pr": {"attribute_logits": 68},
  "pr_cnn": {"score": 3},
}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_shapes_and_parameter_groups(name):
  model = models.create_model(tiny_config(name).model, num_outputs=3)
  x = images()
  variables = init(model, x)
  assert set(variables["params"]) == {"encoder", "head"}
  outputs, _ = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
  )
  expected = {key: (2, *np.atleast_1d(shape)) for key, shape in EXPECTED_KEYS[name].items()}
  assert {key: value.shape for key, value in outputs.items()} == expected
  for value in outputs.values():
    assert value.dtype == jnp.float32
    assert np.all(np.isfinite(value))


def test_per_profile_width():
  model = models.create_model(tiny_config("privattnet").model, num_outputs=30)
  x = images()
  outputs = model.apply(init(model, x), x, train=False)
  assert outputs["score"].shape == (2, 30)
  assert outputs["step_scores"].shape == (2, 3, 30)


@pytest.mark.parametrize("name", ["privnet", "ap_pr", "pr_cnn"])
def test_pooled_models_always_use_the_full_trunk(name):
  config = tiny_config(name)
  config.model.encoder.stages = 3
  model = models.create_model(config.model, num_outputs=1)
  variables = jax.eval_shape(lambda: init(model, images()))
  assert "layer4_0" in variables["params"]["encoder"]


def resnet_variables(depth, stages, size=224):
  model = ResNet(depth=depth, stages=stages)
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, use_running_average=True))
  out = jax.eval_shape(lambda v: model.apply(v, x, use_running_average=True), variables)
  return variables, out.shape


# torchvision's totals (25,557,032 for resnet50, 11,689,512 for resnet18, 21,797,672 for resnet34)
# minus the 1000-way fc; the conv4_x cut also drops layer4 (14,964,736 parameters).
@pytest.mark.parametrize(
  "depth, stages, expected_params, expected_shape",
  [
    (50, 3, 25_557_032 - 2_049_000 - 14_964_736, (1, 14, 14, 1024)),
    (50, 4, 25_557_032 - 2_049_000, (1, 7, 7, 2048)),
    (18, 4, 11_689_512 - 513_000, (1, 7, 7, 512)),
    (34, 4, 21_797_672 - 513_000, (1, 7, 7, 512)),
  ],
)
def test_resnet_parameter_counts_match_torchvision(depth, stages, expected_params, expected_shape):
  variables, shape = resnet_variables(depth, stages)
  assert count(variables["params"]) == expected_params
  assert shape == expected_shape
  # Every BatchNorm has a running mean and variance per channel, as many as its scale and bias.
  bn_params = [
    v
    for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
    if jax.tree_util.keystr(path).split("'")[-2] in ("scale", "bias")
  ]
  assert count(variables["batch_stats"]) == count(bn_params)


def test_resnet50_names_and_shapes_follow_torchvision():
  variables, _ = resnet_variables(50, 4)
  params = variables["params"]
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
    f"layer{s + 1}_{b}" for s, n in enumerate((3, 4, 6, 3)) for b in range(n)
  )
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert params["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert params["layer3_5"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
  assert "downsample_conv" not in params["layer2_1"]
  assert all(
    "bias" not in module for name, module in params["layer4_2"].items() if name.startswith("conv")
  )


def test_attention_head_parameter_count_at_paper_size():
  head = AttentionHead(num_outputs=1)
  variables = jax.eval_shape(
    lambda: head.init(jax.random.key(0), jnp.zeros((1, 14, 14, 1024)), train=False)
  )
  d, h, l = 1024, 1024, 196
  expected = (d * d + d) + 2 * d + 2 * (d * h + h) + d * d + (h * l + l) + d
  expected += d * 4 * h + h * 4 * h + 4 * h  # flax's LSTM: one bias per gate (torch has two).
  expected += (h * 512 + 512) + (512 + 1)
  assert count(variables["params"]) == expected == 13_319_365


def test_attention_rows_are_distributions():
  model = models.create_model(tiny_config().model, num_outputs=1)
  x = images(batch=3)
  variables = init(model, x)
  for train in (False, True):
    outputs, _ = model.apply(
      variables, x, train=train, rngs={"dropout": jax.random.key(5)}, mutable=["batch_stats"]
    )
    attention = np.asarray(outputs["attention"])
    assert np.all(attention >= 0)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_scan_unrolls_steps_with_shared_parameters(steps):
  reference = jax.eval_shape(
    lambda: init(models.create_model(tiny_config(steps=3).model, 1), images())
  )
  model = models.create_model(tiny_config(steps=steps).model, num_outputs=1)
  x = images()
  variables = init(model, x)
  # One copy of each step parameter, whatever T: no leading step axis anywhere.
  assert jax.tree.map(lambda v: v.shape, variables) == jax.tree.map(lambda v: v.shape, reference)
  assert variables["params"]["head"]["steps"]["lstm"]["hi"]["kernel"].shape == (16, 16)
  outputs = model.apply(variables, x, train=False)
  assert outputs["attention"].shape == (2, steps, 16)
  assert outputs["step_scores"].shape == (2, steps, 1)
  if steps > 1:  # The state evolves: steps attend and score differently.
    assert not np.allclose(outputs["attention"][:, 0], outputs["attention"][:, 1])
    assert not np.allclose(outputs["step_scores"][:, 0], outputs["step_scores"][:, 1])


def numpy_head(params, stats, features, output, hidden_dropout=1.0):
  """Steps 1-5 of the spec in float64 numpy, eval mode, from the flax parameters.

  `hidden_dropout` stands in for the LSTM output's dropout (a fixed factor): the next query and
  the regressor read the scaled h_out, the LSTM's own carry stays unscaled.
  """
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  s = jax.tree.map(lambda v: np.asarray(v, np.float64), stats)
  relu = lambda v: np.maximum(v, 0)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  dense = lambda v, layer: v @ layer["kernel"] + layer.get("bias", 0)
  batch, height, width, channels = features.shape
  a = np.asarray(features, np.float64).reshape(batch, height * width, channels)
  a = a @ p["feature_conv"]["kernel"][0, 0] + p["feature_conv"]["bias"]
  a = (a - s["feature_bn"]["mean"]) / np.sqrt(s["feature_bn"]["var"] + 1e-5)
  a = relu(a * p["feature_bn"]["scale"] + p["feature_bn"]["bias"])
  h = np.tanh(dense(a.mean(1), p["init_h"]))
  c = np.tanh(dense(a.mean(1), p["init_c"]))
  e = relu(dense(a, p["keys"]))
  step, lstm = p["steps"], p["steps"]["lstm"]
  alphas, ys = [], []
  query = h
  for _ in range(3):
    logits = dense(relu(e + dense(query, step["query"])[:, :, None]), step["attention_logit"])[
      ..., 0
    ]
    alpha = np.exp(logits - logits.max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    z = np.einsum("bl,bld->bd", alpha, a)
    gate = lambda g: dense(z, lstm["i" + g]) + dense(h, lstm["h" + g])
    c = sigmoid(gate("f")) * c + sigmoid(gate("i")) * np.tanh(gate("g"))
    h = sigmoid(gate("o")) * np.tanh(c)
    query = hidden_dropout * h
    ys.append(dense(relu(dense(query, step["regressor"]["hidden"])), step["regressor"]["output"]))
    alphas.append(alpha)
  ys = np.stack(ys, 1)
  return (ys.mean(1) if output == "mean" else ys[:, -1]), ys, np.stack(alphas, 1)


@pytest.mark.parametrize("output", ["mean", "last"])
def test_head_matches_numpy_transcription_of_the_spec(output):
  head = AttentionHead(num_outputs=2, hidden_size=16, regressor_hidden=8, output=output)
  features = jax.random.normal(jax.random.key(0), (2, 3, 4, 12))  # A non-square grid.
  variables = randomise_batch_stats(head.init(jax.random.key(1), features, train=False))
  outputs = head.apply(variables, features, train=False)
  score, step_scores, attention = numpy_head(
    variables["params"], variables["batch_stats"], features, output
  )
  np.testing.assert_allclose(outputs["score"], score, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(outputs["step_scores"], step_scores, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(outputs["attention"], attention, rtol=1e-4, atol=1e-7)


def test_only_the_query_and_regressor_read_the_dropped_out_hidden_state():
  """Replaces the LSTM output's dropout by a fixed x2 (its keep-all scaling at p=0.5)."""
  head = AttentionHead(num_outputs=2, hidden_size=16, regressor_hidden=8)
  features = jax.random.normal(jax.random.key(0), (2, 3, 3, 12))
  variables = randomise_batch_stats(head.init(jax.random.key(1), features, train=False))

  def double_hidden_dropout(next_fun, args, kwargs, context):
    if isinstance(context.module, Dropout) and context.module.name == "hidden_dropout":
      return 2.0 * args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(double_hidden_dropout):
    outputs = head.apply(variables, features, train=False)
  score, step_scores, attention = numpy_head(
    variables["params"], variables["batch_stats"], features, "mean", hidden_dropout=2.0
  )
  np.testing.assert_allclose(outputs["step_scores"], step_scores, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(outputs["attention"], attention, rtol=1e-4, atol=1e-7)


def test_dropout_is_active_in_training_and_follows_the_rng():
  model = models.create_model(tiny_config().model, num_outputs=1)
  x = images()
  variables = init(model, x)
  run = lambda seed: model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"]
  )[0]["step_scores"]
  np.testing.assert_array_equal(run(7), run(7))
  assert not np.allclose(run(7), run(8))


def encoder_and_head_gradients(trainable):
  config = tiny_config()
  config.model.encoder.trainable = trainable
  model = models.create_model(config.model, num_outputs=1)
  x = images()
  variables = init(model, x)

  def loss(params):
    outputs, _ = model.apply(
      {**variables, "params": params},
      x,
      train=True,
      rngs={"dropout": jax.random.key(4)},
      mutable=["batch_stats"],
    )
    return jnp.sum(outputs["score"] ** 2) + jnp.sum(outputs["attention"] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)))
  return norm(grads["encoder"]), norm(grads["head"]), grads


def test_frozen_encoder_gets_zero_gradient():
  encoder_norm, head_norm, grads = encoder_and_head_gradients(trainable=False)
  assert encoder_norm == 0.0
  assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(grads["encoder"]))
  assert head_norm > 0
  trainable_encoder_norm, _, _ = encoder_and_head_gradients(trainable=True)
  assert trainable_encoder_norm > 0


@pytest.mark.parametrize("mode", ["update", "frozen"])
def test_encoder_batchnorm_modes(mode):
  config = tiny_config()
  config.model.encoder.batchnorm = mode
  model = models.create_model(config.model, num_outputs=1)
  x = images(batch=4)
  variables = randomise_batch_stats(init(model, x))
  _, updates = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
  )
  changed = lambda part: any(
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(variables["batch_stats"][part]), jax.tree.leaves(updates["batch_stats"][part])
    )
  )
  assert changed("encoder") == (mode == "update")
  assert changed("head")  # The head's BatchNorm trains in both modes.
  train_features = model.apply(variables, x, train=True, method="encode", mutable=["batch_stats"])[
    0
  ]
  eval_features = model.apply(variables, x, train=False, method="encode")
  # 'frozen' normalises with running averages in training too; 'update' with batch statistics.
  assert np.allclose(train_features, eval_features) == (mode == "frozen")
  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, eval_updates["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_head_from_features_equals_the_full_forward(name):
  model = models.create_model(tiny_config(name).model, num_outputs=2)
  x = images()
  variables = randomise_batch_stats(init(model, x))
  full = model.apply(variables, x, train=False)
  features = model.apply(variables, x, train=False, method="encode")
  from_features = model.apply(variables, features, train=False, method="head_from_features")
  assert set(full) == set(from_features)
  for key in full:
    np.testing.assert_allclose(from_features[key], full[key], rtol=1e-6, atol=1e-6)


def test_another_grid_size_is_refused():
  model = models.create_model(tiny_config().model, num_outputs=1)
  variables = init(model, images(size=64))
  with pytest.raises(ValueError, match=r"grid of 16 cells but got a 6x6 grid \(36 cells\)"):
    model.apply(variables, images(size=96), train=False)


def test_half_precision_runs_with_float32_parameters_and_outputs():
  config = tiny_config()
  config.model.half_precision = True
  model = models.create_model(config.model, num_outputs=1)
  x = images()
  variables = init(model, x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  outputs, _ = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
  )
  assert {key: value.dtype for key, value in outputs.items()} == {
    "score": jnp.float32,
    "step_scores": jnp.float32,
    "attention": jnp.float32,
  }
  np.testing.assert_allclose(outputs["attention"].sum(-1), 1.0, rtol=1e-5)
  # Same parameters in fp32: bf16 rounding moves the result only slightly.
  config.model.half_precision = False
  full = models.create_model(config.model, num_outputs=1).apply(variables, x, train=False)
  half = model.apply(variables, x, train=False)
  np.testing.assert_allclose(
    half["score"], full["score"], atol=0.05 * float(jnp.abs(full["score"]).max()) + 0.02
  )


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("name", "resnet", "model.name must be one of"),
    ("encoder.depth", 101, "model.encoder.depth must be one of"),
    ("encoder.stages", 5, "model.encoder.stages must be 3"),
    ("encoder.batchnorm", "sync", "model.encoder.batchnorm must be one of"),
    ("attention.output", "max", "model.attention.output must be one of"),
    ("attention.steps", 0, "model.attention.steps must be a positive integer"),
    ("attention.feature_dropout", 1.0, r"model.attention.feature_dropout must lie in \[0, 1\)"),
  ],
)
def test_invalid_config_values_are_named(field, value, message):
  config = tiny_config()
  section = config.model
  *parents, leaf = field.split(".")
  for parent in parents:
    section = section[parent]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    models.create_model(config.model, num_outputs=1)


@pytest.mark.parametrize(
  "kernel, strides, padding",
  [
    ((1, 1), (1, 1), ((0, 0), (0, 0))),
    ((1, 1), (2, 2), ((0, 0), (0, 0))),
    ((1, 1), (2, 2), "SAME"),
    ((1, 1), (1, 1), "VALID"),
    ((1, 1), (1, 1), ((1, 1), (1, 1))),  # Padded: stays a convolution.
    ((3, 3), (2, 2), ((1, 1), (1, 1))),
  ],
)
def test_conv_computes_what_flax_conv_computes(kernel, strides, padding):
  """convolution.Conv (1x1 convolutions as matrix products) has nn.Conv's parameters and values,
  odd sizes and strides included, so checkpoints and weight files are unchanged."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
  reference = nn.Conv(5, kernel, strides=strides, padding=padding)
  variables = reference.init(jax.random.key(1), x)
  ours = convolution.Conv(5, kernel, strides=strides, padding=padding)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
    jnp.shape, variables
  )
  expected = reference.apply(variables, x)
  actual = ours.apply(variables, x)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  gradient = jax.grad(lambda v, m: jnp.sum(m.apply(v, x) ** 2))
  np.testing.assert_allclose(
    gradient(variables, ours)["params"]["kernel"],
    gradient(variables, reference)["params"]["kernel"],
    rtol=1e-4,
    atol=1e-4,
  )
