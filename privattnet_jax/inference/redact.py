"""Protect a photo, not only score it: attention-guided redaction and metadata stripping.

`redact` takes the photos predict takes and writes each one again with the regions the model's
attention points at blurred (or pixelated, or filled), and without its metadata:

* Regions. The attention maps of all steps are averaged, upsampled bilinearly to the image and
  thresholded: a mask holds the most attended pixels up to an area. Its connected components are
  the reported regions (pixel boxes); the redaction covers the mask itself, not the boxes.
* Greedy rounds. Each round proposes `CANDIDATES` masks that grow the current one by 1..K times
  `AREA_STEP` of the image, following the attention of the photo as redacted so far (once an object
  is blurred, attention moves to the next one). All candidates of all photos of a batch are scored
  in the same batched model calls; each photo keeps its smallest candidate at or below the target,
  else its lowest-scoring one. Rounds stop at the target, at `max_area`, or when no candidate
  lowers the score by more than `MIN_DROP` of the score's scale (so the output never scores above
  the input, and a photo the model finds safe is not blurred for noise-level gains).
* Resolution. Scoring happens at the model's resolution, on the model input itself (the photo as
  predict feeds it, stretched to S x S), so a round costs a few model rows and no decoding. Only the
  final mask is upsampled to the photo's full (EXIF-oriented) resolution, where each region's box
  alone is blurred. Blur sigma and pixel-block sizes are fractions of the image's width and height,
  so the S x S redaction the model scored is the full-size one seen at S x S.
* Metadata. EXIF (with the GPS position, device, owner and timestamps listed in the row), XMP,
  IPTC, ICC profiles (pixels converted to sRGB first) and text comments are found and not written
  again: every output is encoded afresh from its pixels (JPEG quality `JPEG_QUALITY`, the source's
  chroma subsampling), except that a JPEG that needs no change at all (safe, upright, sRGB) is
  copied byte for byte with its metadata segments cut out. `keep_metadata` writes EXIF (orientation
  reset, since the pixels are upright), XMP and the ICC profile back.

`redaction_quality` (the evaluation's and the benchmark's) compares, at equal area, the risk drop of
the greedy attention masks with random masks (random grid saliency, same thresholding) and a
centred box, and measures how much of the ground-truth box area the attention masks cover.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import io
import json
import pathlib
from collections.abc import Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFilter, ImageOps, IptcImagePlugin, JpegImagePlugin
from scipy import ndimage

from privattnet_jax.data import attributes
from privattnet_jax.inference import animations
from privattnet_jax.inference import heatmaps
from privattnet_jax.inference import output_folders
from privattnet_jax.inference import predict
from privattnet_jax import safe_files
from privattnet_jax.inference import preprocessing
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.inference import user_scores

METHODS = ("blur", "pixelate", "fill")
DEFAULT_MAX_AREA = 0.25
AREA_STEP = 0.025  # Area a candidate adds per step, as a fraction of the image.
CANDIDATES = 4  # Candidates per photo and round: the mask grown by 1..CANDIDATES area steps.
MIN_DROP = (
  0.01  # A round must lower the score by more than this share of the score's scale, or rounds stop.
)
BLUR_FRACTION = 0.04  # Gaussian sigma, as a fraction of the image's width (x) and height (y).
BLUR_DETAIL = 4  # Pixels per sigma a wide blur is computed at (see _redacted_crop).
PIXEL_FRACTION = 0.04  # Pixelation block size, likewise.
FILL_COLOUR = (0, 0, 0)
JPEG_QUALITY = 95  # Re-encoding costs some quality; 95 keeps it close to the source's.
# Output format per source format (Pillow names); anything else is written as PNG.
WRITE_FORMATS = {
  "JPEG": "JPEG",
  "MPO": "JPEG",
  "PNG": "PNG",
  "WEBP": "WEBP",
  "TIFF": "TIFF",
  "BMP": "BMP",
  "GIF": "GIF",
}
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")  # Formats whose transparency the output keeps.
SUFFIXES = {
  "JPEG": ".jpg",
  "PNG": ".png",
  "WEBP": ".webp",
  "TIFF": ".tiff",
  "BMP": ".bmp",
  "GIF": ".gif",
}

# EXIF tags (Pillow's ExifTags numbers), by what they give away.
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DEVICE_TAGS = {
  0x010F: "make",
  0x0110: "model",
  0x0131: "software",
  0xA431: "body_serial_number",
  0xA434: "lens_model",
  0xA435: "lens_serial_number",
}
_OWNER_TAGS = {
  0x013B: "artist",
  0x8298: "copyright",
  0xA430: "camera_owner_name",
  0x9C9D: "xp_author",
}
_TIME_TAGS = {0x0132: "date_time", 0x9003: "date_time_original", 0x9004: "date_time_digitized"}
_ORIENTATION = 0x0112
# TIFF baseline tags that describe the image data itself (size, samples, compression, strips, tiles,
# resolution, predictor, colour map...): a TIFF always has some, and they say nothing of its owner.
_TIFF_STRUCTURE = frozenset(
  {
    0x00FE,
    0x00FF,
    0x0100,
    0x0101,
    0x0102,
    0x0103,
    0x0106,
    0x0107,
    0x0108,
    0x0109,
    0x010A,
    0x0111,
    0x0112,
    0x0115,
    0x0116,
    0x0117,
    0x0118,
    0x0119,
    0x011A,
    0x011B,
    0x011C,
    0x0128,
    0x013D,
    0x0140,
    0x0142,
    0x0143,
    0x0144,
    0x0145,
    0x0152,
    0x0153,
    0x0154,
    0x0155,
  }
)
# JPEG markers a byte-for-byte copy keeps: APP0 (JFIF) and APP14 (Adobe: the colour transform).
_JPEG_KEPT_APP = (0xE0, 0xEE)


# ----------------------------------------------------------------------------
# Masks and regions (pure numpy / Pillow).


def attention_saliency(attention, grid_shape, size: tuple[int, int]) -> np.ndarray:
  """(T, L) attention -> float32 (height, width): the steps' mean map, bilinearly upsampled."""
  attention = np.asarray(attention, np.float32)
  grid = attention.reshape(attention.shape[0], *grid_shape).mean(axis=0)
  return np.asarray(Image.fromarray(grid, mode="F").resize(size, Image.Resampling.BILINEAR))


