"""What predict, redact and export write never becomes what they read, nor overwrites an input.

An output folder inside a photo folder (`--images=in --output=in/out`) is natural, and a second
run on the same arguments would otherwise read the first run's outputs and panels as photos and
write one photo's result onto another's output that is itself an input. The rules:

- Before anything is written, `check` refuses an output folder that is, or holds, something the
  run is given (a photo, a folder, the folder a glob starts from, a preference file), or that lies
  inside a folder the run reads (the checkpoints, an exported artifact).
- While photos are collected (`Scan`), a folder walk or glob never enters the run's own output
  folder, nor another earlier run's: a folder holding one of `MANIFESTS` (the rows file every
  predict and redact run opens first) is an output folder. Handed in by name, an earlier output
  folder gives its photos (redacting redacted photos again is a use), never its panels, heat maps or
  tables. A found file that links into the output folder, or is a panel, is an error row.
- Every file a run writes goes through `claim`: never onto an input of the run, and a symlink in
  the output folder is replaced, never written through.
"""

from __future__ import annotations

import glob
import os
import pathlib
from collections.abc import Iterable

# The rows file a run opens first, in its output folder -> the table beside it and the folder of
# the tool's own pictures (predict.predict, redact.redact_photos write these names).
MANIFESTS = {
  "predictions.jsonl": ("predictions.csv", "heatmaps"),
  "redaction.jsonl": ("redaction.csv", "panels"),
}
# What a run from a workdir reads (checkpoints.py's folders).
CHECKPOINT_FOLDERS = ("checkpoints", "checkpoints_set_aside", "frozen_encoder")


class OutputFolderError(ValueError):
  """The output folder would overwrite or be read as the run's input; nothing was written."""


def resolved(path) -> pathlib.Path:
  """The path with `~` expanded and every symlink followed (need not exist)."""
  return pathlib.Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def spec_root(spec: str) -> pathlib.Path:
  """Where an --images argument starts: the file or folder, or a glob's folder before a wildcard.

  `in/**/*.jpg` -> `in`.
  """
  if not glob.has_magic(spec):
    return pathlib.Path(os.path.expanduser(spec))
  parts = pathlib.Path(os.path.expanduser(spec)).parts
  fixed = []
  for part in parts:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed) if fixed else pathlib.Path(".")


def manifest_of(folder: pathlib.Path) -> str | None:
  """The manifest a folder holds (it is a predict or redact output folder), or None."""
  for name in MANIFESTS:
    if (folder / name).is_file():
      return name
  return None


def tool_folders(folder: pathlib.Path) -> set[str]:
  """The names of the tool's own picture folders in an output folder (panels, heatmaps)."""
  return {MANIFESTS[name][1] for name in MANIFESTS if (folder / name).is_file()}


def workdir_reads(workdir) -> list[pathlib.Path]:
  """The folders a run from `workdir`'s checkpoints reads."""
  return [pathlib.Path(workdir) / name for name in CHECKPOINT_FOLDERS]


def check(output_dir, inputs: Iterable[str] = (), reads: Iterable = ()) -> None:
  """Raises OutputFolderError, before anything is written, when the output folder overlaps inputs.

  It may not be or hold one of `inputs` (--images arguments, a preference file), nor lie inside
  one of `reads`.
  """
  output = resolved(output_dir)
  for spec in inputs:
    root = resolved(spec_root(spec))
    if _inside(root, output):
      what = "is" if root == output else "holds"
      raise OutputFolderError(
        f"the output folder {output_dir} {what} the input {spec}: its files would be read as "
        "photos, or overwritten; choose an output folder outside the inputs"
      )
  for folder in reads:
    if _inside(output, resolved(folder)):
      raise OutputFolderError(
        f"the output folder {output_dir} lies inside {folder}, which this run reads; choose "
        "another output folder"
      )


