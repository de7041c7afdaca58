"""Helpers for the predict and export tests: a tiny trained run, and photos in many formats."""

import io
import pathlib

import numpy as np
from PIL import Image

from privattnet_jax.training import train
from tests.conftest import make_tiny_config

IMAGE_SIZE = (48, 40)  # (width, height) of the good test photos.


def train_tiny_run(
  data_dir: str,
  workdir: pathlib.Path,
  model_name: str,
  *,
  per_profile: bool = False,
  eval_splits=(),
) -> pathlib.Path:
  """Two steps of a tiny model (one validation pass selects the checkpoint), then `eval_splits`.

  The regressor is wider than the shared tiny config's so that two steps leave it responsive to
  the image (an 8-unit ReLU layer is often all dead at first).
  """
  config = make_tiny_config(data_dir, model_name)
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.eval_splits = tuple(eval_splits)
  config.score.per_profile = per_profile
  config.model.attention.regressor_hidden = 32
  train.train_and_evaluate(config, str(workdir))
  return workdir


def photo(size=IMAGE_SIZE, seed: int = 0) -> Image.Image:
  """A smooth colourful RGB picture with some noise (compresses like a photo)."""
  width, height = size
  y, x = np.mgrid[0:height, 0:width]
  rng = np.random.default_rng(seed)
  channels = [np.sin(x / (5 + 3 * c) + c) * np.cos(y / (7 - c)) for c in range(3)]
  pixels = np.stack(channels, -1) * 100 + 128 + rng.normal(0, 8, (height, width, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
  """JPEG bytes of `image` stored as is, with an EXIF orientation tag telling viewers to rotate it."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
  """A small PNG whose header claims width x height pixels (1.6 G by default): a decompression bomb."""
  png = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
  ihdr = png.index(b"IHDR") + 4
  png[ihdr : ihdr + 8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
  import zlib  # pylint: disable=g-import-not-at-top

  crc = zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13]))
  png[ihdr + 13 : ihdr + 17] = crc.to_bytes(4, "big")
  return bytes(png)


GOOD = {  # name -> (bytes maker, expected displayed (width, height), expected conversions)
  "photo.jpg": (lambda: encoded(photo(), "JPEG", quality=95), IMAGE_SIZE, []),
  "rgba.png": (lambda: encoded(_half_transparent(photo(seed=1)), "PNG"), IMAGE_SIZE, ["alpha"]),
  "palette.gif": (
    lambda: encoded(
      photo(seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "GIF", transparency=0
    ),
    IMAGE_SIZE,
    ["palette", "alpha"],
  ),
  "gray.png": (lambda: encoded(photo(seed=3).convert("L"), "PNG"), IMAGE_SIZE, ["grayscale"]),
  "deep.png": (
    lambda: encoded(
      Image.fromarray(
        np.tile(np.linspace(0, 65535, IMAGE_SIZE[0]).round().astype(np.uint16), (IMAGE_SIZE[1], 1))
      ),
      "PNG",
    ),
    IMAGE_SIZE,
    ["16bit"],
  ),
  "rotated.jpg": (lambda: exif_rotated_jpeg(photo(seed=4)), IMAGE_SIZE[::-1], ["exif_rotated"]),
  "photo.webp": (lambda: encoded(photo(seed=5), "WEBP", quality=90), IMAGE_SIZE, []),
  "photo.bmp": (lambda: encoded(photo(seed=6), "BMP"), IMAGE_SIZE, []),
  "photo.tiff": (lambda: encoded(photo(seed=7), "TIFF"), IMAGE_SIZE, []),
  "nested/deeper/inner.jpg": (lambda: encoded(photo(seed=8), "JPEG"), IMAGE_SIZE, []),
}


def _truncated_jpeg() -> bytes:
  noisy = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
  data = encoded(noisy, "JPEG", quality=95)
  return data[: len(data) // 2]


BROKEN = {  # name -> (bytes maker, a word the error entry must hold)
  "empty.jpg": (lambda: b"", "empty file"),
  "text.jpg": (lambda: b"<html>404 Not Found</html>\n", "not_an_image"),
  "truncated.jpg": (_truncated_jpeg, "corrupt_image"),
  "bomb.png": (png_bomb, "too_large"),
}


def _half_transparent(image: Image.Image) -> Image.Image:
  """The right half fully transparent."""
  rgba = image.convert("RGBA")
  alpha = np.full(rgba.size[::-1], 255, np.uint8)
  alpha[:, rgba.size[0] // 2 :] = 0
  rgba.putalpha(Image.fromarray(alpha))
  return rgba


def write_photos(folder: pathlib.Path, names=None, *, broken: bool = True) -> pathlib.Path:
  """Writes GOOD (and BROKEN) files, plus a text file that a folder scan must pass over."""
  for name, (make, *_) in {**GOOD, **(BROKEN if broken else {})}.items():
    if names is None or name in names:
      path = folder / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(make())
  (folder / "notes.txt").write_text("not an image, and not named like one\n")
  return folder
