"""Heat maps: matplotlib's jet colours, normalisation, upsampling position, panel layout."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from privattnet_jax.inference import heatmaps


def peaked(num_locations, peak, steps=1):
  attention = np.full((steps, num_locations), 0.01)
  attention[:, peak] = 1.0
  return attention / attention.sum(axis=1, keepdims=True)


class TestJet:
  def test_table_is_matplotlibs_jet_at_every_level(self):
    levels = np.arange(256)
    expected = matplotlib.colormaps["jet"](levels, bytes=True)[:, :3]
    np.testing.assert_array_equal(heatmaps.colourise(levels.astype(np.uint8)), expected)
    np.testing.assert_array_equal(heatmaps.jet_lut(), expected)
    assert heatmaps.jet_lut().dtype == np.uint8

  def test_colourise_keeps_the_image_shape_and_wants_uint8(self):
    intensity = np.array([[0, 255], [128, 64]], np.uint8)
    colours = heatmaps.colourise(intensity)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [0, 0, 127]  # Dark blue at 0, dark red at 255.
    assert colours[0, 1].tolist() == [127, 0, 0]
    with pytest.raises(ValueError, match="uint8"):
      heatmaps.colourise(np.array([0.5]))

  def test_table_cannot_be_changed_by_a_caller(self):
    with pytest.raises(ValueError, match="read-only"):
      heatmaps.jet_lut()[0] = 0


class TestGrid:
  def test_square_inferred(self):
    assert heatmaps.infer_grid_shape(196) == (14, 14)
    assert heatmaps.infer_grid_shape(12, (3, 4)) == (3, 4)

  def test_non_square_needs_shape(self):
    with pytest.raises(ValueError, match="not a square grid"):
      heatmaps.infer_grid_shape(12)

  def test_mismatched_shape(self):
    with pytest.raises(ValueError, match=r"does not hold the attention's L=12"):
      heatmaps.infer_grid_shape(12, (3, 5))

  def test_overlays_reject_mismatched_attention(self):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="L=15"):
      heatmaps.attention_overlays(image, np.ones((2, 15)) / 15)
    with pytest.raises(ValueError, match=r"\(T, L\)"):
      heatmaps.attention_overlays(image, np.ones(16) / 16)
    with pytest.raises(ValueError, match="uint8"):
      heatmaps.attention_overlays(image.astype(np.float32), np.ones((1, 16)) / 16)
    with pytest.raises(ValueError, match="non-finite"):
      heatmaps.attention_overlays(image, np.full((1, 16), np.nan))


class TestNormalisation:
  def test_per_map_and_global_by_hand(self):
    attention = np.array([[0.1, 0.3, 0.5], [0.2, 0.2, 0.3]])
    np.testing.assert_allclose(
      heatmaps.normalise_attention(attention, "per_map"), [[0.0, 0.5, 1.0], [0.0, 0.0, 1.0]]
    )
    np.testing.assert_allclose(
      heatmaps.normalise_attention(attention, "global"), [[0.0, 0.5, 1.0], [0.25, 0.25, 0.5]]
    )

  def test_constant_map_is_zero(self):
    np.testing.assert_array_equal(
      heatmaps.normalise_attention(np.full((2, 4), 0.25)), np.zeros((2, 4))
    )
    np.testing.assert_array_equal(
      heatmaps.normalise_attention(np.full((2, 4), 0.25), "global"), np.zeros((2, 4))
    )

  def test_unknown_option(self):
    with pytest.raises(ValueError, match="per_map"):
      heatmaps.normalise_attention(np.ones((1, 4)), "local")

  def test_weaker_step_is_cooler_only_under_global(self):
    strong = np.linspace(0.0, 1.0, 16)
    attention = np.stack([strong, 0.1 * strong])  # Same shape, a tenth of the contrast.
    per_map = heatmaps.attention_intensity(attention, (8, 8), normalisation="per_map")
    global_ = heatmaps.attention_intensity(attention, (8, 8), normalisation="global")
    np.testing.assert_array_equal(per_map[0], per_map[1])
    np.testing.assert_array_equal(global_[0], per_map[0])
    assert (
      global_[1].max() <= 26 < global_[0].max()
    )  # 0.1 * 255 truncates to 25; bicubic may add one.
    image = np.full((8, 8, 3), 128, np.uint8)
    per_map_overlays = heatmaps.attention_overlays(image, attention, normalisation="per_map")
    global_overlays = heatmaps.attention_overlays(image, attention, normalisation="global")
    np.testing.assert_array_equal(per_map_overlays[1], per_map_overlays[0])
    assert not np.array_equal(global_overlays[1], per_map_overlays[1])
    # Under global, the weak step's hottest pixel stays in jet's blue end.
    hottest = global_overlays[1].reshape(-1, 3)[np.argmax(global_[1])]
    assert hottest[2] > hottest[0]


class TestPeak:
  @pytest.mark.parametrize(
    "grid_shape,image_size,peak_cell",
    [
      ((4, 4), (32, 32), (1, 2)),
      ((2, 4), (20, 40), (1, 3)),
    ],
  )
  def test_hottest_pixel_in_peak_cell(self, grid_shape, image_size, peak_cell):
    grid_height, grid_width = grid_shape
    height, width = image_size
    peak = peak_cell[0] * grid_width + peak_cell[1]
    attention = peaked(grid_height * grid_width, peak)
    intensity = heatmaps.attention_intensity(attention, image_size, grid_shape)[0]
    assert intensity.shape == image_size
    row, column = np.unravel_index(np.argmax(intensity), intensity.shape)
    cell_height, cell_width = height // grid_height, width // grid_width
    assert peak_cell[0] * cell_height <= row < (peak_cell[0] + 1) * cell_height
    assert peak_cell[1] * cell_width <= column < (peak_cell[1] + 1) * cell_width
    assert intensity[row, column] >= 240

    image = np.full((height, width, 3), 128, np.uint8)
    overlay = heatmaps.attention_overlays(image, attention, grid_shape)[0]
    expected = np.rint(0.5 * 128 + 0.5 * heatmaps.jet_lut()[intensity[row, column]].astype(float))
    np.testing.assert_array_equal(overlay[row, column], expected)
    assert overlay[row, column, 0] > overlay[row, column, 2]  # Red end of jet at the peak.
    far = (0 if row >= height // 2 else height - 1, 0 if column >= width // 2 else width - 1)
    assert overlay[far][2] > overlay[far][0]  # Blue end at the corner farthest from the peak.


class TestPanel:
  def test_layout(self):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    attention = rng.random((3, 16))
    panel = heatmaps.attention_panel(image, attention, score=2.5)
    assert isinstance(panel, Image.Image) and panel.mode == "RGB"
    assert panel.size == (20 * 4, 24 + heatmaps.CAPTION_HEIGHT)
    pixels = np.asarray(panel)
    top = heatmaps.CAPTION_HEIGHT
    np.testing.assert_array_equal(pixels[top:, :20], image)
    for step, overlay in enumerate(heatmaps.attention_overlays(image, attention)):
      np.testing.assert_array_equal(pixels[top:, 20 * (step + 1) : 20 * (step + 2)], overlay)
    # Captions are drawn: the strip is not plain background.
    assert (pixels[:top] != heatmaps.CAPTION_BACKGROUND).any()

  def test_title_adds_a_strip_and_text_changes_with_score(self):
    image = np.zeros((40, 64, 3), np.uint8)
    attention = peaked(16, 5, steps=2)
    with_title = heatmaps.attention_panel(image, attention, score=1.0, title="photo.jpg")
    assert with_title.size == (64 * 3, 40 + 2 * heatmaps.CAPTION_HEIGHT)
    strips = np.asarray(with_title)[: 2 * heatmaps.CAPTION_HEIGHT].reshape(
      2, heatmaps.CAPTION_HEIGHT, -1, 3
    )
    without_title = np.asarray(heatmaps.attention_panel(image, attention, score=1.0))
    assert (strips[0] != heatmaps.CAPTION_BACKGROUND).any()  # The title ...
    np.testing.assert_array_equal(
      strips[1], without_title[: heatmaps.CAPTION_HEIGHT]
    )  # ... above the captions.
    a = np.asarray(heatmaps.attention_panel(image, attention, score=1.0))
    b = np.asarray(heatmaps.attention_panel(image, attention, score=4.0))
    strip = slice(0, heatmaps.CAPTION_HEIGHT)
    assert not np.array_equal(a[strip, :64], b[strip, :64])
    np.testing.assert_array_equal(a[heatmaps.CAPTION_HEIGHT :], b[heatmaps.CAPTION_HEIGHT :])

  def test_step_scores_must_match_steps(self):
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="2 step scores for 3"):
      heatmaps.attention_panel(image, np.ones((3, 4)) / 4, step_scores=[1.0, 2.0])

  def test_global_option_reaches_the_panel(self):
    image = np.full((16, 16, 3), 128, np.uint8)
    strong = np.linspace(0.0, 1.0, 16)
    attention = np.stack([strong, 0.1 * strong])
    per_map = np.asarray(heatmaps.attention_panel(image, attention))
    global_ = np.asarray(heatmaps.attention_panel(image, attention, normalisation="global"))
    top = heatmaps.CAPTION_HEIGHT
    np.testing.assert_array_equal(per_map[top:, 16:32], global_[top:, 16:32])
    assert not np.array_equal(per_map[top:, 32:], global_[top:, 32:])