class Scan:
  """One run's decisions on what a folder walk or glob passes over, and which files it refuses.

  `base` is the folder an --images argument names (or a glob starts from): what the user handed
  in by name is read even when it is an earlier output folder; only what lies below it is
  skipped.
  """

  def __init__(self, output_dir=None, image_extensions: Iterable[str] = ()):
    self.output = resolved(output_dir) if output_dir is not None else None
    self.extensions = frozenset(image_extensions)
    self.skipped: dict[str, None] = {}  # Folders passed over (and why), once each, for the log.
    self._output_checked = False

  def skip_folder(self, folder: pathlib.Path, base: pathlib.Path) -> bool:
    """Whether a walk from `base` passes over `folder`.

    It does over the run's output folder, an earlier output folder below `base`, and an output
    folder's panels or heat maps.
    """
    real = resolved(folder)
    if self.output is not None and _inside(real, self.output):
      self._check_output_holds_no_photos(folder)
      return True
    if real == resolved(base):
      return False
    manifest = manifest_of(folder)
    if manifest is not None:
      self.skipped[f"{folder} (an earlier run's output: it holds {manifest})"] = None
      return True
    if folder.name in tool_folders(folder.parent):
      self.skipped[f"{folder} (the {folder.name} of an earlier run)"] = None
      return True
    return False

  def skip_below(self, folder: pathlib.Path, base: pathlib.Path) -> bool:
    """Whether `skip_folder` passes over `folder` (a glob's match under `base`) or one above it.

    The folders checked are `folder` and those between it and `base`.
    """
    base = pathlib.Path(base)
    while True:
      if self.skip_folder(folder, base):
        return True
      if folder == base or folder == folder.parent or resolved(folder) == resolved(base):
        return False
      folder = folder.parent

  def refuse(self, path: pathlib.Path, real: pathlib.Path) -> str | None:
    """The error of a collected file (`real`: its resolved path) that is not a photo to read.

    Such a file is in, or links into, the output folder; or it is a panel, heat map or table an
    earlier run wrote.
    """
    if self.output is not None and _inside(real, self.output):
      return (
        f"inside_output: {path} is in (or links into) the output folder {self.output}, which "
        "this run writes"
      )
    if real.parent.name in tool_folders(real.parent.parent):
      return (
        f"earlier_output: {path} is one of the {real.parent.name} an earlier run wrote "
        f"({real.parent.parent / manifest_of(real.parent.parent)}), not a photo"
      )
    for manifest, (table, _) in MANIFESTS.items():
      if real.name in (manifest, table) and (real.parent / manifest).is_file():
        return f"earlier_output: {path} is a table an earlier run wrote, not a photo"
    return None

  def _check_output_holds_no_photos(self, folder: pathlib.Path) -> None:
    """Fails when a walk or glob that reached the output folder would read photos there.

    Fine when it is an earlier output folder (its files are outputs) or holds no photos; else its
    photos are inputs the run would overwrite.
    """
    if self._output_checked:
      return
    self._output_checked = True
    if self.output is None or not self.output.is_dir() or manifest_of(self.output) is not None:
      return
    for root, _, files in os.walk(self.output):
      for name in files:
        if pathlib.PurePath(name).suffix.lower() in self.extensions:
          raise OutputFolderError(
            f"the output folder {self.output} holds photos ({pathlib.Path(root) / name}) that "
            f"the inputs include (through {folder}): they would be overwritten; choose an empty "
            "or new output folder"
          )


def input_paths(entries, extra: Iterable = ()) -> frozenset[pathlib.Path]:
  """The resolved paths of a run's collected files (`(path, error)` entries) and other inputs."""
  paths = {resolved(path) for path, error in entries if error is None}
  return frozenset(paths | {resolved(path) for path in extra if path})


def claim(path: pathlib.Path, inputs: frozenset[pathlib.Path] = frozenset()) -> pathlib.Path:
  """Makes `path` ready to be written, refusing it when it is (or links to) one of the run's inputs.

  `inputs` are resolved paths. A symlink at `path` is removed, so that the new file replaces the
  link and never writes through it.
  """
  if resolved(path) in inputs:
    raise OutputFolderError(
      f"refusing to overwrite the input {resolved(path)}: choose another --output"
    )
  if path.is_symlink():
    path.unlink()
  return path
