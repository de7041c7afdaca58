"""Protect a photo, not only score it: written again with the attended regions hidden, no metadata.

Each photo is written again with the regions the model's attention points at blurred (or
pixelated, or filled), and without its metadata.

The masks come from `redaction` (greedy rounds scored at the model's resolution), the full-size
reading and writing from `photos`, the metadata from `metadata`; this module runs them over the
photos predict takes and writes redaction.jsonl, redaction.csv and before/after panels.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from privattnet_jax.inference import animations
from privattnet_jax.inference import heatmaps
from privattnet_jax.inference import output_folders
from privattnet_jax.inference import predict
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.inference import user_scores
from privattnet_jax.inference import redaction
from privattnet_jax.inference import photos


def before_after_panel(
  before: np.ndarray,
  after: Image.Image,
  boxes,
  size: tuple[int, int],
  *,
  score_before: float,
  score_after: float,
  area: float,
  title: str,
) -> Image.Image:
  """Before (region boxes outlined) and after, side by side, with the scores above."""
  before_tile = Image.fromarray(before).convert("RGB")
  after_tile = after.convert("RGB").resize(
    before_tile.size, Image.Resampling.BILINEAR, reducing_gap=3.0
  )
  draw = ImageDraw.Draw(before_tile)
  for box in redaction.scale_boxes(boxes, size, before_tile.size):
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 0, 0))
  caption = heatmaps.CAPTION_HEIGHT
  width, height = before_tile.size
  panel = Image.new("RGB", (2 * width, height + 2 * caption), heatmaps.CAPTION_BACKGROUND)
  panel.paste(before_tile, (0, 2 * caption))
  panel.paste(after_tile, (width, 2 * caption))
  draw = ImageDraw.Draw(panel)
  draw.text((2, 1), title, fill=heatmaps.CAPTION_COLOUR)
  draw.text((2, caption + 1), f"before {score_before:.2f}", fill=heatmaps.CAPTION_COLOUR)
  draw.text(
    (width + 2, caption + 1),
    f"after {score_after:.2f} ({100 * area:.0f}%)",
    fill=heatmaps.CAPTION_COLOUR,
  )
  return panel


CSV_HEADER = (
  "path",
  "name",
  "status",
  "error",
  "output",
  "format",
  "width",
  "height",
  "frames",
  "frames_written",
  "score_before",
  "score_after",
  "target",
  "target_reached",
  "area",
  "rounds",
  "regions",
  "metadata_found",
  "metadata_removed",
  "gps",
  "panel",
  "conversions",
)


def _csv_columns(record: dict) -> dict:
  """redact's table columns: the region boxes, the metadata found and removed, the GPS tags."""
  gps = record.get("metadata_found", {}).get("gps")
  return {
    "regions": ";".join(" ".join(map(str, box)) for box in record.get("regions", ())),
    "metadata_found": ";".join(record.get("metadata_found", {})),
    "metadata_removed": ";".join(record.get("metadata_removed", ())),
    "gps": json.dumps(gps) if gps else None,
  }


@dataclasses.dataclass
class RedactSettings:
  method: str = "blur"
  target_score: float | None = None  # Absolute target; None: target_drop, else the safe score.
  target_drop: float | None = None  # Fraction of each photo's own score to remove.
  max_area: float = redaction.DEFAULT_MAX_AREA
  keep_metadata: bool = False

  def check(self) -> None:
    if self.method not in redaction.METHODS:
      raise predictor_lib.PredictError(
        f"--method must be one of {redaction.METHODS}, got {self.method!r}"
      )
    if self.target_score is not None and self.target_drop is not None:
      raise predictor_lib.PredictError("give --target_score or --target_drop, not both")
    if self.target_score is not None and not np.isfinite(self.target_score):
      raise predictor_lib.PredictError(
        f"--target_score must be a finite number, got {self.target_score}"
      )
    if self.target_drop is not None and not 0 < self.target_drop <= 1:
      raise predictor_lib.PredictError(
        f"--target_drop is a fraction in (0, 1], got {self.target_drop}"
      )
    if not 0 < self.max_area <= 1:
      raise predictor_lib.PredictError(f"--max_area is a fraction in (0, 1], got {self.max_area}")

  def targets(self, before: np.ndarray, info: dict) -> np.ndarray:
    if self.target_score is not None:
      return np.full(len(before), float(self.target_score))
    if self.target_drop is not None:
      return before * (1.0 - self.target_drop)
    return np.full(len(before), redaction.safe_score(info))


