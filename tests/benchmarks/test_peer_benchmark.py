"""The peer benchmark's PyTorch model is AMNet as the authors ran it: its shapes, what is frozen,
and a head of the same size as ours."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import torch_amnet
from configs import privattnet
from privattnet_jax import models

IMAGE_SIZE, BATCH, STEPS = 64, 2, 3
GRID = IMAGE_SIZE // 16  # AMNet's a_res at this input size.


def jax_head_parameter_count(image_size: int) -> int:
  """Our PrivAttNet head's parameter count at `image_size` (shapes only: nothing is computed)."""
  config = privattnet.get_config()
  config.input.image_size = image_size
  model = models.create_model(config.model, num_outputs=1)
  grid, channels = image_size // 16, torch_amnet.ResNet50FC.channels
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((1, grid, grid, channels)),
      train=False,
      method="head_from_features",
    )
  )
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def test_torch_amnet_train_step_shapes_gradients_and_head_size():
  torch.manual_seed(0)
  model = torch_amnet.freeze_encoder(torch_amnet.AMemNet(a_res=GRID, steps=STEPS))
  optimizer = torch_amnet.make_optimizer(model)
  images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
  target = torch.rand(BATCH) * 5
  running_mean = model.core_cnn.core_cnn.bn1.running_mean.clone()
  head_before = {name: p.detach().clone() for name, p in model.head.named_parameters()}

  scores, step_outputs, alphas = model(images)
  assert scores.shape == (BATCH,)
  assert step_outputs.shape == (BATCH, STEPS)
  assert alphas.shape == (BATCH, STEPS, GRID * GRID)
  np.testing.assert_allclose(alphas.detach().sum(-1).numpy(), 1.0, rtol=1e-5)

  optimizer.zero_grad()
  torch_amnet.amnet_loss(step_outputs, alphas, target).backward()
  encoder = list(model.core_cnn.parameters())
  assert encoder and all(not p.requires_grad and p.grad is None for p in encoder)
  for name, parameter in model.head.named_parameters():
    assert parameter.grad is not None, name
    assert bool(torch.isfinite(parameter.grad).all()), name
  assert any(float(p.grad.abs().sum()) > 0 for p in model.head.parameters())
  # The encoder is frozen but in train mode, as the authors ran it: its BatchNorm statistics move.
  assert not torch.equal(model.core_cnn.core_cnn.bn1.running_mean, running_mean)
  # The optimiser holds the head's parameters only, and a step moves them.
  assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == (
    torch_amnet.count_parameters(model.head)
  )
  optimizer.step()
  assert any(
    not torch.equal(p.detach(), head_before[name]) for name, p in model.head.named_parameters()
  )

  # Same head as ours: torch's nn.LSTM keeps two bias vectors (bias_ih + bias_hh, always summed)
  # where Flax's LSTM cell keeps one; without the redundant one the counts are equal.
  ours = jax_head_parameter_count(IMAGE_SIZE)
  theirs = torch_amnet.count_parameters(model.head)
  assert theirs - model.head.rnn.bias_hh_l0.numel() == ours
  assert model.head.rnn.bias_hh_l0.numel() == 4 * 1024
