"""Attention localisation on hand-made maps and boxes whose answers are worked out by hand."""

import numpy as np
import pytest

from privattnet_jax.evaluation import localisation

# 2 x 2 grid: cells 0 (top left), 1 (top right), 2 (bottom left), 3 (bottom right).
UNIFORM = [0.25, 0.25, 0.25, 0.25]


def pad_boxes(per_image, max_boxes=3):
  boxes = np.zeros((len(per_image), max_boxes, 4))
  for i, image_boxes in enumerate(per_image):
    if image_boxes:
      boxes[i, : len(image_boxes)] = image_boxes
  return boxes, np.array([len(b) for b in per_image])


def test_mass_inside_counts_partly_covered_cells_by_area():
  # The box covers cell 0 and the left half of cell 1: area 0.5 * 0.75 = 0.375.
  attention = np.array([[[0.7, 0.1, 0.1, 0.1], UNIFORM]])
  boxes, num_boxes = pad_boxes([[(0.0, 0.0, 0.5, 0.75)]])
  result = localisation.localisation_metrics(attention, boxes, num_boxes)
  np.testing.assert_allclose(result["mass_inside"], [0.7 + 0.5 * 0.1, 0.25 + 0.5 * 0.25])
  assert result["box_area"] == pytest.approx(0.375)
  # Uniform attention scores exactly the boxes' share: the chance level.
  assert result["mass_inside"][1] == pytest.approx(result["box_area"])
  # Centres (0.25, 0.25) and (0.25, 0.75) lie in the box (its right edge included).
  assert result["pointing_chance"] == pytest.approx(0.5)
  assert result["pointing_game"] == [1.0, 1.0]  # Step 2 ties: the first cell, 0, is the peak.
  assert (result["num_images"], result["num_without_boxes"]) == (1, 0)


def test_pointing_game_hit_and_miss_per_step():
  # Box over the bottom-right cell only.
  attention = np.array([[[0.1, 0.1, 0.1, 0.7], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]]])
  boxes, num_boxes = pad_boxes([[(0.5, 0.5, 1.0, 1.0)]])
  result = localisation.localisation_metrics(attention, boxes, num_boxes)
  assert result["pointing_game"] == [1.0, 0.0, 1.0]
  np.testing.assert_allclose(result["mass_inside"], [0.7, 0.1, 0.5])
  assert result["box_area"] == pytest.approx(0.25)
  assert result["pointing_chance"] == pytest.approx(0.25)


def test_union_of_overlapping_boxes_counted_once():
  # Two 0.5 x 0.5 boxes overlapping in a 0.25 x 0.25 square: union 0.25 + 0.25 - 0.0625.
  boxes, num_boxes = pad_boxes([[(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)]])
  per_image = localisation.localisation_per_image(np.array([[UNIFORM]]), boxes, num_boxes)
  assert per_image["box_area"][0] == pytest.approx(0.4375)
  assert per_image["mass_inside"][0, 0] == pytest.approx(0.4375)
  # Cell coverage: cell 0 full (0.25), cells 1 and 2 a 0.25 x 0.25 corner each (0.0625 / 0.25),
  # cell 3 a 0.25 x 0.25 corner: mass on cell 1 alone is a quarter of it.
  one_hot = np.array([[[0.0, 1.0, 0.0, 0.0]]])
  assert localisation.localisation_per_image(one_hot, boxes, num_boxes)["mass_inside"][
    0, 0
  ] == pytest.approx(0.25)


def test_cell_aligned_box_on_the_paper_grid():
  # A box over rows 0..1 and columns 0..2 of the 14 x 14 grid: 6 cells exactly.
  attention = np.full((1, 2, 196), 1.0 / 196)
  attention[0, 1] = 0.0
  attention[0, 1, 14 * 1 + 2] = 1.0  # Row 1, column 2: inside.
  boxes, num_boxes = pad_boxes([[(0.0, 0.0, 2 / 14, 3 / 14)]])
  result = localisation.localisation_metrics(attention, boxes, num_boxes)
  np.testing.assert_allclose(result["mass_inside"], [6 / 196, 1.0])
  assert result["box_area"] == pytest.approx(6 / 196)
  assert result["pointing_chance"] == pytest.approx(6 / 196)
  assert result["pointing_game"] == [1.0, 1.0]  # Uniform: peak at cell 0, in the box.


def test_non_square_grid_needs_its_shape():
  # 1 x 2 grid: left and right halves; box over the right half.
  attention = np.array([[[0.2, 0.8]]])
  boxes, num_boxes = pad_boxes([[(0.0, 0.5, 1.0, 1.0)]])
  result = localisation.localisation_metrics(attention, boxes, num_boxes, grid_shape=(1, 2))
  assert result["mass_inside"] == [pytest.approx(0.8)]
  assert result["pointing_game"] == [1.0]
  # As (2, 1) the cells are top and bottom halves, each half inside the box.
  transposed = localisation.localisation_metrics(attention, boxes, num_boxes, grid_shape=(2, 1))
  assert transposed["mass_inside"] == [pytest.approx(0.5)]
  # Both cell centres sit at x = 0.5, on the box's left edge, which counts as inside.
  assert transposed["pointing_game"] == [1.0]
  assert transposed["pointing_chance"] == pytest.approx(1.0)


