"""Attention heat maps: AMNet's overlay procedure, in numpy and Pillow, and the panels they go in.

For each attention step the (L,) map is reshaped to its (h, w) grid, min-max
normalised (per map, or across the steps of one image), scaled to 0..255,
resized bicubically to the image, coloured with the jet colour map and blended
50/50 with the image. A panel puts the image and one overlay per step side by
side with the score written above.

Differences from AMNet's OpenCV code, all deliberate: the colour map is
matplotlib's jet (OpenCV's COLORMAP_JET is a slightly different table), the
bicubic kernel is Pillow's (a = -0.5; OpenCV uses a = -0.75), overlays keep the
image's own size instead of 224 x 224, and `global` normalisation is the plain
(a - min) / (max - min) over all steps (AMNet's global branch, which it never
enabled, mixes two scales).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from privattnet_jax.inference import preprocessing

NORMALISATIONS = ("per_map", "global")
PANEL_SIZE = 256  # Longer side of each heat-map panel tile, in pixels (smaller images keep theirs).
CAPTION_HEIGHT = (
  16  # Pixels of the caption strip above the panel's images (and of the title strip).
)
CAPTION_BACKGROUND = (255, 255, 255)
CAPTION_COLOUR = (0, 0, 0)


@functools.cache
def jet_lut() -> np.ndarray:
  """matplotlib's jet as a (256, 3) uint8 RGB table, so that overlays colour by a numpy lookup.

  Built on first use: only callers that colour heat maps pay for importing matplotlib.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  lut = np.ascontiguousarray(matplotlib.colormaps["jet"](np.arange(256), bytes=True)[:, :3])
  lut.flags.writeable = False  # One table shared by every caller.
  return lut


def colourise(intensity: np.ndarray) -> np.ndarray:
  """Applies jet to a uint8 intensity image by table lookup, fast enough for full-size overlays.

  (...,) uint8 -> (..., 3) uint8 RGB; level i is matplotlib's `cm.jet(i, bytes=True)[:3]`.
  """
  intensity = np.asarray(intensity)
  if intensity.dtype != np.uint8:
    raise ValueError(f"colourise expects uint8 intensities, got {intensity.dtype}")
  return jet_lut()[intensity]


def infer_grid_shape(
  num_locations: int, grid_shape: Sequence[int] | None = None
) -> tuple[int, int]:
  """The attention grid (h, w) for L locations: given, or the square root of L.

  Raises:
    ValueError: the given shape does not hold L cells, or L is not square and no
      shape was given.
  """
  if grid_shape is not None:
    height, width = (int(g) for g in grid_shape)
    if height <= 0 or width <= 0 or height * width != num_locations:
      raise ValueError(
        f"grid_shape {tuple(grid_shape)} does not hold the attention's L={num_locations} locations"
      )
    return height, width
  side = math.isqrt(num_locations)
  if num_locations <= 0 or side * side != num_locations:
    raise ValueError(
      f"attention has L={num_locations} locations, not a square grid: pass grid_shape=(h, w)"
    )
  return side, side


