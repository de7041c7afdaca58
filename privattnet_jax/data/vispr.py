"""TFDS builder `vispr`: VISPR's annotation JSONs + images -> array_record, TensorFlow-free.

The builder reads the three split lists (bundled copies by default), opens each
annotation JSON, follows its `image_path` from the dataset root, normalises the
image to an RGB JPEG (shorter side <= 256 px in the default `max256` config) and
writes `array_record` files that `builder.as_data_source()` reads without
TensorFlow. Records are documented in docs/design.md.

Real downloads are messy, so every annotation ends in exactly one of three ways:
written unchanged, written after a conversion (grayscale, CMYK, palette, alpha,
16-bit, EXIF rotation, oversize), or skipped for a named reason. Nothing is
dropped silently: the build report (counts and ids per reason and per split) is
logged, printed and saved as `build_report.json` in the built dataset's version
folder, and `strict=True` turns any skip into an error.

Decisions (documented in the README):
- Annotations, images and split lists are read through `safe_files`: a path from
  an annotation or a split list must resolve (symlinks followed) inside the manual
  dir, else the record is skipped as `outside_root` without being read; only
  regular files are opened (a FIFO, device or folder is `not_a_regular_file`), each
  read is size-bounded, and a symlink loop is `symlink_loop` (docs/faults.md).
- A label outside the 68 attributes skips the whole example (`unknown_label`)
  rather than dropping the label: the score is a max over the labels, so a
  dropped label could silently lower an image's risk.
- Images are checked against `max_pixels` (default: PIL's MAX_IMAGE_PIXELS,
  ~89.5 MP) on the size actually decoded. JPEGs larger than that are decoded
  through libjpeg's DCT scaling (`draft`, 1/2, 1/4 or 1/8) down to the limit and
  counted as `downscaled_too_large`; other formats, or JPEGs still too large at
  1/8, are skipped as `too_large`. PIL's own bomb check (which would refuse such
  a JPEG at open) is suspended while one image is opened and decoded, because
  ours, on the decoded size, replaces it.
- The same `max_pixels` holds in the `original` config: an oversize JPEG is
  stored at the reduced size there too.
- `height`/`width` are the original image's size after its EXIF orientation is
  applied (the image as a viewer shows it), before any downscaling.
- An annotation without `id` takes its file name's stem as the id. `boxes`
  (optional, synthetic data) are taken as given, relative to the displayed image.
- Transparent pixels are composited on white; 16-bit images are scaled, not
  clipped (see `_to_8bit`).
- RGB JPEGs that need no change (no rotation, resize or conversion) are stored
  byte for byte (no generational loss); everything else is re-encoded at
  `jpeg_quality`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from privattnet_jax.data import attributes
from privattnet_jax import safe_files
from privattnet_jax.data import text_files
from privattnet_jax.inference import preprocessing

# tfds split name -> VISPR split list file (and folder name inside images/ and annotations/).
SPLIT_FILES: dict[str, str] = {
  "train": "train2017.txt",
  "validation": "val2017.txt",
  "test": "test2017.txt",
}


REPORT_FILENAME = "build_report.json"


ANNOTATIONS_DIR = "annotations"


# Why an annotation was skipped; the keys are the report's reason names.
SKIP_REASONS: dict[str, str] = {
  "missing_annotation": "the annotation file named in the split list does not exist",
  "unreadable_annotation": "the annotation file exists but cannot be read",
  "malformed_json": "the annotation is not valid JSON, or not a JSON object",
  "malformed_annotation": "valid JSON with a missing or ill-typed `id`/`image_path`/`labels`/`boxes`",
  "empty_labels": "the label list is empty (a safe image carries ['a0_safe'])",
  "unknown_label": "a label outside the 68 attributes of attributes.tsv (the example is skipped, not the label)",
  "duplicate_id": "an image id already written earlier in the same split",
  "missing_image": "the file at `image_path` does not exist",
  "unreadable_image": "the file at `image_path` exists but cannot be read (e.g. no permission)",
  "outside_root": "the annotation (split list entry) or its `image_path` resolves, after following symlinks, "
  "outside the manual dir: never read",
  "not_a_regular_file": "the annotation or image is a folder, FIFO, device or socket: never opened for reading",
  "file_too_large": "the annotation or image file is larger than its read limit (safe_files.MAX_*_BYTES)",
  "symlink_loop": "the annotation's or image's path runs into a symlink loop",
  "not_an_image": "the file is not an image format PIL can identify",
  "corrupt_image": "an image header was found but decoding failed (truncated or corrupt data)",
  "too_large": "more pixels than max_pixels, and not a JPEG that DCT scaling can bring under it",
}


# What was converted on the way in (these examples are written); the report's conversion names.
CONVERSIONS: dict[str, str] = {
  "grayscale": "mode L or 1, expanded to RGB",
  "cmyk": "CMYK converted to RGB",
  "palette": "palette (P) image converted to RGB",
  "alpha": "transparency (RGBA, LA, PA, P with a transparent colour) composited on white",
  "16bit": "16/32-bit integer or float image scaled to 8 bits (I;16: /257; I, F: see _to_8bit)",
  "other_mode": "another mode (YCbCr, LAB, HSV, RGBX, ...) converted to RGB",
  "exif_rotated": "EXIF orientation 2..8 applied (PIL.ImageOps.exif_transpose)",
  "exif_ignored": "EXIF data unreadable; the pixels are used as stored",
  "downscaled_too_large": "over max_pixels: decoded at 1/2, 1/4 or 1/8 scale (JPEG DCT scaling)",
  "first_frame": "an animation or a file of several images (GIF, WebP, APNG, TIFF pages, MPO): its "
  "first frame is the image (redact writes every frame of an animation)",
}


UNKNOWN_LABEL_POLICY = "skip_example"


HOMEPAGE = "https://github.com/tribhuvanesh/vpa"


CITATION = """@inproceedings{orekondy17iccv,
  title = {Towards a Visual Privacy Advisor: Understanding and Predicting Privacy Risks in Images},
  author = {Orekondy, Tribhuvanesh and Schiele, Bernt and Fritz, Mario},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year = {2017},
}"""


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
   and converted images is printed and saved as {REPORT_FILENAME} next to the data.
"""