def test_safe_images_excluded_and_counted():
  attention = np.array(
    [
      [[0.1, 0.1, 0.1, 0.7]],  # Hit, mass 0.7.
      [[0.9, 0.05, 0.03, 0.02]],  # Safe: no boxes, whatever its attention.
      [[0.4, 0.3, 0.2, 0.1]],  # Miss, mass 0.1.
    ]
  )
  boxes, num_boxes = pad_boxes([[(0.5, 0.5, 1.0, 1.0)], [], [(0.5, 0.5, 1.0, 1.0)]])
  result = localisation.localisation_metrics(attention, boxes, num_boxes)
  assert result["mass_inside"] == [pytest.approx(0.4)]
  assert result["pointing_game"] == [0.5]
  assert (result["num_images"], result["num_without_boxes"]) == (2, 1)
  per_image = localisation.localisation_per_image(attention, boxes, num_boxes)
  assert per_image["has_boxes"].tolist() == [True, False, True]
  assert per_image["box_area"][1] == 0.0


def test_mask_drops_padding_examples():
  attention = np.array([[[0.1, 0.1, 0.1, 0.7]], [[0.7, 0.1, 0.1, 0.1]], [[0.25] * 4]])
  boxes, num_boxes = pad_boxes([[(0.5, 0.5, 1.0, 1.0)], [(0.5, 0.5, 1.0, 1.0)], []])
  result = localisation.localisation_metrics(
    attention, boxes, num_boxes, mask=np.array([1.0, 0.0, 0.0])
  )
  assert result["pointing_game"] == [1.0]
  assert (result["num_images"], result["num_without_boxes"]) == (1, 0)


def test_no_image_with_boxes_gives_none():
  boxes, num_boxes = pad_boxes([[], []])
  result = localisation.localisation_metrics(np.full((2, 3, 4), 0.25), boxes, num_boxes)
  assert result["mass_inside"] == [None, None, None]
  assert result["pointing_game"] == [None, None, None]
  assert result["box_area"] is None and result["pointing_chance"] is None
  assert (result["num_images"], result["num_without_boxes"]) == (0, 2)


def test_padding_rows_beyond_num_boxes_are_ignored():
  boxes, _ = pad_boxes([[(0.5, 0.5, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)]])
  result = localisation.localisation_metrics(
    np.array([[[0.7, 0.1, 0.1, 0.1]]]), boxes, np.array([1])
  )
  assert result["mass_inside"] == [pytest.approx(0.1)]
  assert result["box_area"] == pytest.approx(0.25)


def test_matches_a_brute_force_count_on_random_boxes():
  rng = np.random.default_rng(0)
  num_images, grid = 4, 7
  corners = np.sort(rng.random((num_images, 3, 2, 2)), axis=2)  # (N, M, [min, max], [y, x])
  boxes = np.stack(
    [corners[:, :, 0, 0], corners[:, :, 0, 1], corners[:, :, 1, 0], corners[:, :, 1, 1]], -1
  )
  num_boxes = np.array([1, 2, 3, 3])
  attention = rng.random((num_images, 2, grid * grid))
  attention /= attention.sum(axis=2, keepdims=True)
  per_image = localisation.localisation_per_image(attention, boxes, num_boxes)
  # Brute force on a fine raster: 700 x 700 sample points, 100 x 100 per cell.
  samples = (np.arange(700) + 0.5) / 700
  for n in range(num_images):
    inside = np.zeros((700, 700), bool)
    for ymin, xmin, ymax, xmax in boxes[n, : num_boxes[n]]:
      inside |= (
        (samples[:, None] >= ymin)
        & (samples[:, None] <= ymax)
        & (samples[None, :] >= xmin)
        & (samples[None, :] <= xmax)
      )
    coverage = inside.reshape(grid, 100, grid, 100).mean(axis=(1, 3)).reshape(-1)
    assert per_image["box_area"][n] == pytest.approx(inside.mean(), abs=5e-3)
    np.testing.assert_allclose(per_image["mass_inside"][n], attention[n] @ coverage, atol=5e-3)


def test_invalid_inputs():
  boxes, num_boxes = pad_boxes([[(0.5, 0.5, 0.2, 1.0)]])
  with pytest.raises(ValueError, match="ymin <= ymax"):
    localisation.localisation_metrics(np.full((1, 1, 4), 0.25), boxes, num_boxes)
  boxes, num_boxes = pad_boxes([[(0.0, 0.0, 1.0, 1.0)]])
  with pytest.raises(ValueError, match="num_boxes must lie in 0..3"):
    localisation.localisation_metrics(np.full((1, 1, 4), 0.25), boxes, np.array([4]))
  with pytest.raises(ValueError, match="L=5"):
    localisation.localisation_metrics(np.full((1, 1, 5), 0.2), boxes, num_boxes)
  with pytest.raises(ValueError, match=r"\(N, T, L\)"):
    localisation.localisation_metrics(np.full((1, 4), 0.25), boxes, num_boxes)
  with pytest.raises(ValueError, match="mask"):
    localisation.localisation_metrics(np.full((1, 1, 4), 0.25), boxes, num_boxes, mask=np.ones(2))
