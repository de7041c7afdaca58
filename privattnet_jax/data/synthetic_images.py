"""The synthetic images: attribute looks, backgrounds, distractors, an image with its boxes.

Each planted privacy attribute has a look; an image is rendered with its objects' boxes.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from privattnet_jax.data import attributes as attributes_lib

# Ten attributes spanning the preference range (profile mean in brackets):
# hair colour 2.05, sports 2.26, landmark 2.63, vehicle 2.78, date/time 3.10, face 3.42,
# licence plate 3.76, phone 3.79, passport 3.97, credit card 4.06.
DEFAULT_ATTRIBUTES = (
  "a6_hair_color",
  "a59_sports",
  "a73_landmark",
  "a102_vehicle_ownership",
  "a82_date_time",
  "a9_face_complete",
  "a103_license_plate_complete",
  "a49_phone",
  "a31_passport",
  "a30_credit_card",
)


# The generation's defaults (the functions and the command line): the share of images with no
# object (labelled `a0_safe`), and each object box's area as a fraction of the image.
SAFE_FRACTION = 0.25
MIN_AREA = 0.04
MAX_AREA = 0.16
Rgb = tuple[int, int, int]


def _jitter(rng: np.random.Generator, rgb: Rgb, amount: int = 14) -> tuple[int, int, int, int]:
  r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
  return (r, g, b, 255)


def _canvas(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  patch = Image.new("RGBA", (w, h), (0, 0, 0, 0))
  return patch, ImageDraw.Draw(patch)


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [0, 1): (y, x), each (h, w)."""
  return np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")


def _ellipse_mask(w: int, h: int) -> np.ndarray:
  y, x = _grid(w, h)
  return ((x - 0.5) / 0.5) ** 2 + ((y - 0.5) / 0.5) ** 2 <= 1.0


def _from_array(rgb: np.ndarray, mask: np.ndarray) -> Image.Image:
  rgba = np.concatenate([rgb.astype(np.uint8), (mask * 255).astype(np.uint8)[..., None]], axis=-1)
  return Image.fromarray(rgba, mode="RGBA")


