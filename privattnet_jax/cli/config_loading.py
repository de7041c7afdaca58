"""The command line and the config it names, each wrong value one line before any work.

`parse_flags` is run.py's flag parser (a bad flag, override or config file: one line, exit status
1); `load_config` loads the config file and checks it, before any dataset or model work.
"""

from __future__ import annotations

import sys

from absl import flags

# Config fields replaced by another. A config file that sets one is refused by the run's config
# check (feeds.validate_config); a command-line override must be caught before flag parsing, which
# would fail on the unknown field with a traceback.
REPLACED_FIELDS = {
  "feature_cache.enabled": "feature_cache.mode=host (or off)",
  "feature_cache.on_device": "feature_cache.mode=device (or host)",
}


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a bad flag or config file (ml_collections puts a
  config file's traceback into its message: its last line says what is wrong)."""
  replaced = replaced_field_error(argv)
  if replaced:
    print(replaced, file=sys.stderr, flush=True)
    sys.exit(1)
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
  first use): a missing file, an unknown field or a failing get_config is one line before any work."""
  try:
    if config is not None:
      config.get("model")  # A config file that failed to load raises on first use.
    return config
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"--config: {config_error_text(error.__cause__ or error)}") from error


def replaced_field_error(argv) -> str | None:
  for arg in argv[1:]:
    field = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and field in REPLACED_FIELDS:
      return f"error: --config.{field} was replaced by --config.{REPLACED_FIELDS[field]}"
  return None