class ManualDirError(FileNotFoundError):
  """The manual dir is missing or incomplete; the message carries the download instructions."""


class StrictBuildError(RuntimeError):
  """strict=True and the build skipped annotations; the message's first line sums up, the rest lists them."""


class StaleBuildError(ValueError):
  """A built dataset whose annotations or split lists have changed since: it is not reused."""


class _Skip(Exception):
  """Raised while reading one annotation: why it is skipped."""

  def __init__(self, reason: str, message: str, image_id: str | None = None):
    super().__init__(f"{reason}: {message}")
    assert reason in SKIP_REASONS, reason
    self.reason = reason
    self.message = message
    self.image_id = image_id


@dataclasses.dataclass(eq=False)
class VisprConfig(tfds.core.BuilderConfig):
  """max_side: the shorter side is downscaled to at most this (0 keeps the original size).

  jpeg_quality: quality of re-encoded images.
  """

  max_side: int = 256
  jpeg_quality: int = 90


class _SplitReport:
  """Counts, ids and messages of one split's skips and conversions."""

  def __init__(self):
    self.listed = 0
    self.written = 0
    self.skips: dict[str, list[tuple[str, str]]] = {}
    self.conversions: dict[str, list[str]] = {}
    self.written_ids: list[str] = []

  def skip(self, reason: str, image_id: str, message: str) -> None:
    self.skips.setdefault(reason, []).append((image_id, message))

  def convert(self, kind: str, image_id: str) -> None:
    self.conversions.setdefault(kind, []).append(image_id)

  @property
  def skipped(self) -> int:
    return sum(len(v) for v in self.skips.values())

  def to_json(self) -> dict[str, Any]:
    return {
      "listed": self.listed,
      "written": self.written,
      "skipped": self.skipped,
      "skip_reasons": {
        reason: {
          "count": len(items),
          "ids": [i for i, _ in items],
          "messages": [m for _, m in items],
        }
        for reason, items in sorted(self.skips.items())
      },
      "conversions": {
        kind: {"count": len(ids), "ids": list(ids)}
        for kind, ids in sorted(self.conversions.items())
      },
    }


