"""Weight import: a torchvision-named ResNet-50 in plain torch.nn, imported from .pth and
.safetensors, computes what PyTorch computes; every malformed file is refused by name."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy
from torch import nn

from benchmarks.torch_amnet import TorchResNet50
from configs import default
from privattnet_jax import models
from privattnet_jax.models import pth
from privattnet_jax.models import weights
from privattnet_jax.models.efficientnet import EfficientNetLite0
from privattnet_jax.models.resnet import ResNet
from privattnet_jax.training import train_state
from privattnet_jax.models import weight_keys

# Non-square, one even side: at stride 2 an even side is where 'SAME' padding would pad (0, 1)
# where torch pads (1, 1); the odd side checks the other rounding of the output size.
INPUT_SHAPE = (2, 3, 96, 113)


def randomise(model, seed=0):
  """Random weights and random BatchNorm statistics (eval mode must use the file's statistics)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        module.weight.copy_(
          torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5
        )
      elif isinstance(module, nn.BatchNorm2d):
        shape = module.weight.shape
        module.weight.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
        module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
        module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
        module.num_batches_tracked.fill_(1000)
      elif isinstance(module, nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.01)
        module.bias.zero_()
  return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The torch model's files (.pth and .safetensors) and its eval-mode outputs on a random input."""
  torch.manual_seed(0)
  model = randomise(TorchResNet50())
  directory = tmp_path_factory.mktemp("weights")
  pth = directory / "resnet50-random.pth"
  torch.save(model.state_dict(), pth)
  safetensors = directory / "model.safetensors"
  safetensors_numpy.save_file(
    {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")},
    str(safetensors),
  )
  images = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
  with torch.no_grad():
    conv4, pooled = model(torch.from_numpy(images))
  return {
    "pth": pth,
    "safetensors": safetensors,
    "state_dict": {k: v.numpy().copy() for k, v in model.state_dict().items()},
    "images": images.transpose(0, 2, 3, 1),  # NCHW -> NHWC
    "conv4": conv4.numpy().transpose(0, 2, 3, 1),
    "pooled": pooled.numpy(),
  }


def encoder_shapes(depth=50, stages=3, width=64):
  encoder = ResNet(depth=depth, stages=stages, width=width)
  return encoder, jax.eval_shape(
    lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), use_running_average=True)
  )


def relative_error(actual, expected):
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("file_kind", ["pth", "safetensors"])
def test_imported_resnet50_computes_what_pytorch_computes(reference, file_kind):
  for stages, expected in ((3, reference["conv4"]), (4, reference["pooled"])):
    encoder, shapes = encoder_shapes(stages=stages)
    variables = weights.load_pretrained_encoder(reference[file_kind], shapes)
    apply = jax.jit(lambda v, x: encoder.apply(v, x, use_running_average=True))
    features = apply(variables, reference["images"])
    output = features if stages == 3 else jnp.mean(features, axis=(1, 2))
    assert output.shape == expected.shape
    assert relative_error(output, expected) <= 1e-4, (
      file_kind,
      stages,
      relative_error(output, expected),
    )


