"""How well attention-guided redaction lowers the risk, on data with ground-truth boxes.

At equal area it compares the risk drop of the greedy attention masks with random masks (random
grid saliency, same thresholding) and a centred box, and measures how much of the ground-truth box
area the attention masks cover (the evaluation's opt-in `redaction` entry and the benchmark's)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from privattnet_jax.inference import redaction


def _boxes_mask(boxes, count: int, shape: tuple[int, int]) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) boxes -> their union as a boolean mask of `shape`."""
  height, width = shape
  ys, xs = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
  mask = np.zeros(shape, bool)
  for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64)[:count]:
    mask |= ((ys >= ymin) & (ys <= ymax))[:, None] & ((xs >= xmin) & (xs <= xmax))[None, :]
  return mask


def redaction_quality(
  score: redaction.Scorer,
  images: np.ndarray,
  boxes,
  num_boxes,
  grid_shape,
  *,
  target_drop: float = 0.5,
  target_score: float | None = None,
  method: str = "blur",
  max_area: float = redaction.DEFAULT_MAX_AREA,
  seed: int = 0,
) -> tuple[dict, redaction.Redactions]:
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

  greedy = redaction.greedy_redactions(
    score, images, targets, grid_shape, method=method, max_area=max_area
  )
  before = greedy.before
  size = images.shape[1:3]
  random_masks, centred_masks = [], []
  for mask in greedy.masks:
    area = mask.mean()
    noise = rng.random(grid_shape).astype(np.float32)
    saliency = np.asarray(
      Image.fromarray(noise, mode="F").resize(size[::-1], Image.Resampling.BILINEAR)
    )
    random_masks.append(redaction.grow_mask(np.zeros(size, bool), saliency, area))
    centred_masks.append(redaction.centred_box_mask(size, area))
  redacted = [
    redaction.redact_array(image, mask, method)
    for masks in (random_masks, centred_masks)
    for image, mask in zip(images, masks)
  ]
  scores, _ = score(redaction.normalise_images(np.stack(redacted)))
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
