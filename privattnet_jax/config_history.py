"""Config fields that moved: old config files, command lines and checkpoints keep working.

One table, read by the command line (an old override is rewritten before flag parsing, with one
deprecation line), by config loading (a config file that sets an old field), and by every reader
of a stored config (checkpoint metadata, an export's JSON), which migrate silently.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

# Old dotted name -> new dotted name.
RENAMED_FIELDS = {
  "image_size": "input.image_size",
  "batch_size": "input.batch_size",
  "half_precision": "model.half_precision",
  "data.resize_size": "input.resize_size",
  "data.crop_scale": "input.crop_scale",
  "data.crop_ratio": "input.crop_ratio",
  "data.num_workers": "input.num_workers",
  "data.prefetch_buffer_size": "input.prefetch_buffer_size",
  "optim.attention_gamma": "loss.attention_gamma",
  "optim.attention_tau_per_step": "loss.attention_tau_per_step",
}


def deprecation(old: str) -> str:
  return f"warning: config field {old} is now {RENAMED_FIELDS[old]} (the old name still works)"


def rename_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Rewrites `--config.<old>[=value]` to the new name; returns the new argv, the old names seen."""
  renamed, seen = [], []
  for arg in argv:
    name, equals, value = arg.partition("=")
    old = name.removeprefix("--config.")
    if name.startswith("--config.") and old in RENAMED_FIELDS:
      arg = f"--config.{RENAMED_FIELDS[old]}{equals}{value}"
      seen.append(old)
    renamed.append(arg)
  return renamed, seen


def _lookup(config: Mapping, dotted: str):
  node = config
  for name in dotted.split("."):
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
      raise KeyError(dotted)
    node = node[name]
  return node


def _contains(config: Mapping, dotted: str) -> bool:
  try:
    _lookup(config, dotted)
    return True
  except KeyError:
    return False


def migrate(config: MutableMapping, new_section_factory=dict) -> list[str]:
  """Moves every old field `config` sets to its new place, in place; returns the old names moved.

  Works on plain dicts (stored configs) and on unlocked ConfigDicts; the old field's value replaces
  the new field's default, since it is the one the config's author set.
  """
  moved = []
  for old, new in RENAMED_FIELDS.items():
    if not _contains(config, old):
      continue
    *old_parents, old_name = old.split(".")
    *new_parents, new_name = new.split(".")
    holder = config
    for name in old_parents:
      holder = holder[name]
    value = holder[old_name]
    del holder[old_name]
    target = config
    for name in new_parents:
      if name not in target:
        target[name] = new_section_factory()
      target = target[name]
    target[new_name] = value
    moved.append(old)
  return moved