def grow_mask(mask: np.ndarray, saliency: np.ndarray, area: float) -> np.ndarray:
  """`mask` plus the most salient pixels outside it, up to `area` (a fraction) of the image."""
  total = mask.size
  wanted = min(int(round(area * total)), total) - int(np.count_nonzero(mask))
  if wanted <= 0:
    return mask.copy()
  outside = np.flatnonzero(~mask.reshape(-1))
  values = saliency.reshape(-1)[outside]
  if wanted < len(outside):
    chosen = outside[np.argpartition(-values, wanted - 1)[:wanted]]
  else:
    chosen = outside
  grown = mask.copy().reshape(-1)
  grown[chosen] = True
  return grown.reshape(mask.shape)


def centred_box_mask(shape: tuple[int, int], area: float) -> np.ndarray:
  """A box of `area` of the image, centred, with the image's aspect ratio."""
  height, width = shape
  side = np.sqrt(max(area, 0.0))
  h, w = min(height, int(round(side * height))), min(width, int(round(side * width)))
  mask = np.zeros(shape, bool)
  top, left = (height - h) // 2, (width - w) // 2
  mask[top : top + h, left : left + w] = True
  return mask


def mask_regions(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
  """Boxes (x0, y0, x1, y1), end exclusive, of the mask's 8-connected components."""
  labelled, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
  return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labelled)]


def scale_boxes(
  boxes, from_size: tuple[int, int], to_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
  """Boxes from one image size (width, height) to another, rounded outward."""
  sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
  return [
    (
      int(np.floor(x0 * sx)),
      int(np.floor(y0 * sy)),
      min(to_size[0], int(np.ceil(x1 * sx))),
      min(to_size[1], int(np.ceil(y1 * sy))),
    )
    for x0, y0, x1, y1 in boxes
  ]


def _mask_crop(mask: Image.Image, box, size: tuple[int, int]) -> Image.Image:
  """The part of a mode-L 0/255 mask under `box` of an image of `size`: bilinearly upsampled and
  thresholded at half (a smooth edge at full size), computed for that box alone."""
  width, height = box[2] - box[0], box[3] - box[1]
  if mask.size == tuple(size):
    return mask.crop(box)
  sx, sy = mask.size[0] / size[0], mask.size[1] / size[1]
  source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  return mask.resize((width, height), Image.Resampling.BILINEAR, box=source).point(
    lambda v: 255 if v >= 128 else 0
  )


def _redacted_crop(
  image: Image.Image, box, method: str
) -> tuple[Image.Image, tuple[int, int, int, int]]:
  """The redacted pixels over `box` (x0, y0, x1, y1), from a crop with the context they need."""
  width, height = image.size
  x0, y0, x1, y1 = box
  if method == "fill":
    return Image.new(image.mode, (x1 - x0, y1 - y0), FILL_COLOUR), box
  if method == "blur":
    sigma = (BLUR_FRACTION * width, BLUR_FRACTION * height)
    mx, my = (
      int(np.ceil(3 * sigma[0])),
      int(np.ceil(3 * sigma[1])),
    )  # Real pixels around, not edge copies.
    outer = (max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my))
    crop = image.crop(outer)
    # A wide blur keeps no detail finer than sigma: blur a copy reduced to ~BLUR_DETAIL px per sigma
    # and enlarge it back (a 12 MP photo's blur costs a fraction of the full-size one).
    factor = max(1, int(min(sigma) / BLUR_DETAIL))
    small = crop.reduce(factor) if factor > 1 else crop
    blurred = small.filter(ImageFilter.GaussianBlur((sigma[0] / factor, sigma[1] / factor)))
    if factor > 1:
      blurred = blurred.resize(crop.size, Image.Resampling.BILINEAR)
    return blurred.crop((x0 - outer[0], y0 - outer[1], x1 - outer[0], y1 - outer[1])), box
  if method == "pixelate":  # Blocks on one grid over the whole image, whatever the box.
    bw, bh = max(1.0, PIXEL_FRACTION * width), max(1.0, PIXEL_FRACTION * height)
    gx0, gy0 = int(np.floor(x0 / bw)), int(np.floor(y0 / bh))
    gx1, gy1 = int(np.ceil(x1 / bw)), int(np.ceil(y1 / bh))
    outer = (
      int(round(gx0 * bw)),
      int(round(gy0 * bh)),
      min(width, int(round(gx1 * bw))),
      min(height, int(round(gy1 * bh))),
    )
    crop = image.crop(outer)
    blocks = crop.resize((gx1 - gx0, gy1 - gy0), Image.Resampling.BOX)
    return blocks.resize(crop.size, Image.Resampling.NEAREST), outer
  raise ValueError(f"redaction method must be one of {METHODS}, got {method!r}")


