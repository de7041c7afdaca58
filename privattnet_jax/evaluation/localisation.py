"""Does attention land on the private content? Localisation against ground-truth boxes.

For datasets with boxes (the synthetic data; real VISPR has none), per attention step:

* mass inside: the share of the attention mass inside the union of the image's
  boxes, against the boxes' share of the image (the union's area fraction). A
  cell that a box only partly covers counts with the covered fraction of its
  area, i.e. attention is taken as spread evenly over its cell; so uniform
  attention scores exactly the area fraction, the chance level.
* pointing game: a hit when the centre of the most attended cell (the first
  one, on ties) lies inside a box (edges included). `pointing_chance` is the
  share of cells whose centre lies in a box, the hit rate of a random peak.

The grid covers the whole image: the eval transform stretches every image to
S x S, so cell (i, j) of an h x w grid is y in [i/h, (i+1)/h], x in [j/w,
(j+1)/w] of the original image. Images without boxes (safe images) have no
target, and are left out of the averages and counted.

Everything is vectorised over the batch; for a split, concatenate the host
arrays of all eval batches and call `localisation_metrics` once (pass the eval
mask so padding examples are neither scored nor counted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from privattnet_jax.inference.heatmaps import infer_grid_shape


def _check_inputs(attention, boxes, num_boxes):
  attention = np.asarray(attention, dtype=np.float64)
  boxes = np.asarray(boxes, dtype=np.float64)
  num_boxes = np.asarray(num_boxes)
  if attention.ndim != 3:
    raise ValueError(f"attention must be (N, T, L); got shape {attention.shape}")
  num_images = attention.shape[0]
  if boxes.ndim != 3 or boxes.shape[0] != num_images or boxes.shape[2] != 4:
    raise ValueError(f"boxes must be (N={num_images}, MAX_BOXES, 4); got shape {boxes.shape}")
  if num_boxes.shape != (num_images,) or not np.issubdtype(num_boxes.dtype, np.integer):
    raise ValueError(
      f"num_boxes must be integer (N={num_images},); got {num_boxes.dtype} {num_boxes.shape}"
    )
  if np.any(num_boxes < 0) or np.any(num_boxes > boxes.shape[1]):
    raise ValueError(f"num_boxes must lie in 0..{boxes.shape[1]} (MAX_BOXES)")
  if not np.all(np.isfinite(attention)):
    raise ValueError("attention holds non-finite values")
  valid = np.arange(boxes.shape[1])[None, :] < num_boxes[:, None]  # (N, M)
  real = boxes[valid]
  if real.size:
    if not np.all(np.isfinite(real)):
      raise ValueError("boxes hold non-finite coordinates")
    if np.any(real[:, 2] < real[:, 0]) or np.any(real[:, 3] < real[:, 1]):
      raise ValueError("boxes must be (ymin, xmin, ymax, xmax) with ymin <= ymax and xmin <= xmax")
  return attention, np.clip(boxes, 0.0, 1.0), num_boxes.astype(np.int64), valid


def _covered_areas(
  boxes: np.ndarray, valid: np.ndarray, grid_size: int, low: int, high: int
) -> tuple:
  """Splits one axis into intervals that no cell edge or box edge crosses.

  Returns the intervals' (N, K) lengths, midpoints and (N, K, grid_size)
  one-hot cell membership, for box coordinates at columns low (min) and high (max).
  """
  num_images = boxes.shape[0]
  cell_edges = np.broadcast_to(np.linspace(0.0, 1.0, grid_size + 1), (num_images, grid_size + 1))
  # Padding boxes contribute edges at 0 (harmless: 0 is a cell edge anyway).
  box_edges = np.where(valid[..., None], boxes[:, :, [low, high]], 0.0).reshape(num_images, -1)
  edges = np.sort(np.concatenate([cell_edges, box_edges], axis=1), axis=1)
  lengths = np.diff(edges, axis=1)
  midpoints = (edges[:, 1:] + edges[:, :-1]) / 2
  cells = np.clip(np.floor(midpoints * grid_size).astype(np.int64), 0, grid_size - 1)
  one_hot = cells[..., None] == np.arange(grid_size)
  return lengths, midpoints, one_hot


def _inside_any(y: np.ndarray, x: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """(N, A, B): whether point (y[n, a], x[n, b]) lies in a valid box of image n, edges included."""
  in_y = (y[:, :, None] >= boxes[:, None, :, 0]) & (
    y[:, :, None] <= boxes[:, None, :, 2]
  )  # (N, A, M)
  in_x = (x[:, :, None] >= boxes[:, None, :, 1]) & (
    x[:, :, None] <= boxes[:, None, :, 3]
  )  # (N, B, M)
  in_y &= valid[:, None, :]
  return np.einsum("nam,nbm->nab", in_y.astype(np.int32), in_x.astype(np.int32)) > 0


def localisation_per_image(
  attention, boxes, num_boxes, grid_shape: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
  """Per-image localisation values; images without boxes get zeros and has_boxes False.

  Args:
    attention: (N, T, L) attention weights (rows sum to 1).
    boxes: (N, MAX_BOXES, 4) ymin, xmin, ymax, xmax in [0, 1] of the image, zero-padded.
    num_boxes: (N,) integer, how many rows of `boxes` are real.
    grid_shape: (h, w) with h * w = L; inferred when L is square.

  Returns:
    `mass_inside` (N, T), `box_area` (N,), `pointing_hit` (N, T) bool,
    `pointing_chance` (N,) and `has_boxes` (N,) bool.
  """
  attention, boxes, num_boxes, valid = _check_inputs(attention, boxes, num_boxes)
  num_images, _, num_locations = attention.shape
  grid_height, grid_width = infer_grid_shape(num_locations, grid_shape)

  # Elementary rectangles: inside or outside the union as a whole, each within one cell.
  y_lengths, y_mid, y_cell = _covered_areas(boxes, valid, grid_height, 0, 2)
  x_lengths, x_mid, x_cell = _covered_areas(boxes, valid, grid_width, 1, 3)
  inside = _inside_any(y_mid, x_mid, boxes, valid)
  inside_area = inside * y_lengths[:, :, None] * x_lengths[:, None, :]  # (N, Ky, Kx)
  # (N, h, w) area in each cell. optimize: two matrix products; the plain three-operand einsum
  # loops over all five indices at once, far slower (docs/benchmarks.md, "The end of a run").
  covered = np.einsum("nah,nab,nbw->nhw", y_cell, inside_area, x_cell, optimize=True)
  cell_area = 1.0 / (grid_height * grid_width)
  coverage = np.clip(covered / cell_area, 0.0, 1.0).reshape(num_images, num_locations)

  mass_inside = np.einsum("ntl,nl->nt", attention, coverage)
  box_area = covered.reshape(num_images, -1).sum(axis=1)

  centre_y = np.broadcast_to(
    (np.arange(grid_height) + 0.5) / grid_height, (num_images, grid_height)
  )
  centre_x = np.broadcast_to((np.arange(grid_width) + 0.5) / grid_width, (num_images, grid_width))
  centre_inside = _inside_any(centre_y, centre_x, boxes, valid).reshape(num_images, num_locations)
  peak = np.argmax(attention, axis=2)  # (N, T), first maximum on ties
  pointing_hit = np.take_along_axis(centre_inside, peak, axis=1)

  return {
    "mass_inside": mass_inside,
    "box_area": box_area,
    "pointing_hit": pointing_hit,
    "pointing_chance": centre_inside.mean(axis=1),
    "has_boxes": num_boxes > 0,
  }


def localisation_metrics(
  attention, boxes, num_boxes, grid_shape: Sequence[int] | None = None, *, mask=None
) -> dict:
  """Split-level localisation: per-step averages over the images that have boxes.

  Args:
    attention, boxes, num_boxes, grid_shape: as for `localisation_per_image`.
    mask: optional (N,) eval mask; examples where it is 0 (padding) are ignored.

  Returns:
    A JSON-ready dict: `mass_inside` and `pointing_game` (lists of T floats),
    `box_area` and `pointing_chance` (floats), `num_images` (images scored, with
    boxes) and `num_without_boxes` (images excluded). Averages are None when no
    image has boxes.
  """
  per_image = localisation_per_image(attention, boxes, num_boxes, grid_shape)
  num_steps = per_image["mass_inside"].shape[1]
  keep = np.ones(per_image["has_boxes"].shape, dtype=bool)
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != keep.shape:
      raise ValueError(f"mask must be (N={keep.shape[0]},); got shape {mask.shape}")
    keep = mask > 0
  scored = keep & per_image["has_boxes"]
  num_scored = int(scored.sum())

  def mean(values):
    if not num_scored:
      return [None] * num_steps if values.ndim == 2 else None
    average = values[scored].astype(np.float64).mean(axis=0)
    return [float(v) for v in average] if values.ndim == 2 else float(average)

  return {
    "mass_inside": mean(per_image["mass_inside"]),
    "box_area": mean(per_image["box_area"]),
    "pointing_game": mean(per_image["pointing_hit"]),
    "pointing_chance": mean(per_image["pointing_chance"]),
    "num_images": num_scored,
    "num_without_boxes": int((keep & ~per_image["has_boxes"]).sum()),
  }