def _report_json(meta: Mapping[str, Any], splits: Mapping[str, _SplitReport]) -> dict[str, Any]:
  per_split = {name: s.to_json() for name, s in splits.items()}
  total_reasons: dict[str, int] = {}
  total_conversions: dict[str, int] = {}
  for s in per_split.values():
    for reason, entry in s["skip_reasons"].items():
      total_reasons[reason] = total_reasons.get(reason, 0) + entry["count"]
    for kind, entry in s["conversions"].items():
      total_conversions[kind] = total_conversions.get(kind, 0) + entry["count"]
  written_ids: dict[str, list[str]] = {}
  for name, s in splits.items():
    for image_id in s.written_ids:
      written_ids.setdefault(image_id, []).append(name)
  return {
    **meta,
    "splits": per_split,
    "total": {
      "listed": sum(s["listed"] for s in per_split.values()),
      "written": sum(s["written"] for s in per_split.values()),
      "skipped": sum(s["skipped"] for s in per_split.values()),
      "skip_reasons": dict(sorted(total_reasons.items())),
      "conversions": dict(sorted(total_conversions.items())),
    },
    # The same image written to two splits would leak between train and evaluation.
    "ids_in_several_splits": {i: v for i, v in sorted(written_ids.items()) if len(v) > 1},
  }


def format_report(report: Mapping[str, Any], max_ids: int = 10) -> str:
  """A human-readable summary of a build report (the JSON holds every id)."""
  lines = [
    f"VISPR build report: {report.get('builder', 'vispr')}/{report.get('config', '?')} "
    f"{report.get('version', '')} from {report.get('manual_dir', '?')}",
  ]
  for name, s in report["splits"].items():
    lines.append(f"  {name}: listed {s['listed']}, written {s['written']}, skipped {s['skipped']}")
    for reason, entry in s["skip_reasons"].items():
      ids = entry["ids"][:max_ids]
      more = f" (+{entry['count'] - len(ids)} more)" if entry["count"] > len(ids) else ""
      lines.append(f"    skipped {reason}: {entry['count']}: {', '.join(ids)}{more}")
    for kind, entry in s["conversions"].items():
      ids = entry["ids"][:max_ids]
      more = f" (+{entry['count'] - len(ids)} more)" if entry["count"] > len(ids) else ""
      lines.append(f"    converted {kind}: {entry['count']}: {', '.join(ids)}{more}")
  several = report.get("ids_in_several_splits") or {}
  if several:
    lines.append(
      f"  WARNING: {len(several)} ids written to several splits: {list(several)[:max_ids]}"
    )
  total = report["total"]
  lines.append(
    f"  total: listed {total['listed']}, written {total['written']}, skipped {total['skipped']}"
  )
  return "\n".join(lines)


def load_build_report(
  builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike,
) -> dict[str, Any]:
  """Reads `build_report.json` of a built dataset (a builder, or its version folder)."""
  if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
    folder = pathlib.Path(os.fspath(builder_or_dir.data_path))
  else:
    folder = pathlib.Path(builder_or_dir)
  return json.loads((folder / REPORT_FILENAME).read_text())