def redact(
  image: Image.Image, mask: np.ndarray, method: str = "blur", *, copy: bool = True
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
  """`image` with the pixels under a boolean mask (any resolution: it is upsampled) redacted.

  Works box by box over the mask's regions: a 12 MP photo with a small region costs a small blur.
  Returns the image (a new one unless `copy` is False) and the regions' boxes in its pixels.
  """
  boxes = scale_boxes(mask_regions(mask), mask.shape[::-1], image.size)
  small = Image.fromarray(mask.astype(np.uint8) * 255)
  out = image.copy() if copy else image
  for box in boxes:
    pixels, where = _redacted_crop(out, box, method)
    out.paste(pixels, where[:2], _mask_crop(small, where, image.size))
  return out, boxes


def redact_array(image: np.ndarray, mask: np.ndarray, method: str = "blur") -> np.ndarray:
  """uint8 (H, W, 3) and boolean (H, W) -> the redacted uint8 image (the model-resolution path)."""
  if not mask.any():
    return image
  return np.asarray(redact(Image.fromarray(image), mask, method, copy=False)[0])


def model_pixels(model_input: np.ndarray) -> np.ndarray:
  """The eval transform's float input back to the uint8 image it normalised (exactly)."""
  pixels = (model_input * preprocessing.IMAGENET_STD + preprocessing.IMAGENET_MEAN) * 255.0
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Scoring and the greedy rounds.


Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def scorer(predictor: predictor_lib.Predictor, user: user_scores.UserScore | None = None) -> Scorer:
  """float32 model inputs (N, S, S, 3) -> ((N,) scores, (N, T, L) attention), in predictor batches.

  The score is the model's (the mean over profiles for a per-profile model), or `user`'s.
  """
  if "attention" not in predictor.info["outputs"]:
    raise predictor_lib.PredictError(
      f"{predictor.info['model']} has no attention: redaction needs an attention model "
      "(privattnet, privattnet_mlc)"
    )

  def score(images):
    scores, maps = [], []
    for start in range(0, len(images), predictor.batch_size):
      outputs = predictor(images[start : start + predictor.batch_size])
      scores.append(
        user(outputs)[0] if user is not None else np.asarray(outputs["score"]).mean(axis=1)
      )
      maps.append(outputs["attention"])
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)

  return score


def score_scale(info: dict) -> float:
  """The largest score the checkpoint's target gives (its largest preference): what MIN_DROP scales."""
  return float(np.max(np.abs(np.asarray(info["preferences"], np.float64))))


def safe_score(info: dict) -> float:
  """The score the checkpoint's target gives an image labelled safe (`a0_safe` alone)."""
  labels = attributes.multi_hot([attributes.SAFE_ATTRIBUTE])[None]
  preferences = np.asarray(info["preferences"], np.float64)
  return float(attributes.privacy_score(labels, preferences, info["score"]["pooling"]).mean())


