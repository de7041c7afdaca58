"""The build report: what the VISPR builder skipped or converted, per split, by reason and id."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

REPORT_FILENAME = "build_report.json"


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


class Skip(Exception):
  """Raised while reading one annotation: why it is skipped."""

  def __init__(self, reason: str, message: str, image_id: str | None = None):
    super().__init__(f"{reason}: {message}")
    assert reason in SKIP_REASONS, reason
    self.reason = reason
    self.message = message
    self.image_id = image_id


class SplitReport:
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


def report_json(meta: Mapping[str, Any], splits: Mapping[str, SplitReport]) -> dict[str, Any]:
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