def read_split_list(path: str | os.PathLike) -> list[str]:
  """Annotation paths (relative to the manual dir) listed in one split file; blank lines dropped,
  a byte-order mark and CRLF line ends tolerated (`text_files`)."""
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
  """Where the split lists come from: `splits_dir` when given; else the manual dir's own lists
  when all three lie at its root (a user's own VISPR-layout dataset, or the synthetic one);
  else the VISPR lists bundled in data/splits. Some but not all at the root is an error."""
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

  Raises _Skip for malformed JSON, missing/ill-typed keys, empty or unknown labels.
  Keys other than id, image_path, labels and boxes are ignored.
  """
  try:
    annotation = json.loads(data)
  except (ValueError, UnicodeDecodeError) as e:
    raise _Skip("malformed_json", f"{type(e).__name__}: {e}", fallback_id) from None
  if not isinstance(annotation, dict):
    raise _Skip(
      "malformed_json", f"top level is a {type(annotation).__name__}, not an object", fallback_id
    )
  image_id = annotation.get("id", fallback_id)
  if not isinstance(image_id, str) or not image_id:
    raise _Skip(
      "malformed_annotation", f"`id` must be a non-empty string, got {image_id!r}", fallback_id
    )
  image_path = annotation.get("image_path")
  if not isinstance(image_path, str) or not image_path:
    raise _Skip(
      "malformed_annotation",
      f"`image_path` must be a non-empty string, got {image_path!r}",
      image_id,
    )
  labels = annotation.get("labels")
  if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
    raise _Skip(
      "malformed_annotation", f"`labels` must be a list of strings, got {labels!r}", image_id
    )
  if not labels:
    raise _Skip("empty_labels", "`labels` is empty", image_id)
  unknown = sorted({x for x in labels if x not in attributes.ATTRIBUTE_INDEX})
  if unknown:
    raise _Skip(
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
    raise _Skip(
      "malformed_annotation", f"`boxes` must be a list of [ymin, xmin, ymax, xmax]: {e}", image_id
    ) from None
  if boxes.size and (
    not np.all(np.isfinite(boxes))
    or boxes.min() < 0
    or boxes.max() > 1
    or np.any(boxes[:, 2] < boxes[:, 0])
    or np.any(boxes[:, 3] < boxes[:, 1])
  ):
    raise _Skip(
      "malformed_annotation",
      "`boxes` must be normalised [ymin, xmin, ymax, xmax] in [0, 1]",
      image_id,
    )
  return image_id, image_path, labels, boxes


def _read_contained(
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
    raise _Skip(reason, f"{safe_files.printable(root / relative)}: {e.message}", image_id) from None


class Vispr(tfds.core.GeneratorBasedBuilder):
  """VISPR images with their 68 privacy attributes, as RGB JPEGs in array_record files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: RGB JPEG, labels, original size, boxes, build report."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
    VisprConfig(
      name="max256",
      max_side=preprocessing.BUILDER_MAX_SIDES["max256"],
      description="Shorter side <= 256 px (the pipeline's input).",
    ),
    VisprConfig(
      name="original",
      max_side=preprocessing.BUILDER_MAX_SIDES["original"],
      description="Original size, normalised to RGB JPEG.",
    ),
  ]
  DEFAULT_CONFIG_NAME = "max256"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. tfds' own lookup goes through the `importlib_resources` backport, which
    etils only installs with its `epath` extra; without it, building fails for any builder
    that lives in a package."""
    return epath.Path(inspect.getfile(cls))

  def __init__(
    self,
    *,
    splits_dir: str | os.PathLike = "",
    strict: bool = False,
    max_pixels: int | None | str = "pil",
    file_format: str | None = None,
    **kwargs,
  ):
    """Builder options beyond tfds' own (data_dir, config, version).

    Args:
      splits_dir: folder holding train2017.txt, val2017.txt, test2017.txt; empty:
        the copies bundled in data/splits.
      strict: raise StrictBuildError, listing every skip, instead of building a
        dataset without them.
      max_pixels: limit on decoded pixels per image; "pil" (default) takes PIL's
        Image.MAX_IMAGE_PIXELS as it is now; None: no limit.
      file_format: tfds file format; default array_record (the only one
        `as_data_source` reads).
      **kwargs: data_dir, config, version.
    """
    self._splits_dir = pathlib.Path(splits_dir) if splits_dir else attributes.SPLITS_DIR
    self._strict = bool(strict)
    self._max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels == "pil" else max_pixels
    self._split_reports: dict[str, _SplitReport] = {}
    self._manual_root: pathlib.Path | None = None
    self._last_report: dict[str, Any] | None = None
    super().__init__(file_format=file_format or "array_record", **kwargs)
    # Keep the options when tfds pickles the builder (it re-runs __init__ from this state).
    self._original_state.update(
      splits_dir=os.fspath(self._splits_dir),
      strict=self._strict,
      max_pixels=self._max_pixels,
      file_format=file_format,
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "VISPR (Orekondy et al., ICCV 2017): 22,167 images annotated with 68 privacy attributes. "
        "Images are stored as RGB JPEG; skipped and converted images are listed in build_report.json."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "image_id": tfds.features.Text(),
          "labels": tfds.features.Tensor(shape=(attributes.NUM_ATTRIBUTES,), dtype=np.bool_),
          "height": np.int32,
          "width": np.int32,
          "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        }
      ),
      homepage=HOMEPAGE,
      citation=CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access  # checked by us, not tfds
    lists = check_manual_dir(manual_dir, self._splits_dir)
    self._manual_root = pathlib.Path(os.fspath(manual_dir))
    self._split_reports = {split: _SplitReport() for split in SPLIT_FILES}
    return {split: self._generate_examples(split, paths) for split, paths in lists.items()}

  def _generate_examples(
    self, split: str, annotation_paths: Sequence[str]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    report = self._split_reports[split]
    written: set[str] = set()
    config: VisprConfig = self.builder_config
    for relative in annotation_paths:
      report.listed += 1
      fallback_id = pathlib.PurePosixPath(relative).stem
      image_id = fallback_id
      try:
        image_id, example, conversions = self._example(relative, fallback_id, written, config)
      except _Skip as skip:
        image_id = skip.image_id or image_id
        report.skip(skip.reason, image_id, skip.message)
        logging.warning("vispr %s: skipped %s (%s: %s)", split, image_id, skip.reason, skip.message)
        continue
      for kind in conversions:
        report.convert(kind, image_id)
      written.add(image_id)
      report.written += 1
      report.written_ids.append(image_id)
      yield image_id, example

  def _example(self, relative: str, fallback_id: str, written: set[str], config: VisprConfig):
    try:
      data = _read_contained(
        self._manual_root, relative, "annotation", safe_files.MAX_ANNOTATION_BYTES, fallback_id
      )
    except _Skip as skip:  # The report names the entry as the split list spells it.
      raise _Skip(
        skip.reason,
        f"split list entry '{safe_files.printable(relative)}': {skip.message}",
        skip.image_id,
      ) from None
    image_id, image_path, labels, boxes = parse_annotation(data, fallback_id)
    if image_id in written:
      raise _Skip(
        "duplicate_id", f"{image_id} already written to this split ({relative})", image_id
      )
    image_file = self._manual_root / image_path
    image_data = _read_contained(
      self._manual_root, image_path, "image", safe_files.MAX_IMAGE_BYTES, image_id
    )
    try:
      encoded, height, width, conversions = preprocessing.process_image(
        image_data,
        max_side=config.max_side,
        jpeg_quality=config.jpeg_quality,
        max_pixels=self._max_pixels,
      )
    except preprocessing.UnusableImage as skip:
      raise _Skip(skip.reason, f"{image_file}: {skip.message}", image_id) from None
    example = {
      "image": encoded,
      "image_id": image_id,
      "labels": attributes.multi_hot(labels),
      "height": height,
      "width": width,
      "boxes": boxes,
    }
    return image_id, example, conversions

  def _report_meta(self) -> dict[str, Any]:
    config: VisprConfig = self.builder_config
    return {
      "builder": self.name,
      "config": config.name,
      "version": str(self.version),
      "manual_dir": os.fspath(self._manual_root.resolve()) if self._manual_root else "",
      "splits_dir": os.fspath(self._splits_dir.resolve()),
      "split_lists_sha256": split_lists_digest(self._splits_dir),
      "inputs_sha256": inputs_digest(self._manual_root, self._splits_dir)
      if self._manual_root
      else "",
      "strict": self._strict,
      "max_side": config.max_side,
      "jpeg_quality": config.jpeg_quality,
      "max_pixels": self._max_pixels,
      "unknown_label_policy": UNKNOWN_LABEL_POLICY,
      "skip_reason_meanings": SKIP_REASONS,
      "conversion_meanings": CONVERSIONS,
    }

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    report = _report_json(self._report_meta(), self._split_reports)
    self._last_report = report
    if self._strict and report["total"]["skipped"]:
      text = format_report(report, max_ids=10**9)
      print(text, flush=True)
      raise StrictBuildError(
        f"strict build: {report['total']['skipped']} annotations would be skipped\n{text}"
      )
    # self.data_dir is the incomplete folder here; tfds renames it to the version folder.
    path = pathlib.Path(os.fspath(self.data_dir)) / REPORT_FILENAME
    path.write_text(json.dumps(report, indent=1))

  def download_and_prepare(self, **kwargs):
    """tfds' download_and_prepare, then the build report is logged and printed."""
    self._last_report = None
    super().download_and_prepare(**kwargs)
    if self._last_report is not None:
      text = format_report(self._last_report)
      logging.info("%s", text)
      print(
        f"{text}\n  full report: {pathlib.Path(os.fspath(self.data_path)) / REPORT_FILENAME}",
        flush=True,
      )