@dataclasses.dataclass
class Redactions:
  """The greedy rounds' outcome for N images at model resolution."""

  masks: np.ndarray  # bool (N, S, S)
  before: np.ndarray  # (N,) scores of the untouched images
  after: np.ndarray  # (N,) scores of the redacted images
  attention: np.ndarray  # (N, T, L) of the untouched images
  rounds: np.ndarray  # (N,) int
  targets: np.ndarray  # (N,) the scores to reach

  @property
  def areas(self) -> np.ndarray:
    return self.masks.reshape(len(self.masks), -1).mean(axis=1)


def greedy_redactions(
  score: Scorer,
  images: np.ndarray,
  targets: Callable[[np.ndarray], np.ndarray],
  grid_shape,
  *,
  method: str = "blur",
  max_area: float = DEFAULT_MAX_AREA,
  area_step: float = AREA_STEP,
  candidates: int = CANDIDATES,
  min_drop: float = 0.0,
) -> Redactions:
  """Greedy attention-guided masks for uint8 model-resolution images (N, S, S, 3).

  Round by round, every image still above its target gets `candidates` masks grown along the
  attention of its current redaction; they are all scored together (one batched call a round).
  `targets` maps the images' own scores to the scores to reach; a round that lowers an image's
  score by `min_drop` or less ends its rounds.
  """
  images = np.asarray(images, np.uint8)
  count, size = len(images), images.shape[1:3]
  before, attention = score(normalise_images(images))
  targets = np.broadcast_to(np.asarray(targets(before), np.float64), (count,))
  after, current = before.copy(), attention.copy()
  masks = np.zeros((count, *size), bool)
  rounds = np.zeros(count, np.int64)
  active = (before > targets) & (max_area > 0)
  while active.any():
    proposals = []  # (image index, mask)
    for i in np.flatnonzero(active):
      saliency = attention_saliency(current[i], grid_shape, size[::-1])
      area = masks[i].mean()
      previous = masks[i]
      for k in range(1, candidates + 1):
        grown = grow_mask(masks[i], saliency, min(area + k * area_step, max_area))
        if grown.sum() > previous.sum():
          proposals.append((i, grown))
          previous = grown
    if not proposals:
      break
    redacted = np.stack([redact_array(images[i], mask, method) for i, mask in proposals])
    scores, maps = score(normalise_images(redacted))
    chosen: dict[int, int] = {}
    for j, (i, mask) in enumerate(proposals):
      best = chosen.get(i)
      if best is None:
        chosen[i] = j
        continue
      reached, best_reached = scores[j] <= targets[i], scores[best] <= targets[i]
      if best_reached:
        continue  # Candidates come smallest first: keep the smallest that reaches the target.
      if reached or scores[j] < scores[best]:
        chosen[i] = j
    active[:] = False
    for i, j in chosen.items():
      if after[i] - scores[j] <= min_drop:
        continue  # No candidate lowers the risk (by more than noise): stop.
      masks[i], after[i], current[i] = proposals[j][1], scores[j], maps[j]
      rounds[i] += 1
      active[i] = after[i] > targets[i] and masks[i].mean() < max_area - 0.5 / masks[i].size
  return Redactions(masks, before, after, attention, rounds, targets)


def normalise_images(images: np.ndarray) -> np.ndarray:
  """uint8 (N, S, S, 3) -> the model's float input, as the eval transform normalises."""
  return np.stack([preprocessing.normalize(image) for image in images])


# ----------------------------------------------------------------------------
# Metadata.


def _rational(value) -> float:
  return float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)


def _gps_position(gps) -> dict:
  """Latitude / longitude (degrees, signed) and altitude (m) of a GPS IFD, where present."""
  position = {}
  for key, ref_tag, tag, negative in (("latitude", 1, 2, "S"), ("longitude", 3, 4, "W")):
    if tag in gps:
      try:
        degrees, minutes, seconds = (_rational(v) for v in gps[tag])
        value = degrees + minutes / 60 + seconds / 3600
        ref = gps.get(ref_tag, "")
        ref = ref.decode("ascii", "replace") if isinstance(ref, bytes) else str(ref)
        position[key] = round(-value if ref.strip().upper() == negative else value, 7)
      except (TypeError, ValueError, ZeroDivisionError):
        position[key] = "unreadable"
  if 6 in gps:
    try:
      position["altitude"] = round(_rational(gps[6]) * (-1 if gps.get(5) in (1, b"\x01") else 1), 2)
    except (TypeError, ValueError, ZeroDivisionError):
      position["altitude"] = "unreadable"
  return position


def _text(value) -> str:
  if isinstance(value, bytes):
    value = value.decode("utf-16-le" if value[1:2] == b"\x00" else "utf-8", "replace")
  return str(value).strip("\x00 ").strip()