def _finish(
  photo: photos.Photo, mask: np.ndarray, settings: RedactSettings
) -> tuple[bytes, str, list, float, Image.Image, int]:
  """Full-size output of one photo; an animation's frames all get the first frame's mask.

  Returns (file bytes, format, region boxes, redacted area, pixels of the first frame, frames
  written).
  """
  if not mask.any():
    data = photos.unchanged_copy(photo, keep_metadata=settings.keep_metadata)
    if data is not None:
      written = photo.frames if data is photo.data else 1
      return data, photos.WRITE_FORMATS[photo.format], [], 0.0, photo.pixels, written
  pixels, boxes, area = photo.pixels, [], 0.0
  if mask.any():  # The photo is not used again: redacted in place.
    pixels, boxes = redaction.redact(photo.pixels, mask, settings.method, copy=False)
    area = float(mask.mean())  # As scored (the full-size mask is the same, upsampled).
  animation = None
  if photo.frames > 1 and photo.format in animations.FORMATS:
    frames, timing = animations.frames(
      photo.data, photo.frames, photo.orientation, photo.pixels.mode, photo.alpha is not None
    )
    frames = frames[1:]  # The first is `pixels`.
    if mask.any():
      frames = [
        (redaction.redact(frame, mask, settings.method, copy=False)[0], a) for frame, a in frames
      ]
    animation = (frames, timing)
  data, fmt = photos.encode_photo(
    photo, pixels, keep_metadata=settings.keep_metadata, animation=animation
  )
  return data, fmt, boxes, area, pixels, 1 if animation is None else 1 + len(animation[0])


def _write_outputs(
  photo: photos.Photo,
  mask: np.ndarray,
  record: dict,
  settings: RedactSettings,
  output_dir: pathlib.Path,
  source: pathlib.Path,
  panel: bool,
  inputs: frozenset[pathlib.Path] = frozenset(),
) -> dict:
  """Writes the photo (and its panel), never onto one of the run's `inputs`; returns output fields.

  The fields are the record's: output, format, area, regions, frames written, panel.
  """
  data, fmt, boxes, area, pixels, frames_written = _finish(photo, mask, settings)
  suffix = (
    source.suffix
    if photos.WRITE_FORMATS.get(photo.format) == fmt and source.suffix
    else photos.SUFFIXES[fmt]
  )
  out_path = output_folders.claim(
    output_dir / f"{record['name']}{suffix}", inputs | {output_folders.resolved(source)}
  )
  out_path.write_bytes(data)
  fields = {
    "output": out_path.name,
    "format": fmt,
    "area": area,
    "regions": [list(b) for b in boxes],
    "frames_written": frames_written,
  }
  if panel:
    panel_path = output_folders.claim(
      output_dir / "panels" / f"{record['name']}_redact.png", inputs
    )
    before_after_panel(
      photo.loaded.display,
      pixels,
      boxes,
      photo.pixels.size,
      score_before=record["score_before"],
      score_after=record["score_after"],
      area=area,
      title=source.name,
    ).save(panel_path)
    fields["panel"] = str(panel_path.relative_to(output_dir))
  return fields


@dataclasses.dataclass
class RedactResult:
  num_images: int
  num_failed: int
  records: list[dict]
  output_dir: pathlib.Path