def prepare(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  config_name: str = "max256",
  splits_dir: str | os.PathLike = "",
  strict: bool = False,
  *,
  max_pixels: int | None | str = "pil",
) -> Vispr:
  """The `vispr` builder over `manual_dir`, built into `data_dir` unless already built there.

  A reused build is checked against its report: with strict=True, a build that
  skipped anything raises StrictBuildError; changed split lists or annotations
  (their digest, `inputs_digest`) raise StaleBuildError (delete the version folder to
  rebuild); the same content under another manual dir is logged as a warning. Without
  `splits_dir`, the split lists at the manual dir's root are used when it has all
  three, else the bundled VISPR lists (`resolve_splits_dir`); the log says which.
  """
  splits_dir = resolve_splits_dir(manual_dir, splits_dir)
  logging.info(
    "Split lists: %s", ", ".join(os.fspath(splits_dir / name) for name in SPLIT_FILES.values())
  )
  builder = Vispr(
    data_dir=os.fspath(data_dir),
    config=config_name,
    splits_dir=splits_dir,
    strict=strict,
    max_pixels=max_pixels,
  )
  data_path = pathlib.Path(os.fspath(builder.data_path))
  if (data_path / "dataset_info.json").exists():
    _check_reused(data_path, manual_dir, splits_dir, strict)
    return builder
  check_manual_dir(manual_dir, splits_dir)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
    file_format="array_record",
  )
  return builder


