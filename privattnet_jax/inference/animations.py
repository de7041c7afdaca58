"""Animated photos for redact: every frame redacted with the same mask, none dropped.

The model scores an animation's first frame (as predict does: `first_frame` among its conversions)
and redact finds its regions there; every frame of a GIF, WebP or APNG animation is then redacted
with that mask and written again with its timing. A file of several frames that are not an
animation (TIFF pages, PSD layers) may show something else on each: it is refused, for itself
alone, rather than written with its first frame only. An MPO's extra images (a depth or gain
map, a second view) are metadata (metadata.find_metadata).
"""

from __future__ import annotations

import io

from PIL import Image

from privattnet_jax.inference import preprocessing

FORMATS = ("GIF", "WEBP", "PNG")  # Pillow formats whose animations redact writes.
# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
  2: Image.Transpose.FLIP_LEFT_RIGHT,
  3: Image.Transpose.ROTATE_180,
  4: Image.Transpose.FLIP_TOP_BOTTOM,
  5: Image.Transpose.TRANSPOSE,
  6: Image.Transpose.ROTATE_270,
  7: Image.Transpose.TRANSVERSE,
  8: Image.Transpose.ROTATE_90,
}


def check(fmt: str, frames: int, size: tuple[int, int], max_pixels: int | None) -> None:
  """Raises (`reason: message`, the file's error row) unless redact can write every frame."""
  if fmt not in FORMATS:
    raise ValueError(
      f"multi_frame: a {fmt} of {frames} frames (pages or layers, which may each show something "
      "else): redact writes single images and GIF, WebP and PNG animations; save the frames as "
      "single images first"
    )
  pixels = frames * size[0] * size[1]
  if max_pixels is not None and pixels > max_pixels:
    raise ValueError(
      f"too_large: {frames} frames of {size[0]}x{size[1]} = {pixels} pixels > max_pixels "
      f"{max_pixels}, and redact writes every frame"
    )


def frames(
  data: bytes, count: int, orientation: int, mode: str, has_alpha: bool
) -> tuple[list[tuple[Image.Image, Image.Image | None]], dict]:
  """Every frame of an animation as photos.load_photo gives the first, and the timing to save.

  Each frame is (pixels in `mode`, upright, transparency composited as the builder does; the alpha
  channel or None); the save options keep the animation's timing (duration per frame, loop).
  """
  with preprocessing.pil_checks_ours():  # `check` bounded the pixels of all frames together.
    image = Image.open(io.BytesIO(data))
    found, durations = [], []
    for index in range(count):
      image.seek(index)
      frame = image.copy()  # Loads the frame, and with it its duration.
      durations.append(frame.info.get("duration", image.info.get("duration", 0)))
      if orientation in _TRANSPOSE:
        frame = frame.transpose(_TRANSPOSE[orientation])
      alpha = None
      if has_alpha or frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info:
        alpha = frame.convert("RGBA").getchannel("A")
      pixels = preprocessing.to_rgb(frame, [])
      found.append((pixels.convert("L") if mode == "L" else pixels, alpha))
  timing = {"duration": [int(round(d or 0)) for d in durations]}
  if "loop" in image.info:
    timing["loop"] = image.info["loop"]
  return found, timing