def test_mapping_is_exact_and_invertible(reference):
  _, shapes = encoder_shapes(stages=4)
  variables = weights.load_pretrained_encoder(reference["pth"], shapes)
  state_dict = reference["state_dict"]
  np.testing.assert_array_equal(
    variables["params"]["layer2_0"]["conv2"]["kernel"],
    state_dict["layer2.0.conv2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["layer3_1"]["bn2"]["var"], state_dict["layer3.1.bn2.running_var"]
  )
  np.testing.assert_array_equal(
    variables["params"]["layer4_0"]["downsample_bn"]["scale"],
    state_dict["layer4.0.downsample.1.weight"],
  )
  back = weight_keys.variables_to_state_dict(variables)
  expected_keys = {
    k for k in state_dict if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
  }
  assert set(back) == expected_keys
  for key in expected_keys:
    np.testing.assert_array_equal(back[key], state_dict[key])


def write_pth(path, state_dict):
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
  return path


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
  state_dict = dict(reference["state_dict"])
  del state_dict["layer2.1.conv2.weight"], state_dict["layer1.0.bn3.running_var"]
  state_dict["layer3.0.se.fc1.weight"] = np.zeros((4, 4), np.float32)
  path = write_pth(tmp_path / "broken.pth", state_dict)
  _, shapes = encoder_shapes()
  with pytest.raises(weight_keys.WeightImportError) as error:
    weights.load_pretrained_encoder(path, shapes)
  message = str(error.value)
  assert "missing keys: layer1.0.bn3.running_var, layer2.1.conv2.weight" in message
  assert "unexpected keys: layer3.0.se.fc1.weight" in message


def test_shape_mismatch_names_both_shapes(reference, tmp_path):
  state_dict = dict(reference["state_dict"])
  state_dict["layer1.0.conv2.weight"] = np.zeros((64, 32, 3, 3), np.float32)
  state_dict["bn1.bias"] = np.zeros((32,), np.float32)
  path = write_pth(tmp_path / "bad_shapes.pth", state_dict)
  _, shapes = encoder_shapes()
  with pytest.raises(
    weight_keys.WeightImportError,
    match=r"layer1\.0\.conv2\.weight: file \(64, 32, 3, 3\), encoder \(64, 64, 3, 3\)",
  ) as error:
    weights.load_pretrained_encoder(path, shapes)
  assert "bn1.bias: file (32,), encoder (64,)" in str(error.value)


def test_depth_mismatch_is_named(reference, tmp_path):
  _, resnet18 = encoder_shapes(depth=18, stages=4)
  state_dict = weight_keys.variables_to_state_dict(
    jax.tree.map(lambda s: np.zeros(s.shape, np.float32), resnet18)
  )
  path = tmp_path / "resnet18.safetensors"
  safetensors_numpy.save_file(state_dict, str(path))
  _, resnet50 = encoder_shapes(depth=50, stages=3)
  with pytest.raises(
    weight_keys.WeightImportError,
    match="depth mismatch: the file holds ResNet-18 but the encoder is ResNet-50 cut after conv4_x",
  ):
    weights.load_pretrained_encoder(path, resnet50)
  with pytest.raises(
    weight_keys.WeightImportError, match="the file holds ResNet-50 but the encoder is ResNet-18"
  ):
    weights.load_pretrained_encoder(reference["safetensors"], encoder_shapes(depth=18, stages=4)[1])


def test_a_file_cut_after_conv4_cannot_fill_a_full_encoder(tmp_path):
  encoder, shapes = encoder_shapes(depth=0, stages=3, width=8)
  variables = encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True)
  path = weights.save_encoder(tmp_path, variables)
  with pytest.raises(
    weight_keys.WeightImportError, match="stops after conv4_x but the encoder runs through conv5_x"
  ):
    weights.load_pretrained_encoder(path, encoder_shapes(depth=0, stages=4, width=8)[1])


class NotATensor:
  pass


