"""The command line and the config it names, each wrong value one line before any work.

`parse_flags` is run.py's flag parser (a bad flag, override or config file: one line, exit status
1); `load_config` loads the config file and checks it (`check_config`), before any dataset or
model work.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import ml_collections
from absl import flags

from privattnet_jax import config_history


class Replacement(NamedTuple):
  """The field that replaced a config field, as the errors that name the old one suggest it."""

  field: str
  value: str = ""  # Its value for what the old field asked: the command line's error suggests it.
  values: str = ""  # Its values in the old field's terms: a config file's error lists them.


_CACHE_MODES = (
  "'off' (no cache), 'host' (was enabled=True) or 'device' (was enabled=True with on_device=True)"
)
# Config fields replaced by another. A command-line override that sets one is refused before flag
# parsing (which would fail on the unknown field with a traceback), a config file that sets one by
# `check_config`.
REPLACED_FIELDS = {
  "feature_cache.enabled": Replacement("feature_cache.mode", "host (or off)", _CACHE_MODES),
  "feature_cache.on_device": Replacement("feature_cache.mode", "device (or host)", _CACHE_MODES),
}


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a bad flag or config file (ml_collections puts a
  config file's traceback into its message: its last line says what is wrong)."""
  replaced = replaced_field_error(argv)
  if replaced:
    print(replaced, file=sys.stderr, flush=True)
    sys.exit(1)
  argv, renamed = config_history.rename_overrides(argv)
  for old in renamed:
    print(config_history.deprecation(old), file=sys.stderr, flush=True)
  if renamed:
    sys.argv[1:] = argv[1:]  # ml_collections defines the override flags from sys.argv.
  try:
    return flag_values(argv)
  except Exception as error:  # pylint: disable=broad-except  # ml_collections raises KeyError, OSError, ...
    print(f"error: {config_error_text(error)} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(1)


def config_error_text(error: BaseException) -> str:
  """A flag or config-file error on one line: a config file's traceback (which ml_collections puts
  into its message) reduced to its last line, the rest joined and cut to a readable length."""
  text = (
    str(error.args[0])
    if isinstance(error, (KeyError, AttributeError)) and error.args
    else str(error)
  )
  if isinstance(error.args[0] if error.args else None, KeyError):  # AttributeError(KeyError(...)).
    text = str(error.args[0].args[0])
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:
    lines = [lines[0], lines[-1]]
  text = " ".join(lines) or type(error).__name__
  return text if len(text) <= 400 else text[:400] + "..."


def load_config(config):
  """The --config flag's value, loaded now (ml_collections loads the file and applies overrides on
  first use) and checked: a missing file, an unknown field, a failing get_config or a refused value
  is one line before any work. None without --config."""
  if config is None:
    return None
  try:
    config.get("model")  # A config file that failed to load raises on first use.
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"--config: {config_error_text(error.__cause__ or error)}") from error
  with config.unlocked():
    for old in config_history.migrate(config, ml_collections.ConfigDict):
      print(config_history.deprecation(old), file=sys.stderr, flush=True)
  check_config(config)
  return config


def check_config(config) -> None:
  """Raises ValueError, naming the field, for a config that sets a replaced field."""
  for field, replacement in REPLACED_FIELDS.items():
    if _sets(config, field):
      values = f": {replacement.values}" if replacement.values else ""
      raise ValueError(f"{field} was replaced by {replacement.field}{values}")


def _sets(config, field: str) -> bool:
  node = config
  for name in field.split("."):
    if not hasattr(node, "keys") or name not in node:
      return False
    node = node[name]
  return True


def replaced_field_error(argv: list[str]) -> str | None:
  """The error line for a command line that overrides a replaced field; None when none does."""
  for arg in argv[1:]:
    field = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and field in REPLACED_FIELDS:
      replacement = REPLACED_FIELDS[field]
      value = f"={replacement.value}" if replacement.value else ""
      return f"error: --config.{field} was replaced by --config.{replacement.field}{value}"
  return None
