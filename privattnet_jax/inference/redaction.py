"""Attention-guided redaction masks: which pixels to redact so that a photo's risk drops.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from privattnet_jax.data import attributes
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.inference import preprocessing, user_scores

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
  """The part of a mode-L 0/255 mask under `box` of an image of `size`, computed for that box alone.

  Bilinearly upsampled and thresholded at half: a smooth edge at full size.
  """
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
  """The largest score the checkpoint's target gives (its largest preference): MIN_DROP's unit."""
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