def test_pickles_that_are_not_plain_state_dicts_are_refused(tmp_path):
  _, shapes = encoder_shapes()
  arbitrary = tmp_path / "arbitrary.pth"
  torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, arbitrary)
  with pytest.raises(
    weight_keys.WeightImportError,
    match=r"refused: not a plain state dict of tensors \(it refers to "
    r"[\w.]*NotATensor\); this reader never runs code from a pickle",
  ):
    weights.load_pretrained_encoder(arbitrary, shapes)
  checkpoint = tmp_path / "checkpoint.pth"
  torch.save({"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(1)}}, checkpoint)
  with pytest.raises(
    weight_keys.WeightImportError,
    match=r"a checkpoint, not a plain state dict \(entries \['state_dict'\]",
  ):
    weights.load_pretrained_encoder(checkpoint, shapes)
  a_list = tmp_path / "list.pth"
  torch.save([torch.zeros(1)], a_list)
  with pytest.raises(weight_keys.WeightImportError, match="holds a list, not a state dict"):
    weights.load_pretrained_encoder(a_list, shapes)


def test_unknown_and_absent_files(tmp_path):
  _, shapes = encoder_shapes()
  (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
  with pytest.raises(weight_keys.WeightImportError, match="unknown weight file type '.h5'"):
    weights.load_pretrained_encoder(tmp_path / "weights.h5", shapes)
  with pytest.raises(weight_keys.WeightImportError, match="no such weight file"):
    weights.load_pretrained_encoder(tmp_path / "nothing.pth", shapes)
  safetensors_numpy.save_file(
    {"resnet.embedder.embedder.convolution.weight": np.zeros((64, 3, 7, 7), np.float32)},
    str(tmp_path / "transformers.safetensors"),
  )
  with pytest.raises(
    weight_keys.WeightImportError,
    match="no torchvision-style ResNet keys .* its keys begin resnet.embedder",
  ):
    weights.load_pretrained_encoder(tmp_path / "transformers.safetensors", shapes)
  (tmp_path / "foreign.msgpack").write_bytes(b"\x81\xa1a\x01")
  with pytest.raises(weight_keys.WeightImportError, match="not a privattnet_jax.encoder file"):
    weights.load_pretrained_encoder(tmp_path / "foreign.msgpack", shapes)


def test_own_format_round_trip_drops_conv5_for_a_cut_encoder(tmp_path):
  full, full_shapes = encoder_shapes(depth=0, stages=4, width=8)
  variables = full.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), use_running_average=True)
  path = weights.save_encoder(tmp_path / "exported", variables, source="test")
  assert path == tmp_path / "exported" / weights.OWN_FILENAME
  loaded = weights.load_pretrained_encoder(tmp_path / "exported", full_shapes)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(
    weight_keys.WeightImportError,
    match="width mismatch: the file's stem has 8 channels, the encoder's 16",
  ):
    weights.load_pretrained_encoder(path, encoder_shapes(depth=0, stages=4, width=16)[1])

  # A malformed conv5_x: an error for the full encoder, unused (dropped) by the conv4_x cut.
  variables["params"]["layer4_0"]["conv2"]["kernel"] = jnp.zeros((5, 5, 64, 64))
  weights.save_encoder(path, variables)
  with pytest.raises(
    weight_keys.WeightImportError,
    match=r"params/layer4_0/conv2/kernel: file \(5, 5, 64, 64\), encoder \(3, 3, 64, 64\)",
  ):
    weights.load_pretrained_encoder(path, full_shapes)
  cut = weights.load_pretrained_encoder(path, encoder_shapes(depth=0, stages=3, width=8)[1])
  assert "layer4_0" not in cut["params"]
  jax.tree.map(
    np.testing.assert_array_equal, cut["params"]["layer3_0"], variables["params"]["layer3_0"]
  )


def test_convert_command_and_loading_into_a_whole_model(reference, tmp_path, capsys):
  assert (
    weights.main(["--src", str(reference["safetensors"]), "--dst", str(tmp_path / "converted")])
    == 0
  )
  assert "ResNet-50, width 64, through conv5_x" in capsys.readouterr().out
  _, shapes = encoder_shapes(stages=3)
  from_converted = weights.load_pretrained_encoder(tmp_path / "converted", shapes)
  from_source = weights.load_pretrained_encoder(reference["pth"], shapes)
  jax.tree.map(np.testing.assert_array_equal, from_converted, from_source)
  assert weights.main(["--src", str(tmp_path / "missing.pth"), "--dst", str(tmp_path / "x")]) == 1
  assert "no such weight file" in capsys.readouterr().err

  # A whole model: the encoder comes from the file, the head stays as initialised.
  config = default.get_config()
  config.model.encoder.depth, config.model.encoder.width = 0, 8
  config.model.attention.hidden_size, config.model.attention.regressor_hidden = 16, 8
  model = models.create_model(config.model, num_outputs=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  donor = ResNet(depth=0, width=8, stages=4).init(
    jax.random.key(9), jnp.zeros((1, 32, 32, 3)), use_running_average=True
  )
  path = tmp_path / "tiny.safetensors"
  safetensors_numpy.save_file(weight_keys.variables_to_state_dict(donor), str(path))
  loaded = weights.load_pretrained(path, variables)
  np.testing.assert_array_equal(
    loaded["params"]["encoder"]["layer2_0"]["conv1"]["kernel"],
    donor["params"]["layer2_0"]["conv1"]["kernel"],
  )
  np.testing.assert_array_equal(
    loaded["batch_stats"]["encoder"]["bn1"]["mean"], donor["batch_stats"]["bn1"]["mean"]
  )
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["head"], variables["params"]["head"])
  assert "layer4_0" not in loaded["params"]["encoder"]

  # A run's initial variables: the same, without running (or compiling) the encoder's init.
  rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
  whole_init = model.init(rngs, jnp.zeros((1, 32, 32, 3)), train=False)
  jax.tree.map(
    np.testing.assert_array_equal,
    train_state.initial_variables(model, rngs, (32, 32, 3), str(path)),
    weights.load_pretrained(path, whole_init),
  )


class RunsCode:
  """A pickle payload that would create a file when unpickled by an unrestricted loader."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_a_malicious_pickle_never_runs(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}, path)
  with pytest.raises(
    weight_keys.WeightImportError, match=r"evil\.pth: refused: .*it refers to \w+\.mkdir"
  ):
    weights.read_state_dict(path)
  assert not marker.exists()


def test_broken_files_get_one_line_errors_naming_the_file(reference, tmp_path):
  _, shapes = encoder_shapes()
  good = reference["pth"].read_bytes()
  cases = {
    "random.pth": np.random.default_rng(0).bytes(4096),
    "empty.pth": b"",
    "truncated_zip.pth": good[: len(good) // 2],
    "truncated_legacy.pth": weights.installed_weights_path("efficientnet_lite0").read_bytes()[
      :100_000
    ],
    "text.pth": b"<html>404 Not Found</html>\n",
  }
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(weight_keys.WeightImportError) as error:
      weights.load_pretrained_encoder(tmp_path / name, shapes)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message, (name, message)
    assert "weights_only=False" not in message and "Traceback" not in message, (name, message)


def test_an_installed_weight_name_needs_no_path(reference, tmp_path, capsys):
  path = weights.installed_weights_path("efficientnet_lite0")
  assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
  shapes = jax.eval_shape(
    lambda: EfficientNetLite0(stages=3).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True
    )
  )
  loaded = weights.load_pretrained_encoder("efficientnet_lite0", shapes)
  state_dict = pth.load(path)
  np.testing.assert_array_equal(
    loaded["params"]["blocks_10"]["depthwise_conv"]["kernel"],
    state_dict["_blocks.10._depthwise_conv.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(loaded["batch_stats"]["bn0"]["var"], state_dict["_bn0.running_var"])
  assert "blocks_11" not in loaded["params"] and "conv_head" not in loaded["params"]
  # The other architecture, and a cut file for the whole trunk, are named.
  with pytest.raises(
    weight_keys.WeightImportError,
    match="wrong architecture: the file holds EfficientNet-Lite0 "
    r"\(the whole trunk\) but the encoder is ResNet-50 cut after conv4_x \(set "
    "model.encoder.name=efficientnet_lite0",
  ):
    weights.load_pretrained_encoder("efficientnet_lite0", encoder_shapes()[1])
  with pytest.raises(
    weight_keys.WeightImportError,
    match="wrong architecture: the file holds ResNet-50 .*model.encoder.name=resnet",
  ):
    weights.load_pretrained_encoder(reference["pth"], shapes)
  assert weights.main(["--src", "efficientnet_lite0", "--dst", str(tmp_path / "cut")]) == 0
  assert "EfficientNet-Lite0, the whole trunk" in capsys.readouterr().out
  weights.save_encoder(tmp_path / "cut", loaded)
  with pytest.raises(
    weight_keys.WeightImportError,
    match="the file holds EfficientNet-Lite0 cut at output stride 16 "
    r"but the encoder is EfficientNet-Lite0 \(the whole trunk\)",
  ):
    weights.load_pretrained_encoder(
      tmp_path / "cut",
      jax.eval_shape(
        lambda: EfficientNetLite0(stages=4).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True
        )
      ),
    )