def _check_reused(data_path, manual_dir, splits_dir, strict) -> None:
  report_path = data_path / REPORT_FILENAME
  if not report_path.exists():
    logging.warning(
      "Reusing %s, which has no %s: its skips are unknown.", data_path, REPORT_FILENAME
    )
    if strict:
      raise StrictBuildError(f"strict: {data_path} has no {REPORT_FILENAME}; delete it to rebuild")
    return
  report = json.loads(report_path.read_text())
  logging.info("Reusing %s (built from %s).", data_path, report.get("manual_dir"))
  if strict and report["total"]["skipped"]:
    raise StrictBuildError(
      f"strict: the existing build {data_path} skipped {report['total']['skipped']} annotations\n"
      + format_report(report, max_ids=10**9)
    )
  if os.fspath(pathlib.Path(manual_dir).resolve()) != report.get("manual_dir"):
    logging.warning(
      "%s was built from %s, not %s (same annotations and split lists).",
      data_path,
      report.get("manual_dir"),
      manual_dir,
    )
  if "inputs_sha256" not in report:
    logging.warning(
      "%s records no digest of its inputs: it cannot be checked against %s", data_path, manual_dir
    )
    return
  changed = (
    "split lists"
    if split_lists_digest(splits_dir) != report.get("split_lists_sha256")
    else "annotations"
    if inputs_digest(manual_dir, splits_dir) != report["inputs_sha256"]
    else None
  )
  if changed:
    raise StaleBuildError(
      f"the {changed} in {manual_dir} changed since the dataset in {data_path} was built from them; "
      f"delete {data_path} to rebuild it (it is not reused)"
    )


def data_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """{split: random-access source}; `image` stays encoded JPEG bytes (SkipDecoding)."""
  sources = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
  return {str(split): source for split, source in sources.items()}
