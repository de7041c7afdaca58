"""Every config field, what it may hold, and the one check of a config before any work.

`RULES` maps each field (its dotted path) to the values it allows; its keys are also the list of
known fields, so a field that is not there (a typo in a config file or an override) is refused by
name with the closest known ones. `CROSS_RULES` are the few checks between fields. A bad value
found only once data is built or a step compiles costs minutes and names a symptom ("loss is nan
at step 2"); here it costs nothing and names the field, the value and what is allowed, in one line.

Checks that need the machine or other modules stay with them and run just after this one
(`experiment.validate_config`: the device and process counts, the encoder's output stride, the weight
file). Modules that own a value set keep their constant (the model registry, `feeds.MODES`, ...);
tests/test_config_check.py holds the table to them. Imports nothing heavy: run.py checks a config
before JAX compiles anything or a dataset is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

from privattnet_jax.data import attributes


class ConfigError(ValueError):
  """A config field is unknown, missing or holds a value it does not allow; one line."""


# ----------------------------------------------------------------------------
# Rules: what one field allows.


def _is_integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _same_kind(value, allowed) -> bool:
  """True is not 1 and '3' is not 3 here, though Python compares them equal or hashes them alike."""
  return all(isinstance(value, kind) == isinstance(allowed, kind) for kind in (bool, str, float))


@dataclasses.dataclass(frozen=True)
class Integer:
  minimum: int | None = None
  maximum: int | None = None
  also: tuple[int, ...] = ()  # Special values outside the range (-1: "derive it").
  meaning: str = ""  # What the special values mean, for the message.

  def accepts(self, value) -> bool:
    if not _is_integer(value):
      return False
    if value in self.also:
      return True
    return (self.minimum is None or value >= self.minimum) and (
      self.maximum is None or value <= self.maximum
    )

  def allowed(self) -> str:
    if self.minimum is not None and self.maximum is not None:
      text = f"an integer in {self.minimum}..{self.maximum}"
    elif self.minimum is not None:
      text = f"an integer >= {self.minimum}"
    elif self.maximum is not None:
      text = f"an integer <= {self.maximum}"
    else:
      text = "an integer"
    if self.also:
      text = f"{', '.join(map(str, self.also))} or {text}"
    return f"{text} ({self.meaning})" if self.meaning else text


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite real number in a range; `above` / `below` make the bounds exclusive."""

  minimum: float | None = None
  maximum: float | None = None
  above: bool = False
  below: bool = False

  def accepts(self, value) -> bool:
    if not _is_number(value) or not math.isfinite(value):
      return False
    if self.minimum is not None and (
      value < self.minimum or (self.above and value == self.minimum)
    ):
      return False
    if self.maximum is not None and (
      value > self.maximum or (self.below and value == self.maximum)
    ):
      return False
    return True

  def allowed(self) -> str:
    low = None if self.minimum is None else f"{'>' if self.above else '>='} {self.minimum:g}"
    high = None if self.maximum is None else f"{'<' if self.below else '<='} {self.maximum:g}"
    if low and high:
      left, right = "(" if self.above else "[", ")" if self.below else "]"
      return f"a finite number in {left}{self.minimum:g}, {self.maximum:g}{right}"
    return " ".join(["a finite number", *(bound for bound in (low, high) if bound)])


@dataclasses.dataclass(frozen=True)
class OneOf:
  values: tuple

  def accepts(self, value) -> bool:
    return any(_same_kind(value, v) and value == v for v in self.values)

  def allowed(self) -> str:
    return f"one of {self.values!r}"