def _check_attention(attention) -> np.ndarray:
  attention = np.asarray(attention, dtype=np.float64)
  if attention.ndim != 2:
    raise ValueError(f"attention must be (T, L), one row per step; got shape {attention.shape}")
  if attention.shape[0] == 0 or attention.shape[1] == 0:
    raise ValueError(
      f"attention must have at least one step and one location; got shape {attention.shape}"
    )
  if not np.all(np.isfinite(attention)):
    raise ValueError("attention holds non-finite values")
  return attention


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (H, W, 3) RGB; got {image.dtype} {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image is empty: {image.shape}")
  return image


def normalise_attention(attention, normalisation: str = "per_map") -> np.ndarray:
  """Min-max normalises (T, L) maps to [0, 1]: each row alone, or all rows of one image together.

  A constant map (or, under `global`, constant maps) normalises to zeros, as AMNet's does.
  """
  attention = _check_attention(attention)
  if normalisation == "per_map":
    low = attention.min(axis=1, keepdims=True)
    span = attention.max(axis=1, keepdims=True) - low
  elif normalisation == "global":
    low = attention.min()
    span = attention.max() - low
  else:
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
  shifted = attention - low
  return np.divide(
    shifted, span, out=np.zeros_like(shifted), where=np.broadcast_to(span, shifted.shape) > 0
  )


def attention_intensity(
  attention,
  image_size: tuple[int, int],
  grid_shape: Sequence[int] | None = None,
  *,
  normalisation: str = "per_map",
) -> np.ndarray:
  """The heat maps before colouring: (T, H, W) uint8, each grid map upsampled to image_size.

  Args:
    attention: (T, L) attention weights of one image.
    image_size: (H, W) of the image the maps are laid over.
    grid_shape: (h, w) with h * w = L; inferred when L is square.
    normalisation: `per_map` or `global`.
  """
  attention = _check_attention(attention)
  grid_height, grid_width = infer_grid_shape(attention.shape[1], grid_shape)
  height, width = (int(s) for s in image_size)
  # AMNet truncates (not rounds) the scaled map to uint8 before resizing; kept.
  levels = (normalise_attention(attention, normalisation) * 255).astype(np.uint8)
  maps = []
  for level_map in levels.reshape(-1, grid_height, grid_width):
    resized = Image.fromarray(level_map, mode="L").resize((width, height), Image.Resampling.BICUBIC)
    maps.append(np.asarray(resized))
  return np.stack(maps)


def blend(image: np.ndarray, overlay: np.ndarray, weight: float = 0.5) -> np.ndarray:
  """(1 - weight) * image + weight * overlay, rounded to uint8 like cv2.addWeighted."""
  mixed = (1.0 - weight) * image.astype(np.float64) + weight * overlay.astype(np.float64)
  return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def attention_overlays(
  image, attention, grid_shape: Sequence[int] | None = None, *, normalisation: str = "per_map"
) -> list[np.ndarray]:
  """One (H, W, 3) uint8 overlay per step: jet heat map blended 50/50 with the image.

  Args:
    image: uint8 (H, W, 3) RGB, the picture the model saw (any size: the maps
      are stretched over it, as the model's eval resize stretched it to the grid).
    attention: (T, L) attention weights of this image.
    grid_shape: (h, w), inferred when L is square.
    normalisation: `per_map` (each step's map to 0..255) or `global` (one
      min-max over all steps of the image, so steps compare in strength).
  """
  image = _check_image(image)
  intensities = attention_intensity(
    attention, image.shape[:2], grid_shape, normalisation=normalisation
  )
  return [blend(image, colourise(intensity)) for intensity in intensities]


def _format_score(score: float) -> str:
  return f"{score:.2f}" if math.isfinite(score) else str(score)


def attention_panel(
  image,
  attention,
  grid_shape: Sequence[int] | None = None,
  *,
  score: float | None = None,
  step_scores: Sequence[float] | None = None,
  normalisation: str = "per_map",
  title: str | None = None,
) -> Image.Image:
  """The image and one overlay per step side by side, labelled, as an RGB PIL image.

  Layout: an optional title strip, then a caption strip, then the images, each
  strip CAPTION_HEIGHT pixels high. The panel is W * (T + 1) wide and
  H + CAPTION_HEIGHT * (2 if title else 1) high. The captions read
  `score S` (or `image`) over the image and `step t` (1-based; with
  `: s` when step_scores are given) over each overlay, in Pillow's default font.

  Args:
    image: uint8 (H, W, 3) RGB.
    attention: (T, L) attention weights.
    grid_shape: (h, w), inferred when L is square.
    score: the privacy score written over the image, if any.
    step_scores: T per-step scores written over the overlays, if any.
    normalisation: `per_map` or `global`, see attention_overlays.
    title: a line of text above everything (e.g. the file name), if any.
  """
  image = _check_image(image)
  overlays = attention_overlays(image, attention, grid_shape, normalisation=normalisation)
  if step_scores is not None and len(step_scores) != len(overlays):
    raise ValueError(f"{len(step_scores)} step scores for {len(overlays)} attention steps")
  height, width = image.shape[:2]
  top = CAPTION_HEIGHT * (2 if title else 1)
  panel = Image.new("RGB", (width * (len(overlays) + 1), height + top), CAPTION_BACKGROUND)
  for column, tile in enumerate([image, *overlays]):
    panel.paste(Image.fromarray(tile, mode="RGB"), (column * width, top))
  draw = ImageDraw.Draw(panel)
  font = ImageFont.load_default()
  if title:
    draw.text((2, 2), title, fill=CAPTION_COLOUR, font=font)
  captions = ["image" if score is None else f"score {_format_score(float(score))}"]
  for step in range(len(overlays)):
    caption = f"step {step + 1}"
    if step_scores is not None:
      caption += f": {_format_score(float(step_scores[step]))}"
    captions.append(caption)
  for column, caption in enumerate(captions):
    # Drawn on its own strip so a long caption is clipped at its column, not spilled over the next.
    strip = Image.new("RGB", (width, CAPTION_HEIGHT), CAPTION_BACKGROUND)
    ImageDraw.Draw(strip).text((2, 2), caption, fill=CAPTION_COLOUR, font=font)
    panel.paste(strip, (column * width, top - CAPTION_HEIGHT))
  return panel


def display_image(encoded: bytes, panel_size: int = PANEL_SIZE) -> np.ndarray:
  """Encoded RGB image -> uint8 (h, w, 3), the longer side at most `panel_size`, aspect kept."""
  image = preprocessing.decode_image(encoded, panel_size)
  image.thumbnail((panel_size, panel_size), Image.Resampling.BILINEAR)
  return np.asarray(image)
