"""VISPR's files on disk: split lists, annotations, the manual folder's checks and digests."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from privattnet_jax import safe_files
from privattnet_jax.data import attributes, build_report, text_files

# tfds split name -> VISPR split list file (and folder name inside images/ and annotations/).
SPLIT_FILES: dict[str, str] = {
  "train": "train2017.txt",
  "validation": "val2017.txt",
  "test": "test2017.txt",
}


ANNOTATIONS_DIR = "annotations"
UNKNOWN_LABEL_POLICY = "skip_example"
HOMEPAGE = "https://github.com/tribhuvanesh/vpa"
MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
VISPR (Visual Privacy dataset, Orekondy et al., ICCV 2017) cannot be downloaded
automatically: its images come under CC BY-NC 4.0 and each image's own licence.

1. From the VISPR dataset page (linked from {HOMEPAGE}) download, for each of the
   three splits train2017, val2017 and test2017, the images archive (10,000 /
   4,167 / 8,000 images; about 21, 8.8 and 17 GB) and the annotations archive.
2. Extract all six archives under ONE root folder, the manual dir, so that it reads:

     <manual_dir>/images/train2017/2017_<id>.jpg   (and val2017/, test2017/)
     <manual_dir>/annotations/train2017/2017_<id>.json   (and val2017/, test2017/)

   If an archive extracts into differently named folders, move or rename them so
   that annotations/<split>/ matches the split lists. Each annotation's
   `image_path` is followed from the manual dir, so images must sit where their
   annotations say (e.g. "images/train2017/2017_10001018.jpg").
3. The split lists (train2017.txt, val2017.txt, test2017.txt: one annotation
   path per line, e.g. annotations/train2017/2017_10001018.json) are bundled with
   this project in data/splits/; a manual dir that holds its own three lists at
   its root (your own VISPR-layout dataset) is built with those; pass splits_dir
   to use other copies.
4. Build: `privattnet_jax.data.vispr.prepare(manual_dir, data_dir)`, or run the
   main job with --config.data.manual_dir=<manual_dir>. A build report of skipped
   and converted images is printed and saved as {build_report.REPORT_FILENAME} next to the data.
"""


class ManualDirError(FileNotFoundError):
  """The manual dir is missing or incomplete; the message carries the download instructions."""


def read_split_list(path: str | os.PathLike) -> list[str]:
  """Annotation paths (relative to the manual dir) listed in one split file.

  Blank lines are dropped; a byte-order mark and CRLF line ends tolerated (`text_files`).
  """
  return text_files.entries(path, max_bytes=safe_files.MAX_LIST_BYTES)


def _is_contained_file(root: pathlib.Path, relative: str) -> bool:
  try:
    safe_files.regular_file(relative, root)
    return True
  except safe_files.UnsafeFileError:
    return False


def _fail(problems: Sequence[str]) -> ManualDirError:
  listing = "\n".join(f"  - {p}" for p in problems)
  return ManualDirError(
    f"The VISPR manual dir is missing or incomplete:\n{listing}\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
  )


def check_manual_dir(
  manual_dir: str | os.PathLike, splits_dir: str | os.PathLike = ""
) -> dict[str, list[str]]:
  """Fails at once, with the download instructions, unless the manual dir can be built from.

  Required: the manual dir with an `annotations/` folder, the three split lists,
  and for every split at least one listed annotation present. Individual
  missing files are not errors here; the build skips and reports them.

  Returns:
    {tfds split: [annotation path relative to the manual dir, ...]}.
  """
  splits_dir = pathlib.Path(splits_dir) if splits_dir else attributes.SPLITS_DIR
  problems = []
  root = pathlib.Path(manual_dir) if manual_dir else None
  if root is None:
    problems.append("no manual dir given")
  elif not root.is_dir():
    problems.append(f"{root} does not exist or is not a folder")
  elif not (root / ANNOTATIONS_DIR).is_dir():
    problems.append(f"{root} has no {ANNOTATIONS_DIR}/ folder")
  lists: dict[str, list[str]] = {}
  for split, filename in SPLIT_FILES.items():
    path = splits_dir / filename
    try:
      lists[split] = read_split_list(path)
    except safe_files.UnsafeFileError as e:
      problems.append(
        f"split list {path} does not exist" if e.reason == "missing" else f"split list {e}"
      )
      continue
    if not lists[split]:
      problems.append(f"split list {path} is empty")
  if problems:
    raise _fail(problems)
  bundled = splits_dir.resolve() == attributes.SPLITS_DIR.resolve()
  for split, paths in lists.items():
    if not any(_is_contained_file(root, p) for p in paths):
      problems.append(
        f"none of the {len(paths)} annotations listed in {splits_dir / SPLIT_FILES[split]} exist "
        f"under {root} (first: {root / paths[0]})"
        + (
          f"; for a dataset of your own, put its {', '.join(SPLIT_FILES.values())} at {root} "
          "or set data.splits_dir"
          if bundled
          else ""
        )
      )
  if problems:
    raise _fail(problems)
  return lists


def resolve_splits_dir(
  manual_dir: str | os.PathLike, splits_dir: str | os.PathLike = ""
) -> pathlib.Path:
  """Where the split lists come from: `splits_dir`, else the manual dir's, else the bundled ones.

  The manual dir's own lists are used when all three lie at its root (a user's own VISPR-layout
  dataset, or the synthetic one); else the VISPR lists bundled in data/splits. Some but not all at
  the root is an error.
  """
  if splits_dir:
    return pathlib.Path(splits_dir)
  root = pathlib.Path(manual_dir) if manual_dir else None
  present = [name for name in SPLIT_FILES.values() if root is not None and (root / name).is_file()]
  if len(present) == len(SPLIT_FILES):
    return root
  if present:
    absent = [name for name in SPLIT_FILES.values() if name not in present]
    raise _fail(
      [
        f"{root} holds the split list {', '.join(present)} but not {', '.join(absent)}: add "
        "them, or set data.splits_dir to the folder that holds all three"
      ]
    )
  return attributes.SPLITS_DIR


