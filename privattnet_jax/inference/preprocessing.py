"""Reading one image: any Pillow format to the RGB JPEG the dataset stores, and the eval transform.

The dataset builder normalises every image with `process_image` (format, mode, EXIF orientation,
size limits); training's input pipeline, predict and redact decode and normalise with the same
functions, so a user's photo reaches the model exactly as a dataset image does.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The dataset builder configs: the shorter-side limit of their stored images (0: original size).
BUILDER_MAX_SIDES = {"max256": 256, "original": 0}
IMAGE_PROBLEMS = ("not_an_image", "corrupt_image", "too_large")


class UnusableImage(ValueError):
  """Why an image cannot be used; `reason` is one of IMAGE_PROBLEMS (the build report's codes)."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason = reason
    self.message = message


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)


IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# normalised = pixel * _SCALE - _OFFSET == (pixel / 255 - mean) / std.
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)


_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) RGB -> float32, ImageNet-normalised.

  Works on (H, W * 3) rows against the per-channel constants tiled to a row:
  broadcasting a (3,) vector would make numpy's inner loop 3 elements long
  (docs/benchmarks.md, "Figures behind constants").
  """
  height, width, channels = image.shape
  out = np.ascontiguousarray(image).reshape(height, width * channels).astype(np.float32)
  out *= np.tile(_SCALE, width)
  out -= np.tile(_OFFSET, width)
  return out.reshape(height, width, channels)


def decode_image(data: bytes, min_size: int) -> Image.Image:
  """Decodes encoded image bytes to RGB.

  A JPEG much larger than needed is decoded at a reduced scale (`Image.draft`,
  1/2 .. 1/8) that keeps both sides >= `min_size`, which is far faster and
  loses nothing the later resize to `min_size` would keep.
  """
  image = Image.open(io.BytesIO(data))
  image.draft("RGB", (min_size, min_size))
  if image.mode != "RGB":
    image = image.convert("RGB")
  return image


def preprocess_image(image: Image.Image, image_size: int) -> np.ndarray:
  """The eval transform: a PIL image -> float32 (S, S, 3), resized to S x S and normalised.

  Reusable for users' own photos, and leaves `image` as it was. For a large
  JPEG file, `decode_image(data, image_size)` first decodes it at a reduced
  scale, much faster; apply `PIL.ImageOps.exif_transpose` to camera photos
  (the dataset builder already did so for its records).
  """
  if image.mode != "RGB":
    image = image.convert("RGB")
  image = image.resize((image_size, image_size), Image.BILINEAR)
  return normalize(np.asarray(image))


def eval_image(data: bytes, image_size: int) -> np.ndarray:
  """Encoded image -> float32 (S, S, 3), resized to S x S and normalised."""
  return preprocess_image(decode_image(data, image_size), image_size)


# Leading bytes of formats PIL reads: a file that starts like an image but does not open is
# reported as corrupt rather than as "not an image".
_IMAGE_MAGIC = (
  b"\xff\xd8\xff",
  b"\x89PNG\r\n\x1a\n",
  b"GIF87a",
  b"GIF89a",
  b"BM",
  b"II*\x00",
  b"MM\x00*",
  b"RIFF",
  b"\x00\x00\x00\x0cjP",
  b"\xff\x4f\xff\x51",
)


_JPEG_SCALES = (2, 4, 8)  # libjpeg's DCT scaling factors that PIL's draft() can use.


_PIL_GLOBALS_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_checks_ours():
  """Suspends PIL's decompression-bomb check and forbids truncated images, under a lock.

  Our check, on the decoded size, replaces PIL's; truncated images are refused whatever another
  module set. Both are PIL globals, hence the lock; the build itself is single-threaded.
  """
  with _PIL_GLOBALS_LOCK:
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
      yield
    finally:
      Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def frame_count(image: Image.Image) -> int:
  """Frames of an opened image: an animation's, a TIFF's pages, an MPO's images; 1 for the rest."""
  return int(getattr(image, "n_frames", 1) or 1)


def _decoded_pixels(width: int, height: int, factor: int) -> int:
  return math.ceil(width / factor) * math.ceil(height / factor)


def _reduction_factor(
  width: int, height: int, can_draft: bool, max_side: int, max_pixels: int | None
):
  """The JPEG DCT scale to decode at; returns (factor, forced by the limit).

  The largest that keeps the shorter side >= max_side, or a larger one if needed to stay within
  max_pixels.
  """
  factor = 1
  if can_draft and max_side:
    for f in reversed(_JPEG_SCALES):
      if min(width, height) // f >= max_side:
        factor = f
        break
  if max_pixels is None or _decoded_pixels(width, height, factor) <= max_pixels:
    return factor, False
  if can_draft:
    for f in _JPEG_SCALES:
      if f > factor and _decoded_pixels(width, height, f) <= max_pixels:
        return f, True
  raise UnusableImage(
    "too_large",
    f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
    + (" even at 1/8 JPEG scale" if can_draft else " (only JPEGs can be decoded reduced)"),
  )


