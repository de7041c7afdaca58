"""The model variants by name, so that a new head is one file, one `register` line and a config.

A variant registers how to build its head and the facts the rest of the code asks about it:

  registry.register("my_head", build_my_head, kind="regression", attention=True)

`build_head(model_config, num_outputs=P, dtype=..., batchnorm_axis_name=...)` gets the
`config.model` section and returns a linen module mapping encoder features (B, h, w, D) and
`train` to the output dict of docs/design.md. The facts:

  kind: "regression" (trained on the score, outputs `score`) or "attributes" (trained on the
    attribute labels with BCE, outputs `attribute_logits`; its score is pooled from them).
  encoder_stages: None to cut the encoder at `model.encoder.stages`, or the cut the head is
    defined on whatever the config says (4: the whole trunk).
  attention: whether the head outputs `attention` maps (heat maps, localisation, redaction).

`lookup(config.model)` is how every other module finds a variant: it first imports
`config.model.module` when the config names one, so a variant registered in a user's own module
is found by training, evaluation and by predict and export from a checkpoint's stored config.
docs/extending.md walks through adding one.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn

KINDS = ("regression", "attributes")
ENCODER_STAGES = (None, 3, 4)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One registered model variant: its head builder and the facts other modules branch on."""

  name: str
  build_head: Callable[..., nn.Module]
  kind: str
  encoder_stages: int | None
  attention: bool
  module: str  # Where it was registered, to name both places when a name is taken twice.
  # Where an attribute head keeps its logits' bias in params["head"]: the prior-odds start sets it.
  logits_bias: tuple[str, ...] | None = None

  def stages(self, encoder_config) -> int:
    """The encoder cut this variant runs on: its own, or `model.encoder.stages`."""
    return encoder_config.stages if self.encoder_stages is None else self.encoder_stages


_VARIANTS: dict[str, Variant] = {}


def register(
  name: str,
  build_head: Callable[..., nn.Module],
  *,
  kind: str = "regression",
  encoder_stages: int | None = None,
  attention: bool = False,
  logits_bias: tuple[str, ...] | None = None,
) -> Variant:
  """Adds a variant under `name` (the value of `config.model.name`); a taken name is refused."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"a model variant's name must be a Python identifier, got {name!r}")
  if not callable(build_head):
    raise TypeError(f"model variant {name!r}: build_head must be callable, got {build_head!r}")
  if kind not in KINDS:
    raise ValueError(f"model variant {name!r}: kind must be one of {KINDS}, got {kind!r}")
  if encoder_stages not in ENCODER_STAGES:
    raise ValueError(
      f"model variant {name!r}: encoder_stages must be one of {ENCODER_STAGES}, "
      f"got {encoder_stages!r}"
    )
  module = getattr(build_head, "__module__", None) or "?"
  if name in _VARIANTS:
    raise ValueError(
      f"model variant {name!r} is already registered (by {_VARIANTS[name].module}); "
      f"pick another name for the one in {module}"
    )
  variant = Variant(
    name,
    build_head,
    kind,
    encoder_stages,
    bool(attention),
    module,
    tuple(logits_bias) if logits_bias else None,
  )
  _VARIANTS[name] = variant
  return variant


def names(*, kind: str | None = None, attention: bool | None = None) -> tuple[str, ...]:
  """The registered names in registration order, optionally only those of a kind or attention."""
  return tuple(
    v.name
    for v in _VARIANTS.values()
    if (kind is None or v.kind == kind) and (attention is None or v.attention == attention)
  )


def import_module(model_config) -> None:
  """Imports `model.module` when the config names one: the module that registers its variant."""
  module = model_config.get("module", "")
  if not module:
    return
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise ValueError(f"model.module={module!r} cannot be imported: {e}") from None


def lookup(model_config: Any) -> Variant:
  """The variant `config.model` names (after importing `model.module`); unknown names fail."""
  import_module(model_config)
  name = model_config.name
  if name not in _VARIANTS:
    raise ValueError(f"model.name must be one of {names()}, got {name!r}")
  return _VARIANTS[name]