def redact_photos(
  predictor: predictor_lib.Predictor,
  images: Sequence[str],
  output_dir,
  settings: RedactSettings,
  *,
  profile: int | None = None,
  preferences_file: str | None = None,
  panels: bool = True,
  max_pixels: int | None = None,
  panel_size: int = heatmaps.PANEL_SIZE,
  loader_processes: int = 0,
  progress: bool = True,
) -> RedactResult:
  """Redacts every photo; writes OUT/<name>, redaction.jsonl, redaction.csv, panels/.

  The panels are panels/<name>_redact.png. Files are collected, read and reported as predict does
  (`predict.predict`'s arguments of the same names); `profile` / `preferences_file` redact for
  that user's score instead of the model's.
  """
  settings.check()
  info = predictor.info
  user = user_scores.resolve_user(info, profile, preferences_file)
  score = redaction.scorer(predictor, user)
  output_dir = pathlib.Path(output_dir)
  predict.check_output_dir(output_dir)
  output_folders.check(output_dir, [*images, *([preferences_file] if preferences_file else [])])
  entries = predict.collect_images(images, output_dir)
  if not entries:
    raise predictor_lib.PredictError("no images given")
  inputs = output_folders.input_paths(entries, [preferences_file])
  output_dir.mkdir(parents=True, exist_ok=True)
  if panels:
    (output_dir / "panels").mkdir(exist_ok=True)
  max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
  names = predict.unique_names([path for path, _ in entries])
  load = functools.partial(
    photos.load_photo,
    image_size=info["image_size"],
    max_side=info["max_side"],
    max_pixels=max_pixels,
    panel_size=panel_size,
  )
  grid_shape = tuple(info["grid_shape"])

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  records = []
  with (
    open(output_folders.claim(output_dir / "redaction.jsonl", inputs), "w") as jsonl_file,
    open(output_folders.claim(output_dir / "redaction.csv", inputs), "w", newline="") as csv_file,
    concurrent.futures.ThreadPoolExecutor(predict.READ_THREADS) as pool,
    predict.loader_pool(loader_processes) or contextlib.nullcontext(pool) as loader,
    tqdm(total=len(entries), unit="img", disable=not progress, desc="redact") as bar,
  ):
    writer = csv.writer(csv_file)
    writer.writerow(CSV_HEADER)
    # predict's reading machinery (threads or processes, batches read ahead, error text), shared.
    for chunk in predict.loaded_chunks(entries, names, load, predictor.batch_size, loader):
      good = [(path, name, photo) for path, name, photo in chunk if isinstance(photo, photos.Photo)]
      outcome = None
      if good:
        pixels = np.stack(
          [redaction.model_pixels(photo.loaded.model_input) for _, _, photo in good]
        )
        outcome = redaction.greedy_redactions(
          score,
          pixels,
          lambda before: settings.targets(before, info),
          grid_shape,
          method=settings.method,
          max_area=settings.max_area,
          min_drop=redaction.MIN_DROP * redaction.score_scale(info),
        )
        targets = outcome.targets
      writes = collections.deque()
      index = 0
      for path, name, photo in chunk:
        record: dict = {"path": str(path), "name": name}
        if isinstance(photo, photos.Photo):
          record.update(
            ok=True,
            method=settings.method,
            width=photo.pixels.width,
            height=photo.pixels.height,
            score_before=float(outcome.before[index]),
            score_after=float(outcome.after[index]),
            target=float(targets[index]),
            target_reached=bool(outcome.after[index] <= targets[index]),
            rounds=int(outcome.rounds[index]),
            metadata_found=photo.metadata,
            metadata_removed=[] if settings.keep_metadata else sorted(photo.metadata),
            conversions=photo.loaded.conversions,
            frames=photo.frames,
          )
          if user is not None:
            record["user"] = user.label
          writes.append(
            (
              record,
              pool.submit(
                _write_outputs,
                photo,
                outcome.masks[index],
                record,
                settings,
                output_dir,
                path,
                panels,
                inputs,
              ),
            )
          )
          index += 1
        else:
          record.update(ok=False, error=photo)
          writes.append((record, None))
      for record, write in writes:
        if write is not None:
          try:
            record.update(write.result())
          except Exception as e:  # pylint: disable=broad-except  # This photo's alone.
            for key in list(record):
              if key not in ("path", "name"):
                del record[key]
            record.update(ok=False, error=predict.error_text(e))
        records.append(record)
        jsonl_file.write(json.dumps(record) + "\n")
        writer.writerow(predict.csv_row(record, CSV_HEADER, _csv_columns(record)))
        bar.update(1)
      jsonl_file.flush()
      csv_file.flush()
  failed = sum(not record["ok"] for record in records)
  logging.info("Redacted %d images (%d failed) into %s", len(records), failed, output_dir)
  return RedactResult(len(records), failed, records, output_dir)