def split_lists_digest(splits_dir: str | os.PathLike = "") -> dict[str, str]:
  """sha256 of each split list, recorded in the report so a stale build can be recognised."""
  splits_dir = pathlib.Path(splits_dir) if splits_dir else attributes.SPLITS_DIR
  digest = {}
  for split, filename in SPLIT_FILES.items():
    try:
      data = safe_files.read_bytes(splits_dir / filename, max_bytes=safe_files.MAX_LIST_BYTES)
      digest[split] = hashlib.sha256(data).hexdigest()
    except safe_files.UnsafeFileError:
      digest[split] = ""
  return digest


def inputs_digest(manual_dir: str | os.PathLike, splits_dir: str | os.PathLike = "") -> str:
  """sha256 over the split lists and the content of every listed annotation (contained reads).

  Recorded in the build report: an annotation edited after the build (its image_path or labels)
  makes the build stale, and a stale build is never reused (`prepare`). Annotations are small
  (~1 KB), so hashing them costs about a second for all of VISPR.
  """
  splits_dir = pathlib.Path(splits_dir) if splits_dir else attributes.SPLITS_DIR
  root = pathlib.Path(manual_dir)
  digest = hashlib.sha256()
  for split, filename in SPLIT_FILES.items():
    try:
      paths = read_split_list(splits_dir / filename)
    except safe_files.UnsafeFileError as e:
      paths = [f"<{e.reason}>"]
    digest.update(f"{split}\0{len(paths)}\0".encode())
    for relative in paths:
      try:
        content = hashlib.sha256(
          safe_files.read_bytes(relative, max_bytes=safe_files.MAX_ANNOTATION_BYTES, root=root)
        ).hexdigest()
      except safe_files.UnsafeFileError as e:
        content = f"<{e.reason}>"
      digest.update(f"{relative}\0{content}\0".encode())
  return digest.hexdigest()


def parse_annotation(data: bytes, fallback_id: str) -> tuple[str, str, list[str], np.ndarray]:
  """Validates one annotation JSON; returns (id, image_path, labels, boxes (N, 4) float32).

  Raises build_report.Skip for malformed JSON, missing/ill-typed keys, empty or unknown labels.
  Keys other than id, image_path, labels and boxes are ignored.
  """
  try:
    annotation = json.loads(data)
  except (ValueError, UnicodeDecodeError) as e:
    raise build_report.Skip("malformed_json", f"{type(e).__name__}: {e}", fallback_id) from None
  if not isinstance(annotation, dict):
    raise build_report.Skip(
      "malformed_json", f"top level is a {type(annotation).__name__}, not an object", fallback_id
    )
  image_id = annotation.get("id", fallback_id)
  if not isinstance(image_id, str) or not image_id:
    raise build_report.Skip(
      "malformed_annotation", f"`id` must be a non-empty string, got {image_id!r}", fallback_id
    )
  image_path = annotation.get("image_path")
  if not isinstance(image_path, str) or not image_path:
    raise build_report.Skip(
      "malformed_annotation",
      f"`image_path` must be a non-empty string, got {image_path!r}",
      image_id,
    )
  labels = annotation.get("labels")
  if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
    raise build_report.Skip(
      "malformed_annotation", f"`labels` must be a list of strings, got {labels!r}", image_id
    )
  if not labels:
    raise build_report.Skip("empty_labels", "`labels` is empty", image_id)
  unknown = sorted({x for x in labels if x not in attributes.ATTRIBUTE_INDEX})
  if unknown:
    raise build_report.Skip(
      "unknown_label",
      f"labels outside the {attributes.NUM_ATTRIBUTES} attributes: {unknown}",
      image_id,
    )
  raw_boxes = annotation.get("boxes", [])
  try:
    if not isinstance(raw_boxes, list):
      raise TypeError(f"got a {type(raw_boxes).__name__}")
    boxes = np.asarray(raw_boxes, dtype=np.float32)
    if boxes.size == 0:
      boxes = np.zeros((0, 4), np.float32)
    elif boxes.ndim != 2 or boxes.shape[1] != 4:
      raise ValueError(f"shape {boxes.shape}")
  except (ValueError, TypeError) as e:
    raise build_report.Skip(
      "malformed_annotation", f"`boxes` must be a list of [ymin, xmin, ymax, xmax]: {e}", image_id
    ) from None
  if boxes.size and (
    not np.all(np.isfinite(boxes))
    or boxes.min() < 0
    or boxes.max() > 1
    or np.any(boxes[:, 2] < boxes[:, 0])
    or np.any(boxes[:, 3] < boxes[:, 1])
  ):
    raise build_report.Skip(
      "malformed_annotation",
      "`boxes` must be normalised [ymin, xmin, ymax, xmax] in [0, 1]",
      image_id,
    )
  return image_id, image_path, labels, boxes


def read_contained(
  root: pathlib.Path, relative: str, kind: str, max_bytes: int, image_id: str
) -> bytes:
  """An annotation's or image's bytes, read only if it is a regular file inside the manual dir."""
  try:
    return safe_files.read_bytes(relative, max_bytes=max_bytes, root=root)
  except safe_files.UnsafeFileError as e:
    reason = {
      "missing": f"missing_{kind}",
      "unreadable": f"unreadable_{kind}",
      "invalid_path": "malformed_annotation",
    }.get(e.reason, e.reason)
    raise build_report.Skip(
      reason, f"{safe_files.printable(root / relative)}: {e.message}", image_id
    ) from None