@dataclasses.dataclass(frozen=True)
class Boolean:
  def accepts(self, value) -> bool:
    return isinstance(value, bool)

  def allowed(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
  """Any string: paths (empty: the default place) and the like."""

  def accepts(self, value) -> bool:
    return isinstance(value, str)

  def allowed(self) -> str:
    return "a string"


@dataclasses.dataclass(frozen=True)
class Interval:
  """A pair (lo, hi) of finite numbers, lo <= hi, both within `bounds`."""

  bounds: Number

  def accepts(self, value) -> bool:
    return (
      isinstance(value, (tuple, list))
      and len(value) == 2
      and all(self.bounds.accepts(v) for v in value)
      and value[0] <= value[1]
    )

  def allowed(self) -> str:
    return f"a pair (lo, hi) with lo <= hi, each {self.bounds.allowed()}"


@dataclasses.dataclass(frozen=True)
class Names:
  """A tuple of distinct names from `choices` (at least one unless `may_be_empty`)."""

  choices: tuple[str, ...]
  may_be_empty: bool = True

  def accepts(self, value) -> bool:
    return (
      isinstance(value, (tuple, list))
      and (self.may_be_empty or len(value) > 0)
      and all(isinstance(v, str) and v in self.choices for v in value)
      and len(set(value)) == len(value)
    )

  def allowed(self) -> str:
    return f"distinct names from {self.choices!r}" + ("" if self.may_be_empty else ", at least one")


Rule = Integer | Number | OneOf | Boolean | Text | Interval | Names

SPLITS = ("train", "validation", "test")

# Every config field and what it allows (configs/default.py says what each one does). A new field
# goes here too: a field without a rule is refused as unknown.
RULES: dict[str, Rule] = {
  "seed": Integer(0, 2**32 - 1),
  "num_epochs": Integer(0),
  "num_train_steps": Integer(minimum=-1, meaning="-1 and 0: num_epochs decides"),
  "log_every_steps": Integer(1),
  "eval_every_steps": Integer(minimum=-1, meaning="-1 and 0: once per epoch"),
  "checkpoint_every_steps": Integer(minimum=-1, meaning="-1 and 0: at every evaluation"),
  "keep_checkpoints": Integer(1),
  "eval_splits": Names(SPLITS),
  "compilation_cache_dir": Text(),
  "data.manual_dir": Text(),
  "data.data_dir": Text(),
  "data.builder_config": OneOf(("max256", "original")),  # vispr.Vispr.BUILDER_CONFIGS
  "data.splits_dir": Text(),
  "data.strict": Boolean(),
  "data.synthetic.dir": Text(),
  "data.synthetic.num_train": Integer(1, 999_999),  # synthetic.ID_SPLIT_STRIDE - 1
  "data.synthetic.num_val": Integer(1, 999_999),
  "data.synthetic.num_test": Integer(1, 999_999),
  "data.synthetic.seed": Integer(0, 2**32 - 1),
  "data.synthetic.image_size": Integer(16),
  # And a multiple of the encoder's output stride (experiment.validate_config).
  "input.image_size": Integer(32),
  "input.batch_size": Integer(
    1
  ),  # And a multiple of the device count (experiment.validate_config).
  "input.resize_size": Integer(1, also=(-1,), meaning="-1: image_size * 264 / 224"),
  "input.crop_scale": Interval(Number(0, 1, above=True)),
  "input.crop_ratio": Interval(Number(0, above=True)),
  "input.num_workers": Integer(0),
  "input.prefetch_buffer_size": Integer(1),
  "score.pooling": OneOf(attributes.POOLINGS),
  "score.source": OneOf(attributes.PREFERENCE_SOURCES),
  "score.profile_index": Integer(0, attributes.NUM_PROFILES - 1),
  "score.preferences_file": Text(),
  "score.missing_value": Number(0, 5),  # Ratings lie in 1..5; 0: not sensitive.
  "score.per_profile": Boolean(),
  "score.attribute_rule": OneOf(attributes.ATTRIBUTE_RULES),
  # The built-in variants; a config that names its own module (model.module) may name its own.
  "model.name": OneOf(("privattnet", "privattnet_mlc", "privnet", "ap_pr", "pr_cnn")),
  "model.module": Text(),
  "model.half_precision": Boolean(),
  "model.attribute_bias_init": OneOf(("prior", "uniform")),  # models.ATTRIBUTE_BIAS_INITS
  "model.sync_batchnorm": Boolean(),
  "model.encoder.name": OneOf(("resnet", "efficientnet_lite0")),
  "model.encoder.depth": OneOf((0, 18, 34, 50)),  # resnet.ARCHITECTURES; 0: the tiny encoder.
  "model.encoder.width": Integer(1),
  "model.encoder.stages": OneOf((3, 4)),
  "model.encoder.trainable": Boolean(),
  "model.encoder.batchnorm": OneOf(("update", "frozen")),
  "model.encoder.pretrained": Text(),
  "model.attention.steps": Integer(1),
  "model.attention.hidden_size": Integer(1),
  "model.attention.regressor_hidden": Integer(1),
  "model.attention.feature_dropout": Number(0, 1, below=True),
  "model.attention.dropout": Number(0, 1, below=True),
  "model.attention.output": OneOf(("mean", "last")),
  "feature_cache.mode": OneOf(("off", "host", "device")),
  "feature_cache.dir": Text(),
  "feature_cache.dtype": OneOf(("bfloat16", "float32")),
  "feature_cache.train_views": Integer(0),
  "feature_cache.splits": Names(SPLITS, may_be_empty=False),
  "optim.learning_rate": Number(0, above=True),
  "optim.schedule": OneOf(("constant", "cosine", "warmup_cosine")),
  "optim.warmup_steps": Integer(0),
  "optim.weight_decay": Number(0),
  "loss.attention_gamma": Number(0),
  "loss.attention_tau_per_step": Number(0, 1),  # Each step's attention sums to 1.
}

OPTIONAL_FIELDS = ("model.module",)  # Only a config of a variant outside the package sets it.

# Fields that another replaced: a config (file or override) that sets one is told the new one.
REPLACED_FIELDS = {
  "feature_cache.enabled": "feature_cache.mode=host (or off)",
  "feature_cache.on_device": "feature_cache.mode=device (or host)",
}
_REPLACED_HOW = (
  "feature_cache.mode: 'off' (no cache), 'host' (was enabled=True) or 'device' (was enabled=True "
  "with on_device=True)"
)


# ----------------------------------------------------------------------------
# Checks between fields: each returns the problem in one line, or None.


def _training_length(config: Mapping[str, Any]) -> str | None:
  if config["num_train_steps"] <= 0 and config["num_epochs"] <= 0:
    return (
      f"num_train_steps={config['num_train_steps']} and num_epochs={config['num_epochs']}: "
      "set num_train_steps > 0 or num_epochs > 0"
    )
  return None


def _score_source(config: Mapping[str, Any]) -> str | None:
  score = config["score"]
  if score["source"] == "file" and not score["preferences_file"]:
    return "score.source='file' needs score.preferences_file"
  if score["per_profile"] and score["source"] not in ("profiles_mean", "profile"):
    return (
      f"score.per_profile=True needs the profile table (score.source profiles_mean or profile), "
      f"got score.source={score['source']!r}"
    )
  return None


def _feature_cache(config: Mapping[str, Any]) -> str | None:
  """A cache holds each image's encoder features, computed once: the encoder must not change."""
  if config["feature_cache"]["mode"] == "off":
    return None
  encoder = config["model"]["encoder"]
  if encoder["trainable"]:
    return (
      "a feature cache (feature_cache.mode host or device) needs model.encoder.trainable=False: "
      "a trained encoder's features change at every step, so they cannot be computed once"
    )
  if encoder["batchnorm"] != "frozen":
    return (
      "a feature cache (feature_cache.mode host or device) needs model.encoder.batchnorm='frozen', "
      f"got {encoder['batchnorm']!r}: with 'update' the encoder's BatchNorm normalises each "
      "training batch with that batch's own statistics, so an image's features depend on the "
      "other images in its batch"
    )
  return None


CROSS_RULES: tuple[Callable[[Mapping[str, Any]], str | None], ...] = (
  _training_length,
  _score_source,
  _feature_cache,
)


# ----------------------------------------------------------------------------
# The check.


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _registered(name) -> bool:
  """Whether a variant of this name is registered in this process (by a user's module or a test).

  The registry is not imported for it: the check stays light before any work.
  """
  registry = sys.modules.get("privattnet_jax.models.registry")
  return registry is not None and name in registry.names()


def problems(config) -> list[str]:
  """Every problem of a config (a ConfigDict or a nested dict), one line each, in field order."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  flat = _flatten(tree)
  found = []
  # A variant registered outside the package (docs/extending.md) has a name no built-in table
  # knows and may read sections of its own under `model`, which its head checks.
  own_variant = bool(flat.get("model.module")) or _registered(flat.get("model.name"))
  known_model_parts = {path.split(".")[1] for path in RULES if path.startswith("model.")}
  for field in flat:
    parts = field.split(".")
    own_section = own_variant and parts[0] == "model" and parts[1] not in known_model_parts
    if field in REPLACED_FIELDS:
      found.append(f"{field} was replaced by {_REPLACED_HOW}")
    elif field not in RULES and not own_section:
      found.append(unknown_field(field))
  for field, rule in RULES.items():
    if field not in flat:
      if field not in OPTIONAL_FIELDS:
        found.append(f"{field} is missing (configs/default.py gives every field a value)")
    elif field == "model.name" and own_variant:
      continue
    elif not rule.accepts(flat[field]):
      found.append(f"{field} must be {rule.allowed()}, got {flat[field]!r}")  # nan, 'x', (1, 2)
  if not found:  # Cross rules read fields the rules above have checked.
    found = [problem for check in CROSS_RULES if (problem := check(tree)) is not None]
  return found


def check(config) -> None:
  """Raises ConfigError naming the first problem (and how many more there are)."""
  found = problems(config)
  if found:
    more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
    raise ConfigError(found[0] + more)


# ----------------------------------------------------------------------------
# Unknown fields.


def sections() -> list[str]:
  """The dotted prefixes of the known fields (`data`, `data.synthetic`, ...)."""
  found = {field.rsplit(".", i)[0] for field in RULES for i in range(1, field.count(".") + 1)}
  return sorted(found)


def closest_fields(field: str, count: int = 3) -> list[str]:
  """Known fields a mistyped or misplaced one most likely meant.

  Matched by the whole path, then by its last part (`learning_rate` -> `optim.learning_rate`).
  """
  known = list(RULES)
  matches = difflib.get_close_matches(field, known, n=count, cutoff=0.6)
  name = field.rsplit(".", 1)[-1]
  leaves = {}
  for path in known:
    leaves.setdefault(path.rsplit(".", 1)[-1], []).append(path)
  for leaf in difflib.get_close_matches(name, list(leaves), n=count, cutoff=0.7):
    matches += [path for path in leaves[leaf] if path not in matches]
  return matches[:count]


def unknown_field(field: str) -> str:
  """The line for a field no rule knows: the closest known fields, else its section's fields."""
  matches = closest_fields(field)
  if matches:
    options = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f"{field} is not a config field; did you mean {options}?"
  section = field.rsplit(".", 1)[0] if "." in field else ""
  while section and section not in sections():
    section = section.rsplit(".", 1)[0] if "." in section else ""
  depth = section.count(".") + 1 if section else 0
  names = sorted(
    {path.split(".")[depth] for path in RULES if path.startswith(f"{section}.") or not section}
  )
  where = f"config.{section}" if section else "the config"
  return f"{field} is not a config field; {where} has: {', '.join(names)}"


def override_error(field: str) -> str | None:
  """The problem with a command-line override of `field` (`--config.<field>=...`), or None."""
  if field in REPLACED_FIELDS:
    return f"--config.{field} was replaced by --config.{REPLACED_FIELDS[field]}"
  if field in RULES or field in sections():
    return None
  return f"--config.{unknown_field(field)}"
