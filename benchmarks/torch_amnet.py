"""The authors' PyTorch model, rewritten in plain torch.nn: AMNet's `AMemNetModel(ResNet50FC(),
seq_steps=3, a_res=14, a_vec_size=1024)` (Fajtl et al. 2018, GitHub ok1zjf/AMNet, files
`amnet_model.py`, `amnet.py`, `config.py`), which is the PrivAttNet authors' code.

torchvision does not import beside this project's torch, so its ResNet-50 (v1.5: the stride in the
3x3 conv) is written out here with torchvision's module and parameter names (`TorchResNet50`; the
weight-import tests load its state dicts). Everything is at random init: the peer benchmark times
it, and no weights are needed for that.

What is AMNet's, as published (and what PrivAttNet's `models/attention.py` reimplements):
- the encoder, `ResNet50FC`: the whole torchvision ResNet-50 is built, only conv1..layer3 run;
  it is frozen (`requires_grad = False`, so autograd records nothing through it) but stays in
  train mode with the rest of the model (BatchNorm normalises with batch statistics and keeps
  updating its running statistics), as `AMNet.train_epoch` runs it;
- the head: `inconv` 1x1 conv D->D with bias, `bn1`, ReLU, `drop80` -> a (B, D, L); `hs1`/`hc1`
  (D->H, tanh) on the mean annotation give h0 and c0; keys e = drop50(ReLU(`e1`(a))) once; per
  step: drop50(ReLU(e + `eh1`(h))) -> `eh3` (D->1, no bias) -> softmax over L -> z = a alpha ->
  one `nn.LSTM` step (carry undropped) -> h = drop50(h) (the next query and the regressor read it)
  -> `regnet1` 512, ReLU, drop50, `regnet4` 1;
- the loss of `AMNet.get_losses`: MSE of the mean of the step outputs against
  (target - target_mean) * 2, plus gamma * sum_L (sum_t (0.2 - alpha_t))^2 / B, plus omega times
  the memorability-location term (omega = 0 in `config.py`, so it adds nothing but is computed);
- Adam over the parameters that require a gradient, lr 1e-4, weight_decay (coupled L2) 1e-6.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F


class TorchBottleneck(nn.Module):
  """torchvision's v1.5 Bottleneck: stride in conv2, parameter names as in its state dict."""

  expansion = 4

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
      )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchResNet50(nn.Module):
  """torchvision.models.resnet50's module tree and initialisation, written out.

  `forward` returns (conv4_x features, pooled conv5_x features); `conv4` runs conv1..layer3 only.
  """

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
      layer = []
      for index in range(blocks):
        layer.append(TorchBottleneck(inplanes, planes, 2 if stage > 0 and index == 0 else 1))
        inplanes = planes * 4
      setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(2048, 1000)
    for module in self.modules():  # torchvision's init (zero_init_residual=False).
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

  def conv4(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer3(self.layer2(self.layer1(x)))

  def forward(self, x):
    conv4 = self.conv4(x)
    pooled = torch.flatten(self.avgpool(self.layer4(conv4)), 1)
    return conv4, pooled


class ResNet50FC(nn.Module):
  """AMNet's encoder: a whole ResNet-50 as `core_cnn`, run to layer3 (D = 1024, stride 16)."""

  channels = 1024

  def __init__(self):
    super().__init__()
    self.core_cnn = TorchResNet50()

  def forward(self, images):
    return self.core_cnn.conv4(images)


class AMNetHead(nn.Module):
  """AMNet's attention-LSTM head on encoder features (B, D, a_res, a_res).

  Returns (step outputs (B, T), attention (B, T, L)). Module names are AMNet's, so a state dict
  of `AMemNetModel` minus its `core_cnn` loads into it.
  """

  def __init__(self, channels=1024, a_res=14, steps=3, hidden=1024, regressor_hidden=512):
    super().__init__()
    self.channels, self.locations, self.steps = channels, a_res * a_res, steps
    self.inconv = nn.Conv2d(channels, channels, 1, bias=True)
    self.bn1 = nn.BatchNorm2d(channels)
    self.hs1 = nn.Linear(channels, hidden)
    self.hc1 = nn.Linear(channels, hidden)
    self.e1 = nn.Linear(channels, channels, bias=False)
    self.eh1 = nn.Linear(hidden, self.locations)
    self.eh3 = nn.Linear(channels, 1, bias=False)
    with warnings.catch_warnings():
      # As published: dropout=0.5 on a one-layer LSTM, which torch ignores (and warns about).
      warnings.simplefilter("ignore", UserWarning)
      self.rnn = nn.LSTM(channels, hidden, num_layers=1, dropout=0.5)
    self.regnet1 = nn.Linear(hidden, regressor_hidden)
    self.regnet4 = nn.Linear(regressor_hidden, 1)
    self.drop50 = nn.Dropout(0.5)
    self.drop80 = nn.Dropout(0.8)

  def forward(self, features):
    x = self.drop80(F.relu(self.bn1(self.inconv(features))))
    a = x.flatten(2)  # (B, D, L), cell = row * width + col.
    if a.shape[2] != self.locations:
      raise ValueError(f"the head was built for {self.locations} cells, got {a.shape[2]}")
    mean_annotation = a.mean(2)
    h = torch.tanh(self.hs1(mean_annotation))
    c = torch.tanh(self.hc1(mean_annotation))
    state = (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous())
    a_ld = a.transpose(1, 2)  # (B, L, D)
    keys = self.drop50(F.relu(self.e1(a_ld)))  # Once, one dropout mask for all steps.
    outputs, alphas = [], []
    for _ in range(self.steps):
      energy = self.drop50(F.relu(keys + self.eh1(h).unsqueeze(2)))  # (B, L, D) + (B, L, 1)
      alpha = torch.softmax(self.eh3(energy).squeeze(2), dim=1)  # (B, L)
      z = torch.bmm(a, alpha.unsqueeze(2)).squeeze(2)  # (B, D)
      h, state = self.rnn(z.unsqueeze(0), state)
      h = self.drop50(h.squeeze(0))  # The query and the regressor read it; the carry is undropped.
      outputs.append(self.regnet4(self.drop50(F.relu(self.regnet1(h)))))
      alphas.append(alpha)
    return torch.cat(outputs, 1), torch.stack(alphas, 1)


class AMemNet(nn.Module):
  """Encoder + head: images (B, 3, S, S) -> (score (B,): the mean of the steps, steps (B, T),
  attention (B, T, L))."""

  def __init__(self, a_res=14, steps=3, hidden=1024):
    super().__init__()
    self.core_cnn = ResNet50FC()
    self.head = AMNetHead(ResNet50FC.channels, a_res, steps, hidden)

  def forward(self, images):
    step_outputs, alphas = self.head(self.core_cnn(images))
    return step_outputs.mean(1), step_outputs, alphas


def amnet_loss(step_outputs, alphas, target, target_mean=0.0, gamma=1e-5, omega=0.0):
  """`AMNet.get_losses` summed as `train_epoch` sums it (target_scale 2, mean of the steps)."""
  batch = step_outputs.shape[0]
  regression = F.mse_loss(step_outputs.mean(1), (target - target_mean) * 2.0)
  attention = gamma * torch.square((0.2 - alphas).sum(1)).sum() / batch
  steps = step_outputs.shape[1]
  weights = 0.1 ** torch.arange(steps, dtype=step_outputs.dtype)  # config.py's mem_loc_w.
  memorability_location = omega * torch.square(step_outputs * weights).sum() / batch
  return regression + memorability_location + attention


def freeze_encoder(model: AMemNet) -> AMemNet:
  """As `AMNet.train_epoch`: train mode everywhere, no gradient for the encoder's parameters."""
  model.train()
  for parameter in model.core_cnn.parameters():
    parameter.requires_grad = False
  return model


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
  """AMNet's: Adam over the parameters that require a gradient, lr 1e-4, coupled L2 1e-6."""
  parameters = [p for p in module.parameters() if p.requires_grad]
  return torch.optim.Adam(parameters, lr=1e-4, weight_decay=1e-6)


def train_step(model, optimizer, inputs, target, autocast_dtype=None):
  """One AMNet training step on `inputs` (images for AMemNet, features for AMNetHead)."""
  with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
    outputs = model(inputs)
    step_outputs, alphas = outputs[-2:]
    loss = amnet_loss(step_outputs.float(), alphas.float(), target)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss


def count_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())