def find_metadata(image: Image.Image) -> dict:
  """What an opened image carries beside its pixels: {kind: details}, empty for a clean file.

  Kinds: gps (the position), device (make, model, serial numbers, software), owner (artist,
  copyright, owner name), timestamps, exif (tag count), xmp, iptc, icc_profile, comment, text.
  """
  found: dict = {}
  try:
    exif = image.getexif()
  except Exception:  # pylint: disable=broad-except  # A broken EXIF block is still EXIF.
    exif, found["exif"] = None, {"tags": "unreadable"}
  if exif:
    # A TIFF's own image tags (size, compression, strips) come back as EXIF too: not metadata.
    tags = [tag for tag in exif if image.format != "TIFF" or tag not in _TIFF_STRUCTURE]
    if tags:
      found["exif"] = {"tags": len(tags)}
    ifds = {0: exif}
    for ifd in (_EXIF_IFD, _GPS_IFD):
      try:
        ifds[ifd] = exif.get_ifd(ifd)
      except Exception:  # pylint: disable=broad-except
        ifds[ifd] = {}
    merged = {**ifds[_EXIF_IFD], **exif}
    if ifds[_GPS_IFD]:
      found["gps"] = _gps_position(ifds[_GPS_IFD]) or {"tags": len(ifds[_GPS_IFD])}
    for kind, tags in (
      ("device", _DEVICE_TAGS),
      ("owner", _OWNER_TAGS),
      ("timestamps", _TIME_TAGS),
    ):
      values = {
        name: _text(merged[tag])
        for tag, name in tags.items()
        if tag in merged and _text(merged[tag])
      }
      if values:
        found[kind] = values
  info = image.info
  xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
  if xmp:
    found["xmp"] = {"bytes": len(xmp)}
  try:
    iptc = IptcImagePlugin.getiptcinfo(image)
  except Exception:  # pylint: disable=broad-except
    iptc = {"unreadable": True}
  if iptc:
    found["iptc"] = {"fields": len(iptc)}
  if info.get("icc_profile"):
    found["icc_profile"] = {"bytes": len(info["icc_profile"])}
  if (
    image.format == "MPO" and preprocessing.frame_count(image) > 1
  ):  # A depth map, gain map, 2nd view.
    found["extra_images"] = {"count": preprocessing.frame_count(image) - 1}
  if info.get("comment"):
    found["comment"] = _text(info["comment"])[:200]
  text = getattr(image, "text", None) if image.format == "PNG" else None
  if text:
    found["text"] = sorted(text)
  return found


def strip_jpeg_metadata(data: bytes) -> bytes:
  """A JPEG's bytes without its APP1..APP15 (EXIF, XMP, ICC, IPTC...) and COM segments.

  The entropy-coded image is copied as is (no re-encoding); APP0 (JFIF) and APP14 (Adobe, which
  says how to read the colours) stay. Raises ValueError on a malformed segment list.
  """
  if data[:2] != b"\xff\xd8":
    raise ValueError("not a JPEG")
  out, position = bytearray(data[:2]), 2
  while position + 4 <= len(data):
    if data[position] != 0xFF:
      raise ValueError("malformed JPEG segment list")
    marker = data[position + 1]
    if marker == 0xFF:  # Fill byte.
      position += 1
      continue
    length = int.from_bytes(data[position + 2 : position + 4], "big")
    end = position + 2 + length
    if marker == 0xDA:  # Start of scan: the rest is image data.
      out += data[position:]
      return bytes(out)
    if end > len(data) or length < 2:
      raise ValueError("truncated JPEG segment")
    if not ((0xE1 <= marker <= 0xEF and marker not in _JPEG_KEPT_APP) or marker == 0xFE):
      out += data[position:end]
    position = end
  raise ValueError("JPEG without image data")


# ----------------------------------------------------------------------------
# Photos at full resolution.


@dataclasses.dataclass
class Photo:
  """A photo as redact needs it: predict's model input and the full-size, upright pixels."""

  loaded: predict.LoadedImage
  data: bytes  # The file's bytes (for a byte-for-byte JPEG copy).
  pixels: Image.Image  # RGB or L, EXIF orientation applied, full resolution.
  alpha: Image.Image | None  # Its transparency (formats in ALPHA_FORMATS).
  format: str  # The source's Pillow format.
  orientation: int
  metadata: dict  # find_metadata
  exif: bytes | None  # For keep_metadata (orientation reset).
  xmp: bytes | None
  icc_profile: bytes | None
  frames: int = 1  # Of an animation, or of an MPO (whose extra images are metadata).