def _two_tone(mask_a: np.ndarray, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
  return np.where(mask_a[..., None], np.asarray(a[:3]), np.asarray(b[:3]))


def _face(w, h, rng):
  patch, d = _canvas(w, h)
  d.ellipse(
    (0, 0, w - 1, h - 1),
    fill=_jitter(rng, (245, 200, 40)),
    outline=(70, 35, 0, 255),
    width=max(1, w // 14),
  )
  for cx in (0.32, 0.68):
    d.ellipse((w * (cx - 0.1), h * 0.28, w * (cx + 0.1), h * 0.5), fill=(0, 0, 0, 255))
  d.chord((w * 0.24, h * 0.45, w * 0.76, h * 0.82), 0, 180, fill=_jitter(rng, (200, 20, 30)))
  return patch


def _credit_card(w, h, rng):
  patch, d = _canvas(w, h)
  d.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(1, h // 7), fill=_jitter(rng, (25, 75, 215)))
  d.rectangle((w * 0.1, h * 0.28, w * 0.32, h * 0.56), fill=_jitter(rng, (240, 190, 40)))
  for k in range(4):
    x0 = w * (0.1 + 0.21 * k)
    d.rectangle((x0, h * 0.68, x0 + w * 0.15, h * 0.82), fill=(250, 250, 250, 255))
  return patch


def _passport(w, h, rng):
  patch, d = _canvas(w, h)
  gold = _jitter(rng, (235, 190, 50))
  d.rectangle((0, 0, w - 1, h - 1), fill=_jitter(rng, (125, 15, 45)))
  r = w * 0.27
  d.ellipse(
    (w * 0.5 - r, h * 0.45 - r, w * 0.5 + r, h * 0.45 + r), outline=gold, width=max(1, w // 9)
  )
  d.rectangle((w * 0.2, h * 0.1, w * 0.8, h * 0.16), fill=gold)
  d.rectangle((w * 0.2, h * 0.8, w * 0.8, h * 0.86), fill=gold)
  return patch


def _license_plate(w, h, rng):
  patch, d = _canvas(w, h)
  d.rectangle(
    (0, 0, w - 1, h - 1), fill=(240, 240, 232, 255), outline=(0, 0, 0, 255), width=max(1, h // 8)
  )
  d.rectangle((0, 0, w * 0.12, h - 1), fill=_jitter(rng, (20, 50, 175)))
  for k in range(6):
    x0 = w * (0.19 + 0.125 * k)
    d.rectangle((x0, h * 0.22, x0 + w * 0.065, h * 0.78), fill=(0, 0, 0, 255))
  return patch


def _landmark(w, h, rng):
  patch, d = _canvas(w, h)
  d.polygon([(w * 0.5, 0), (w * 0.85, h - 1), (w * 0.15, h - 1)], fill=_jitter(rng, (235, 120, 25)))
  dark = _jitter(rng, (85, 45, 10))
  for t in (0.35, 0.6, 0.85):
    t1 = t + 0.07
    d.polygon(
      [
        (w * (0.5 - 0.35 * t), h * t),
        (w * (0.5 + 0.35 * t), h * t),
        (w * (0.5 + 0.35 * t1), h * t1),
        (w * (0.5 - 0.35 * t1), h * t1),
      ],
      fill=dark,
    )
  return patch


def _phone(w, h, rng):
  patch, d = _canvas(w, h)
  d.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(1, w // 6), fill=(18, 18, 24, 255))
  d.rectangle((w * 0.12, h * 0.1, w * 0.88, h * 0.8), fill=_jitter(rng, (0, 210, 240)))
  d.ellipse((w * 0.42, h * 0.85, w * 0.58, h * 0.85 + w * 0.16), fill=(200, 200, 200, 255))
  return patch


def _hair(w, h, rng):
  y, x = _grid(w, h)
  phase = rng.uniform(0, 2 * np.pi)
  stripes = np.sin(2 * np.pi * (5 * x + 0.25 * np.sin(2 * np.pi * 2 * y + phase))) > 0
  rgb = _two_tone(stripes, _jitter(rng, (215, 40, 190)), _jitter(rng, (80, 0, 95)))
  return _from_array(rgb, _ellipse_mask(w, h))


def _sports(w, h, rng):
  y, x = _grid(w, h)
  checks = ((np.floor(x * 4) + np.floor(y * 4)) % 2) == 0
  rgb = _two_tone(checks, (250, 250, 250), (10, 10, 10))
  mask = _ellipse_mask(w, h)
  del rng
  return _from_array(rgb, mask)


def _vehicle(w, h, rng):
  patch, d = _canvas(w, h)
  red = _jitter(rng, (220, 25, 25))
  d.polygon(
    [(w * 0.22, h * 0.4), (w * 0.33, h * 0.05), (w * 0.67, h * 0.05), (w * 0.8, h * 0.4)], fill=red
  )
  d.rounded_rectangle((0, h * 0.36, w - 1, h * 0.8), radius=max(1, h // 10), fill=red)
  d.rectangle((w * 0.37, h * 0.12, w * 0.63, h * 0.36), fill=(170, 220, 250, 255))
  for cx in (0.25, 0.75):
    d.ellipse((w * (cx - 0.12), h * 0.6, w * (cx + 0.12), h - 1), fill=(10, 10, 10, 255))
    d.ellipse((w * (cx - 0.04), h * 0.73, w * (cx + 0.04), h * 0.87), fill=(170, 170, 170, 255))
  return patch


def _date_time(w, h, rng):
  patch, d = _canvas(w, h)
  d.ellipse((0, 0, w - 1, h - 1), fill=_jitter(rng, (25, 160, 65)))
  d.ellipse((w * 0.16, h * 0.16, w * 0.84, h * 0.84), fill=(250, 250, 250, 255))
  cx, cy = w / 2, h / 2
  for angle, length, width in (
    (rng.uniform(0, 2 * np.pi), 0.3, max(1, w // 10)),
    (rng.uniform(0, 2 * np.pi), 0.2, max(1, w // 8)),
  ):
    d.line(
      (cx, cy, cx + length * w * math.cos(angle), cy + length * h * math.sin(angle)),
      fill=(0, 0, 0, 255),
      width=width,
    )
  return patch


def _fingerprint(w, h, rng):
  y, x = _grid(w, h)
  r = np.sqrt((x - 0.5) ** 2 + ((y - 0.55) * 0.8) ** 2)
  ridges = np.sin(2 * np.pi * 8 * r + rng.uniform(0, 2 * np.pi)) > 0
  rgb = _two_tone(ridges, _jitter(rng, (110, 60, 30)), _jitter(rng, (235, 215, 180)))
  return _from_array(rgb, _ellipse_mask(w, h))


def _ausweis(w, h, rng):
  patch, d = _canvas(w, h)
  d.rounded_rectangle(
    (0, 0, w - 1, h - 1), radius=max(1, h // 8), fill=_jitter(rng, (130, 210, 150))
  )
  d.rectangle((0, 0, w - 1, h * 0.14), fill=_jitter(rng, (200, 40, 40)))
  d.rectangle((w * 0.07, h * 0.24, w * 0.35, h * 0.88), fill=_jitter(rng, (120, 90, 70)))
  for t in (0.3, 0.5, 0.7):
    d.rectangle((w * 0.42, h * t, w * 0.93, h * (t + 0.08)), fill=(50, 50, 50, 255))
  return patch


@dataclasses.dataclass(frozen=True)
class Look:
  """How one attribute is drawn: render(width, height, rng) -> RGBA patch; aspect = width/height."""

  render: Callable[[int, int, np.random.Generator], Image.Image]
  aspect: float


LOOKS: dict[str, Look] = {
  "a9_face_complete": Look(_face, 0.85),
  "a30_credit_card": Look(_credit_card, 1.58),
  "a31_passport": Look(_passport, 0.7),
  "a103_license_plate_complete": Look(_license_plate, 3.0),
  "a73_landmark": Look(_landmark, 0.75),
  "a49_phone": Look(_phone, 0.5),
  "a6_hair_color": Look(_hair, 1.3),
  "a59_sports": Look(_sports, 1.0),
  "a102_vehicle_ownership": Look(_vehicle, 1.8),
  "a82_date_time": Look(_date_time, 1.0),
  "a7_fingerprint": Look(_fingerprint, 0.8),
  "a29_ausweis": Look(_ausweis, 1.58),
}


def _muted(rng: np.random.Generator, max_saturation: float = 0.45) -> Rgb:
  r, g, b = colorsys.hsv_to_rgb(
    rng.uniform(), rng.uniform(0.05, max_saturation), rng.uniform(0.3, 0.92)
  )
  return (int(r * 255), int(g * 255), int(b * 255))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
  kind = rng.integers(3)
  if kind == 0:  # A linear gradient between two colours, in a random direction.
    y, x = _grid(size, size)
    angle = rng.uniform(0, 2 * np.pi)
    t = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    a, b = np.asarray(_muted(rng)), np.asarray(_muted(rng))
    array = a * (1 - t[..., None]) + b * t[..., None]
    image = Image.fromarray(array.astype(np.uint8))
  elif kind == 1:  # Smooth colour noise: a coarse random grid, upsampled.
    cells = int(rng.integers(3, 9))
    coarse = np.stack([[_muted(rng, 0.35) for _ in range(cells)] for _ in range(cells)]).astype(
      np.uint8
    )
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
  else:
    image = Image.new("RGB", (size, size), _muted(rng))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 9))):  # Soft blobs.
    cx, cy = rng.uniform(0, size, 2)
    rx, ry = rng.uniform(0.05, 0.35, 2) * size
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_muted(rng, 0.35))
  return image


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
  """One untextured, single-colour shape that is none of the looks."""
  colour = _muted(rng, 0.55)
  side = size * math.sqrt(rng.uniform(0.02, 0.12))
  cx, cy = rng.uniform(0, size, 2)
  kind = rng.integers(5)
  if kind == 0:  # Irregular polygon.
    n = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.3, 0.6, n) * side
    draw.polygon(
      [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)], fill=colour
    )
  elif kind == 1:  # Five-pointed star.
    points = []
    for k in range(10):
      r = side * (0.5 if k % 2 == 0 else 0.2)
      a = rng.uniform(0, 0.1) + k * math.pi / 5
      points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    draw.polygon(points, fill=colour)
  elif kind == 2:  # Plus sign.
    t = side * 0.15
    draw.rectangle((cx - side / 2, cy - t, cx + side / 2, cy + t), fill=colour)
    draw.rectangle((cx - t, cy - side / 2, cx + t, cy + side / 2), fill=colour)
  elif kind == 3:  # A thick bar at a random angle.
    a = rng.uniform(0, np.pi)
    dx, dy = side * 0.7 * math.cos(a), side * 0.7 * math.sin(a)
    draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=max(2, int(side * 0.12)))
  else:  # Rectangle outline.
    w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
    draw.rectangle(
      (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
      outline=colour,
      width=max(1, int(side * 0.08)),
    )


def _overlaps(box: Sequence[int], others: Sequence[Sequence[int]], margin: int) -> bool:
  x0, y0, x1, y1 = box
  return any(
    x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
    for b in others
  )


def render_image(
  rng: np.random.Generator,
  image_size: int,
  attribute_ids: Sequence[str],
  safe_fraction: float = SAFE_FRACTION,
  min_area: float = MIN_AREA,
  max_area: float = MAX_AREA,
) -> tuple[Image.Image, list[str], list[list[float]], list[str]]:
  """One synthetic image: (RGB image, labels, boxes [ymin, xmin, ymax, xmax] in [0, 1], box labels).

  Object box areas are log-uniform in [min_area, max_area] of the image.
  """
  size = image_size
  image = _background(rng, size)
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 7))):
    _draw_distractor(draw, rng, size)
  placed: list[tuple[int, int, int, int]] = []
  box_labels: list[str] = []
  if rng.uniform() >= safe_fraction:
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    chosen = rng.choice(len(attribute_ids), size=min(count, len(attribute_ids)), replace=False)
    for index in chosen:
      attribute_id = attribute_ids[int(index)]
      look = LOOKS[attribute_id]
      area = math.exp(rng.uniform(math.log(min_area), math.log(max_area))) * size * size
      aspect = look.aspect * math.exp(rng.uniform(-0.1, 0.1))
      w = min(size - 2, max(4, round(math.sqrt(area * aspect))))
      h = min(size - 2, max(4, round(w / aspect)))
      for _ in range(30):
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, placed, margin=2):
          break
      else:
        continue  # No free spot: the object is left out, and so is its label.
      patch = look.render(w, h, rng)
      image.paste(patch, (x0, y0), patch)
      placed.append(box)
      box_labels.append(attribute_id)
  array = np.asarray(image, dtype=np.float32)
  array = array + rng.normal(0.0, rng.uniform(2.0, 8.0), array.shape)
  image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
  if box_labels:
    labels = sorted(set(box_labels), key=attributes_lib.ATTRIBUTE_INDEX.__getitem__)
  else:
    labels = [attributes_lib.SAFE_ATTRIBUTE]
  boxes = [[y0 / size, x0 / size, y1 / size, x1 / size] for x0, y0, x1, y1 in placed]
  return image, labels, boxes, box_labels
