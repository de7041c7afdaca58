"""A photo at full size for redaction: read (EXIF-oriented, alpha kept apart) and written again.

Every output is encoded afresh from its pixels (JPEG quality `JPEG_QUALITY`, the source's chroma
subsampling), without metadata, except that a JPEG that needs no change at all (safe, upright,
sRGB) is copied byte for byte with its metadata segments cut out. `keep_metadata` writes EXIF
(orientation reset, since the pixels are upright), XMP and the ICC profile back."""

from __future__ import annotations

import contextlib
import dataclasses
import io

from PIL import Image, ImageCms, ImageOps, JpegImagePlugin

from privattnet_jax import safe_files
from privattnet_jax.inference import animations, predict, preprocessing
from privattnet_jax.inference import metadata as metadata_lib

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


@dataclasses.dataclass
class Photo:
  """A photo as redact needs it: predict's model input and the full-size, upright pixels."""

  loaded: predict.LoadedImage
  data: bytes  # The file's bytes (for a byte-for-byte JPEG copy).
  pixels: Image.Image  # RGB or L, EXIF orientation applied, full resolution.
  alpha: Image.Image | None  # Its transparency (formats in ALPHA_FORMATS).
  format: str  # The source's Pillow format.
  orientation: int
  metadata: dict  # metadata.find_metadata
  exif: bytes | None  # For keep_metadata (orientation reset).
  xmp: bytes | None
  icc_profile: bytes | None
  frames: int = 1  # Of an animation, or of an MPO (whose extra images are metadata).


def load_photo(
  path, *, image_size: int, max_side: int, max_pixels: int | None, panel_size: int
) -> Photo:
  """predict.load_image (same checks, errors and model input) and the full-size pixels, one read.

  Raises `too_large` when the full size exceeds `max_pixels` (the output keeps the full size, so
  no reduced decode is possible here).
  """
  data = safe_files.read_bytes(path, max_bytes=safe_files.MAX_IMAGE_BYTES)  # Read once.
  loaded = predict.load_image_bytes(
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
  metadata = metadata_lib.find_metadata(image)
  source_format = image.format or "PNG"
  frames = preprocessing.frame_count(image)
  if frames > 1 and source_format != "MPO":
    animations.check(source_format, frames, image.size, max_pixels)
  try:
    exif = image.getexif()
    orientation = int(exif.get(metadata_lib.ORIENTATION, 1))
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
  """Pixels in the profile's colour space -> sRGB: dropping the profile then keeps the colours."""
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
  """The source's own bytes for a photo redact leaves alone, where no decoding is needed.

  With its metadata when kept, or a JPEG cut of its metadata segments when upright and without a
  colour profile. None: encode it afresh.
  """
  if keep_metadata and photo.orientation == 1 and photo.format in WRITE_FORMATS:
    return photo.data
  if photo.format == "JPEG" and photo.orientation == 1 and not photo.icc_profile:
    with contextlib.suppress(ValueError):
      return metadata_lib.strip_jpeg_metadata(photo.data)
  return None