def load_photo(
  path, *, image_size: int, max_side: int, max_pixels: int | None, panel_size: int
) -> Photo:
  """predict.load_image (same checks, errors and model input), then the full-size pixels, from
  one read of the file.

  Raises `too_large` when the full size exceeds `max_pixels` (the output keeps the full size, so
  no reduced decode is possible here).
  """
  data = safe_files.read_bytes(path, max_bytes=safe_files.MAX_IMAGE_BYTES)  # Read once.
  loaded = predict.decode_image(
    data, image_size=image_size, max_side=max_side, max_pixels=max_pixels, panel_size=panel_size
  )
  if max_pixels is not None and loaded.width * loaded.height > max_pixels:
    raise ValueError(
      f"too_large: {loaded.width}x{loaded.height} pixels > max_pixels {max_pixels}, and redact "
      "writes the full size"
    )
  with preprocessing.pil_checks_ours():  # Our size check above replaces PIL's.
    image = Image.open(io.BytesIO(data))
    image.load()
  metadata = find_metadata(image)
  source_format = image.format or "PNG"
  frames = preprocessing.frame_count(image)
  if frames > 1 and source_format != "MPO":
    animations.check(source_format, frames, image.size, max_pixels)
  try:
    exif = image.getexif()
    orientation = int(exif.get(_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    exif, orientation = None, 1
  icc_profile, xmp = image.info.get("icc_profile"), image.info.get("xmp")
  if orientation in range(2, 9):
    image = ImageOps.exif_transpose(image)  # Also drops the orientation tag from the copy's EXIF.
  exif_bytes = None
  if exif:
    with contextlib.suppress(Exception):
      exif_bytes = image.getexif().tobytes()
  alpha = None
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    alpha = image.convert("RGBA").getchannel("A")
  grayscale = image.mode in ("L", "LA", "1")
  pixels = preprocessing.to_rgb(image, [])  # The builder's conversion.
  if grayscale:
    pixels = pixels.convert("L")
  if (
    pixels.info
  ):  # Pillow's writers fall back on a source's info (comment, ICC profile): start clean.
    pixels = pixels.copy()
    pixels.info = {}
  return Photo(
    loaded,
    data,
    pixels,
    alpha,
    source_format,
    orientation,
    metadata,
    exif_bytes,
    xmp if isinstance(xmp, (bytes, str)) else None,
    icc_profile,
    frames,
  )


def _srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
  """Pixels in the profile's colour space -> sRGB, so that dropping the profile keeps the colours."""
  try:
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    return ImageCms.profileToProfile(
      image, source, ImageCms.createProfile("sRGB"), outputMode=image.mode
    )
  except Exception:  # pylint: disable=broad-except  # An unusable profile: the pixels as they are.
    return image


def encode_photo(
  photo: Photo, pixels: Image.Image, *, keep_metadata: bool, animation=None
) -> tuple[bytes, str]:
  """The output file's bytes and format: the source's format where Pillow writes it, else PNG.

  `animation`: the frames after the first ((pixels, alpha) each) and the save options of their
  timing (`animations.frames`), written after `pixels` as one animated file.
  """
  fmt = WRITE_FORMATS.get(photo.format, "PNG")

  def prepared(pixels: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if pixels.info:
      pixels = pixels.copy()
      pixels.info = {}
    if not keep_metadata and photo.icc_profile:
      pixels = _srgb(pixels, photo.icc_profile)
    if alpha is not None and fmt in ALPHA_FORMATS:
      pixels = pixels.convert("RGBA" if pixels.mode == "RGB" else "LA")
      pixels.putalpha(alpha)
    return pixels

  pixels = prepared(pixels, photo.alpha)
  options: dict = {}
  if fmt == "JPEG":
    options = {"quality": JPEG_QUALITY}
    with contextlib.suppress(Exception):
      options["subsampling"] = JpegImagePlugin.get_sampling(Image.open(io.BytesIO(photo.data)))
    if options.get("subsampling", 0) < 0:
      del options["subsampling"]
  elif fmt == "WEBP":
    options = {"quality": JPEG_QUALITY}
  elif fmt == "TIFF":
    options = {"compression": "tiff_deflate"}
  if keep_metadata:
    if photo.exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
      options["exif"] = photo.exif
    if photo.icc_profile and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
      options["icc_profile"] = photo.icc_profile
    if photo.xmp and fmt in ("JPEG", "PNG", "WEBP"):
      options["xmp"] = photo.xmp.encode() if isinstance(photo.xmp, str) else photo.xmp
  if animation is not None:
    frames, timing = animation
    options.update(save_all=True, append_images=[prepared(*frame) for frame in frames], **timing)
  buffer = io.BytesIO()
  pixels.save(buffer, format=fmt, **options)
  return buffer.getvalue(), fmt


def unchanged_copy(photo: Photo, *, keep_metadata: bool) -> bytes | None:
  """The source's own bytes for a photo redact leaves alone, where no decoding is needed: with its
  metadata when kept, or a JPEG cut of its metadata segments when upright and without a colour
  profile. None: encode it afresh."""
  if keep_metadata and photo.orientation == 1 and photo.format in WRITE_FORMATS:
    return photo.data
  if photo.format == "JPEG" and photo.orientation == 1 and not photo.icc_profile:
    with contextlib.suppress(ValueError):
      return strip_jpeg_metadata(photo.data)
  return None


# ----------------------------------------------------------------------------
# Panels and rows.


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
  for box in scale_boxes(boxes, size, before_tile.size):
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


def _csv_row(record: dict) -> list:
  row = {"status": "ok" if record["ok"] else "error", **record}
  row["regions"] = ";".join(" ".join(map(str, box)) for box in record.get("regions", ()))
  row["metadata_found"] = ";".join(record.get("metadata_found", {}))
  row["metadata_removed"] = ";".join(record.get("metadata_removed", ()))
  gps = record.get("metadata_found", {}).get("gps")
  row["gps"] = json.dumps(gps) if gps else None
  row["conversions"] = ";".join(record.get("conversions", ()))
  return ["" if row.get(key) is None else row[key] for key in CSV_HEADER]


# ----------------------------------------------------------------------------
# The redact loop.


@dataclasses.dataclass
class RedactSettings:
  method: str = "blur"
  target_score: float | None = None  # Absolute target; None: target_drop, else the safe score.
  target_drop: float | None = None  # Fraction of each photo's own score to remove.
  max_area: float = DEFAULT_MAX_AREA
  keep_metadata: bool = False

  def check(self) -> None:
    if self.method not in METHODS:
      raise predictor_lib.PredictError(f"--method must be one of {METHODS}, got {self.method!r}")
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
    return np.full(len(before), safe_score(info))


def _finish(
  photo: Photo, mask: np.ndarray, settings: RedactSettings
) -> tuple[bytes, str, list, float, Image.Image, int]:
  """Full-size output of one photo: (file bytes, format, region boxes, redacted area, pixels of
  the first frame, frames written). An animation's frames all get the first frame's mask."""
  if not mask.any():
    data = unchanged_copy(photo, keep_metadata=settings.keep_metadata)
    if data is not None:
      written = photo.frames if data is photo.data else 1
      return data, WRITE_FORMATS[photo.format], [], 0.0, photo.pixels, written
  pixels, boxes, area = photo.pixels, [], 0.0
  if mask.any():  # The photo is not used again: redacted in place.
    pixels, boxes = redact(photo.pixels, mask, settings.method, copy=False)
    area = float(mask.mean())  # As scored (the full-size mask is the same, upsampled).
  animation = None
  if photo.frames > 1 and photo.format in animations.FORMATS:
    frames, timing = animations.frames(
      photo.data, photo.frames, photo.orientation, photo.pixels.mode, photo.alpha is not None
    )
    frames = frames[1:]  # The first is `pixels`.
    if mask.any():
      frames = [(redact(frame, mask, settings.method, copy=False)[0], a) for frame, a in frames]
    animation = (frames, timing)
  data, fmt = encode_photo(photo, pixels, keep_metadata=settings.keep_metadata, animation=animation)
  return data, fmt, boxes, area, pixels, 1 if animation is None else 1 + len(animation[0])


def _write_outputs(
  photo: Photo,
  mask: np.ndarray,
  record: dict,
  settings: RedactSettings,
  output_dir: pathlib.Path,
  source: pathlib.Path,
  panel: bool,
  inputs: frozenset[pathlib.Path] = frozenset(),
) -> dict:
  """Writes the photo (and its panel), never onto one of the run's `inputs`; returns the record's
  output fields."""
  data, fmt, boxes, area, pixels, frames_written = _finish(photo, mask, settings)
  suffix = (
    source.suffix if WRITE_FORMATS.get(photo.format) == fmt and source.suffix else SUFFIXES[fmt]
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
  """Redacts every photo; writes OUT/<name>, redaction.jsonl, redaction.csv and panels/<name>_redact.png.

  Files are collected, read and reported as predict does (`predict.predict`'s arguments of the same
  names); `profile` / `preferences_file` redact for that user's score instead of the model's.
  """
  settings.check()
  info = predictor.info
  user = user_scores.resolve_user(info, profile, preferences_file)
  score = scorer(predictor, user)
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
    load_photo,
    image_size=info["image_size"],
    max_side=info["max_side"],
    max_pixels=max_pixels,
    panel_size=panel_size,
  )
  grid_shape = tuple(info["grid_shape"])

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  # predict's reading machinery (threads or processes, batches read ahead, error text), shared.

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
    for chunk in predict.loaded_chunks(entries, names, load, predictor.batch_size, loader):
      good = [(path, name, photo) for path, name, photo in chunk if isinstance(photo, Photo)]
      outcome = None
      if good:
        pixels = np.stack([model_pixels(photo.loaded.model_input) for _, _, photo in good])
        outcome = greedy_redactions(
          score,
          pixels,
          lambda before: settings.targets(before, info),
          grid_shape,
          method=settings.method,
          max_area=settings.max_area,
          min_drop=MIN_DROP * score_scale(info),
        )
        targets = outcome.targets
      writes = collections.deque()
      index = 0
      for path, name, photo in chunk:
        record: dict = {"path": str(path), "name": name}
        if isinstance(photo, Photo):
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
        writer.writerow(_csv_row(record))
        bar.update(1)
      jsonl_file.flush()
      csv_file.flush()
  failed = sum(not record["ok"] for record in records)
  logging.info("Redacted %d images (%d failed) into %s", len(records), failed, output_dir)
  return RedactResult(len(records), failed, records, output_dir)


# ----------------------------------------------------------------------------
# Quality: attention against random regions and a centred box, at equal area.


def _boxes_mask(boxes, count: int, shape: tuple[int, int]) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) boxes -> their union as a boolean mask of `shape`."""
  height, width = shape
  ys, xs = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
  mask = np.zeros(shape, bool)
  for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64)[:count]:
    mask |= ((ys >= ymin) & (ys <= ymax))[:, None] & ((xs >= xmin) & (xs <= xmax))[None, :]
  return mask


def redaction_quality(
  score: Scorer,
  images: np.ndarray,
  boxes,
  num_boxes,
  grid_shape,
  *,
  target_drop: float = 0.5,
  target_score: float | None = None,
  method: str = "blur",
  max_area: float = DEFAULT_MAX_AREA,
  seed: int = 0,
) -> tuple[dict, Redactions]:
  """Risk drops of attention-guided, random and centred masks of the same area, and box coverage.

  images: uint8 (N, S, S, 3) model-resolution images with boxes (risky ones); each image is redacted
  greedily until `target_drop` of its score is gone (or down to `target_score` when given) or
  `max_area` is redacted, then a random mask (random grid
  saliency, thresholded as attention is) and a centred box of the same pixel count are scored.
  `box_coverage`: the share of the boxes' area the attention masks redact (pooled over images).
  Returns the JSON-ready summary and the greedy redactions (for examples).
  """
  images = np.asarray(images, np.uint8)
  rng = np.random.default_rng(seed)

  def targets(before):
    return (
      before * (1.0 - target_drop)
      if target_score is None
      else np.full(len(before), float(target_score))
    )

  greedy = greedy_redactions(score, images, targets, grid_shape, method=method, max_area=max_area)
  before = greedy.before
  size = images.shape[1:3]
  random_masks, centred_masks = [], []
  for mask in greedy.masks:
    area = mask.mean()
    noise = rng.random(grid_shape).astype(np.float32)
    saliency = np.asarray(
      Image.fromarray(noise, mode="F").resize(size[::-1], Image.Resampling.BILINEAR)
    )
    random_masks.append(grow_mask(np.zeros(size, bool), saliency, area))
    centred_masks.append(centred_box_mask(size, area))
  redacted = [
    redact_array(image, mask, method)
    for masks in (random_masks, centred_masks)
    for image, mask in zip(images, masks)
  ]
  scores, _ = score(normalise_images(np.stack(redacted)))
  random_after, centred_after = scores[: len(images)], scores[len(images) :]
  truth = np.stack([_boxes_mask(b, int(n), size) for b, n in zip(boxes, num_boxes)])
  covered = np.count_nonzero(greedy.masks & truth) / max(np.count_nonzero(truth), 1)
  drops = {
    "attention": before - greedy.after,
    "random": before - random_after,
    "centred": before - centred_after,
  }
  mean_drop = {k: float(v.mean()) for k, v in drops.items()}
  summary = {
    "num_images": len(images),
    "method": method,
    "target_drop": target_drop if target_score is None else None,
    "target_score": target_score,
    "max_area": max_area,
    "mean_score_before": float(before.mean()),
    "mean_area": float(greedy.areas.mean()),
    "mean_rounds": float(greedy.rounds.mean()),
    "target_reached": float(np.mean(greedy.after <= greedy.targets)),
    "mean_drop": mean_drop,
    "drop_ratio_random": mean_drop["attention"] / mean_drop["random"]
    if mean_drop["random"] > 0
    else None,
    "drop_ratio_centred": mean_drop["attention"] / mean_drop["centred"]
    if mean_drop["centred"] > 0
    else None,
    "box_coverage": float(covered),
    "box_area": float(truth.mean()),
  }
  return summary, greedy