def _to_8bit(image: Image.Image) -> Image.Image:
  """16/32-bit integer and float images -> mode L.

  I;16*: value / 257 (the full 16-bit range). I and F hold no declared range, so
  the values decide: floats within [0, 1] are scaled by 255; values within
  [0, 255] are taken as 8-bit; within [0, 65535] as 16-bit (/ 257); anything
  else is min-max scaled.
  """
  array = np.asarray(image).astype(np.float64)
  if image.mode.startswith("I;16"):
    scaled = array / 257.0
  else:
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
      scaled = array * 255.0
    elif low >= 0 and high <= 255:
      scaled = array
    elif low >= 0 and high <= 65535:
      scaled = array / 257.0
    else:
      scaled = (array - low) / max(high - low, 1e-12) * 255.0
  return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
  """Any PIL mode -> RGB, recording what was converted."""
  mode = image.mode
  if mode == "P":
    conversions.append("palette")
  if (
    mode in ("P", "RGB", "L") and "transparency" in image.info
  ):  # A transparent colour (PNG tRNS, GIF).
    image, mode = image.convert("RGBA"), "RGBA"
  elif mode == "RGB":
    return image
  elif mode == "P":
    return image.convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    conversions.append("alpha")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
  if mode.startswith("I;16") or mode in ("I", "F"):
    conversions.append("16bit")
    return _to_8bit(image).convert("RGB")
  if mode in ("L", "1"):
    conversions.append("grayscale")
  elif mode == "CMYK":
    conversions.append("cmyk")
  else:
    conversions.append("other_mode")
  return image.convert("RGB")


def process_image(
  data: bytes, *, max_side: int = 256, jpeg_quality: int = 90, max_pixels: int | None = None
) -> tuple[bytes, int, int, list[str]]:
  """Encoded image of any PIL format -> (RGB JPEG bytes, original height, width, conversions).

  max_side: downscale so that the shorter side is at most this (0: keep the size).
  max_pixels: limit on decoded pixels (see the module docstring); None: no limit.
  Raises UnusableImage (not_an_image, corrupt_image, too_large). height and width are those
  of the image as displayed (after EXIF orientation), before downscaling.
  """
  conversions: list[str] = []
  with pil_checks_ours():
    try:
      image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
      if data.startswith(_IMAGE_MAGIC):
        raise UnusableImage(
          "corrupt_image", f"starts like an image but cannot be identified: {e}"
        ) from None
      raise UnusableImage("not_an_image", str(e)) from None
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad headers.
      raise UnusableImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    is_jpeg = image.format == "JPEG"
    can_draft = image.format in ("JPEG", "MPO")  # MPO: phone cameras' JPEG with extra frames.
    width, height = image.size
    factor, forced = _reduction_factor(width, height, can_draft, max_side, max_pixels)
    if factor > 1:
      image.draft(None, (width // factor, height // factor))
      if forced:
        conversions.append("downscaled_too_large")
    if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
      raise UnusableImage(
        "too_large",
        f"{width}x{height}: {image.size[0] * image.size[1]} pixels > max_pixels {max_pixels}",
      )
    try:
      if frame_count(image) > 1:
        conversions.append("first_frame")
      image.load()
    except Exception as e:  # pylint: disable=broad-except
      raise UnusableImage("corrupt_image", f"{type(e).__name__}: {e}") from None

  try:
    orientation = image.getexif().get(0x0112, 1)
  except Exception:  # pylint: disable=broad-except  # A broken EXIF block must not cost the image.
    orientation = 1
    conversions.append("exif_ignored")
  if orientation in (2, 3, 4, 5, 6, 7, 8):
    try:
      image = ImageOps.exif_transpose(image)
      conversions.append("exif_rotated")
    except Exception:  # pylint: disable=broad-except
      conversions.append("exif_ignored")
      orientation = 1
  if orientation in (5, 6, 7, 8):
    width, height = height, width

  image = to_rgb(image, conversions)
  resized = False
  if max_side and min(image.size) > max_side:
    w, h = image.size
    if w <= h:
      size = (max_side, max(1, round(h * max_side / w)))
    else:
      size = (max(1, round(w * max_side / h)), max_side)
    image = image.resize(size, Image.Resampling.LANCZOS)
    resized = True
  if is_jpeg and not conversions and not resized and factor == 1:
    return data, height, width, conversions
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=jpeg_quality)
  return buffer.getvalue(), height, width, conversions
