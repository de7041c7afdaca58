"""The evaluation report: the paper's table, a scatter plot, errors by group, examples.

`write_report` writes `report.md` (its images as PNG files in `report_files/`)
and `report.html`, which is self-contained: every image is embedded as a
base64 PNG data URI. Both are rendered from one list of blocks, so they hold
the same content. `compare_table` / `write_comparison` put several runs in one
table for `--mode=compare`. The paper's published rows always sit beside the
measured ones, marked as published: they are copied, never rerun.

Metrics dicts are those of `eval_<split>.json`: keys `l1`, `mse`, `pearson`,
`spearman`, `n`; other scalar keys (e.g. `map`) are listed below the table.
The scatter plot is matplotlib's (imported when it is drawn); images are Pillow's.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from privattnet_jax.data import attributes

METRIC_KEYS = ("l1", "pearson", "spearman", "mse")
TABLE_HEADERS = ("method", "L1", "Pearson", "Spearman", "MSE", "n", "source")
PUBLISHED_SOURCE = "published, VISPR test"
MEASURED_SOURCE = "measured here"
PUBLISHED_NOTE = (
  f"Rows marked *{PUBLISHED_SOURCE}* are copied from the PrivAttNet paper (ICPR 2020; AP-PR and "
  "PR-CNN from Orekondy et al. 2017), not rerun here. The paper does not state the scale of its "
  "L1 column, so compare it with care."
)
ASSETS_DIR = "report_files"
MISSING = "–"


@dataclasses.dataclass(frozen=True)
class PublishedRow:
  """One row of the paper's table, kept as printed (strings keep the paper's precision)."""

  method: str
  l1: str
  pearson: str | None = None
  spearman: str | None = None


PUBLISHED_RESULTS = (
  PublishedRow("AP-PR (Orekondy 2017)", "0.656"),
  PublishedRow("PR-CNN (Orekondy 2017)", "0.637"),
  PublishedRow("PrivAttNet", "0.40", "0.87", "0.84"),
  PublishedRow("PrivAttNet_MLC", "0.44", "0.83", "0.76"),
  PublishedRow("PrivNet", "0.43", "0.83", "0.78"),
)

# The scatter plot: its size in pixels, at SCATTER_DPI (matplotlib's text sizes are in points).
SCATTER_SIZE = (420, 420)
SCATTER_DPI = 100
POINT_COLOUR = "tab:blue"
DIAGONAL_COLOUR = "tab:red"


def format_value(value, digits: int = 3) -> str:
  """A table cell: `–` for a missing value, `nan` for NaN, else `digits` decimals."""
  if value is None:
    return MISSING
  if isinstance(value, str):
    return value
  value = float(value)
  if math.isnan(value):
    return "nan"
  return f"{value:.{digits}f}"


def _measured_row(name: str, metrics: Mapping, source: str) -> list[str]:
  n = metrics.get("n")
  return [
    name,
    *(format_value(metrics.get(k)) for k in METRIC_KEYS),
    MISSING if n is None else str(int(n)),
    source,
  ]


def _published_rows() -> list[list[str]]:
  return [
    [
      r.method,
      r.l1,
      r.pearson or MISSING,
      r.spearman or MISSING,
      MISSING,
      MISSING,
      PUBLISHED_SOURCE,
    ]
    for r in PUBLISHED_RESULTS
  ]


def results_rows(
  runs: Sequence[tuple[str, Mapping]], source: str = MEASURED_SOURCE
) -> list[list[str]]:
  """Rows of the paper-style table: each run (in the given order), then the published rows."""
  return [_measured_row(name, metrics, source) for name, metrics in runs] + _published_rows()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-flavoured markdown table; `|` inside cells is escaped."""

  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

  return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)])


def compare_table(runs: Sequence[tuple[str, Mapping]]) -> str:
  """Markdown: one row per run (name, metrics), then the paper's published rows, marked."""
  return markdown_table(TABLE_HEADERS, results_rows(runs))


def write_comparison(out_path, runs: Sequence[tuple[str, Mapping]]) -> pathlib.Path:
  """Writes the comparison of several runs beside the published numbers as markdown."""
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  text = "\n\n".join(
    ["# Comparison of runs", compare_table(runs), PUBLISHED_NOTE, _other_metrics_text(runs)]
  )
  out_path.write_text(text.rstrip() + "\n")
  return out_path


def _other_metrics_text(runs: Sequence[tuple[str, Mapping]]) -> str:
  lines = []
  for name, metrics in runs:
    extra = {
      k: v
      for k, v in metrics.items()
      if k not in (*METRIC_KEYS, "n") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if extra:
      lines.append(
        f"- {name}: " + ", ".join(f"{k} {format_value(v)}" for k, v in sorted(extra.items()))
      )
  return ("Other metrics:\n\n" + "\n".join(lines)) if lines else ""


def _scores(values, name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim == 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.ndim != 1:
    raise ValueError(f"{name} must be one score per image, (N,); got shape {array.shape}")
  return array


def errors_by_group(predictions, targets, labels) -> list[dict]:
  """Mean absolute error of the images carrying an attribute of each group (attributes.tsv order).

  An image counts in every group it carries an attribute of; `Safe` holds the
  images labelled `a0_safe`. Groups without images get n = 0 and None values.
  """
  predictions, targets = _scores(predictions, "predictions"), _scores(targets, "targets")
  labels = np.asarray(labels, dtype=bool)
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ")
  if labels.shape != (len(targets), attributes.NUM_ATTRIBUTES):
    raise ValueError(
      f"labels must be (N={len(targets)}, {attributes.NUM_ATTRIBUTES}); got {labels.shape}"
    )
  groups: dict[str, list[int]] = {}
  for attribute in attributes.load_attributes():
    groups.setdefault(attribute.group, []).append(attribute.index)
  errors = np.abs(predictions - targets)
  result = []
  for group, indices in groups.items():
    carries = labels[:, indices].any(axis=1)
    n = int(carries.sum())
    result.append(
      {
        "group": group,
        "n": n,
        "mae": float(errors[carries].mean()) if n else None,
        "mean_target": float(targets[carries].mean()) if n else None,
        "mean_prediction": float(predictions[carries].mean()) if n else None,
      }
    )
  return result


def select_examples(predictions, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the k most risky (highest predicted score first) and k least risky (lowest first).

  The two never overlap: with fewer than 2k images the least risky list gets what is left.
  """
  predictions = _scores(predictions, "predictions")
  order = np.argsort(-predictions, kind="stable")
  k = max(0, min(int(k), len(order)))
  return order[:k], order[k:][::-1][:k]


def scatter_plot(
  predictions,
  targets,
  *,
  title: str = "",
  value_range: tuple[float, float] | None = None,
  size: tuple[int, int] = SCATTER_SIZE,
) -> Image.Image:
  """Predicted (y) against true (x) scores with the y = x line, so misses show as distance from it.

  Both axes share one range (the data's, padded by 5%, unless value_range is
  given), so the line runs corner to corner. Non-finite pairs are not drawn.
  Points are translucent so dense regions show darker. Drawn with matplotlib's
  object API on its Agg canvas: no pyplot, no process-wide backend.
  """
  predictions, targets = _scores(predictions, "predictions"), _scores(targets, "targets")
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ")
  if value_range is not None and not value_range[1] > value_range[0]:
    raise ValueError(f"value_range must be (low, high) with low < high; got {tuple(value_range)}")
  finite = np.isfinite(predictions) & np.isfinite(targets)
  predictions, targets = predictions[finite], targets[finite]
  # Imported here: only the report draws plots, and matplotlib's import is most of its cost.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(size[0] / SCATTER_DPI, size[1] / SCATTER_DPI), dpi=SCATTER_DPI)
  canvas = FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  axes.scatter(targets, predictions, s=12, color=POINT_COLOUR, alpha=0.5, linewidths=0)
  if value_range is None:
    # The mirrored points make each axis's data limits span both scores; autoscaling pads by 5%.
    axes.update_datalim(np.column_stack([predictions, targets]))
    axes.autoscale_view()
    low, high = axes.get_xlim()
    axes.set_ylim(low, high)
  else:
    axes.set_xlim(value_range)
    axes.set_ylim(value_range)
  axes.axline((0, 0), slope=1, color=DIAGONAL_COLOUR, linewidth=1)
  axes.set_aspect("equal")
  axes.set_xlabel("true score")
  axes.set_ylabel("predicted score")
  heading = title or "predicted vs true score"
  heading += f" (n={len(targets)}" + (
    f", {int((~finite).sum())} non-finite not drawn)" if (~finite).any() else ")"
  )
  axes.set_title(heading, fontsize="medium")
  figure.subplots_adjust(left=0.15, right=0.95, bottom=0.12, top=0.92)
  canvas.draw()
  return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def localisation_rows(localisation: Mapping) -> list[list[str]]:
  """Rows of the localisation table: one per attention step."""
  rows = []
  for step, (mass, hit) in enumerate(
    zip(localisation["mass_inside"], localisation["pointing_game"])
  ):
    rows.append(
      [
        str(step + 1),
        format_value(mass),
        format_value(localisation["box_area"]),
        format_value(hit),
        format_value(localisation["pointing_chance"]),
      ]
    )
  return rows


LOCALISATION_HEADERS = (
  "step",
  "attention mass in boxes",
  "boxes' share of image",
  "pointing game",
  "pointing chance",
)


REDACTION_HEADERS = ("regions", "mean risk drop", "attention's drop / this")


def redaction_blocks(redaction: Mapping, panels: Sequence = ()) -> list:
  """The report's redaction section: attention against random regions and a centred box.

  The random regions and the box cover the same area as the attention's masks, per image.
  """
  drop = redaction["mean_drop"]
  rows = []
  for name, key in (
    ("attention-guided", "attention"),
    ("random, same area", "random"),
    ("centred box, same area", "centred"),
  ):
    ratio = (
      drop["attention"] / drop[key] if drop[key] > 0 else None
    )  # None: these regions raise the risk.
    rows.append([name, format_value(drop[key]), format_value(ratio)])
  if redaction.get("target_drop"):
    target = f"until {100 * redaction['target_drop']:.0f}% of their score is gone"
  else:
    target = f"until their score is at most {format_value(redaction['target_score'])}"
  text = (
    f"{redaction['num_images']} images with boxes, redacted ({redaction['method']}) greedily along the "
    f"attention {target} or {100 * redaction['max_area']:.0f}% of the image is redacted (reached by "
    f"{100 * redaction['target_reached']:.0f}%; mean area {100 * redaction['mean_area']:.1f}%, mean score "
    f"before {format_value(redaction['mean_score_before'])}). The attention's masks cover "
    f"{100 * redaction['box_coverage']:.0f}% of the boxes' area (boxes: {100 * redaction['box_area']:.1f}% "
    "of the images); random regions and a centred box of the same area per image for comparison."
  )
  blocks = [("heading", 2, "Redaction"), _text(text), ("table", REDACTION_HEADERS, rows)]
  for index, panel in enumerate(panels):
    blocks.append(("image", "before and after redaction", _to_pil(panel), f"redaction_{index:03d}"))
  return blocks


# Report blocks: ("heading", level, text) | ("text", markdown_text, html_text) | ("table", headers, rows)
# | ("image", alt, PIL image, file stem); rendered with the PIL image's PNG bytes in its place.
def _to_pil(panel) -> Image.Image:
  if isinstance(panel, Image.Image):
    return panel.convert("RGB")
  array = np.asarray(panel)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(
      f"an example panel must be a PIL image or uint8 (H, W, 3); got {array.dtype} {array.shape}"
    )
  return Image.fromarray(array, mode="RGB")


def _png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _safe_stem(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "image"


def _image_id(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _render_markdown(blocks, assets_dir: pathlib.Path) -> str:
  parts = []
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      parts.append("#" * block[1] + " " + block[2])
    elif kind == "text":
      parts.append(block[1])
    elif kind == "table":
      parts.append(markdown_table(block[1], block[2]))
    elif kind == "image":
      _, alt, png, stem = block
      assets_dir.mkdir(parents=True, exist_ok=True)
      (assets_dir / f"{stem}.png").write_bytes(png)
      parts.append(f"![{alt}]({ASSETS_DIR}/{stem}.png)")
  return "\n\n".join(parts) + "\n"


def _render_html(blocks, title: str) -> str:
  body = []
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
    elif kind == "text":
      body.append(f"<p>{block[2]}</p>")
    elif kind == "table":
      head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
      rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2]
      )
      body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    elif kind == "image":
      _, alt, png, _ = block
      data = base64.b64encode(png).decode("ascii")
      body.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
  style = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:3px 8px;"
    "text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}"
  )
  return (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
    + "\n".join(body)
    + "\n</body>\n</html>\n"
  )


def _text(markdown_text: str, html_text: str | None = None):
  return ("text", markdown_text, html_text if html_text is not None else html.escape(markdown_text))


def write_report(
  out_dir,
  *,
  method_name: str,
  metrics: Mapping,
  predictions,
  targets,
  labels,
  examples: Sequence[Mapping] = (),
  localisation: Mapping | None = None,
  split: str = "test",
  value_range: tuple[float, float] | None = None,
  redaction: Mapping | None = None,
  redaction_examples: Sequence = (),
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `report.md` (+ `report_files/*.png`) and a self-contained `report.html` into out_dir.

  Args:
    out_dir: the folder to write into (created).
    method_name: the model variant's name, the first cell of its table row.
    metrics: the split's metrics (`l1`, `mse`, `pearson`, `spearman`, `n`, optional extras).
    predictions: (N,) predicted privacy scores of the split's images.
    targets: (N,) true scores.
    labels: (N, 68) bool attribute labels, for the errors by attribute group.
    examples: dicts with `image_id`, `score` (predicted), `target` (or None),
      `panel` (PIL image or uint8 array, e.g. `heatmaps.attention_panel`) and
      `kind`: `most` or `least` risky (anything else is listed under "Other
      examples"). `select_examples` picks which images to render.
    localisation: `localisation.localisation_metrics` output, when the data has boxes.
    split: the evaluated split's name, for the headings.
    value_range: fixes the scatter plot's axis range (e.g. (0, 5)); the data's by default.
    redaction: `redaction_quality.redaction_quality`'s summary, when the data has boxes.
    redaction_examples: before/after panels (PIL images) of the redaction.

  Returns:
    The paths of report.md and report.html.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  predictions, targets = _scores(predictions, "predictions"), _scores(targets, "targets")
  group_errors = errors_by_group(predictions, targets, labels)
  title = f"{method_name}: evaluation on {split}"
  blocks: list = [("heading", 1, title), ("heading", 2, "Results")]
  blocks.append(
    ("table", TABLE_HEADERS, results_rows([(method_name, metrics)], f"{MEASURED_SOURCE}, {split}"))
  )
  blocks.append(
    _text(
      PUBLISHED_NOTE,
      html.escape(PUBLISHED_NOTE).replace(f"*{PUBLISHED_SOURCE}*", f"<em>{PUBLISHED_SOURCE}</em>"),
    )
  )
  other = _other_metrics_text([(method_name, metrics)])
  if other:
    blocks.append(
      _text(other, "<br>".join(html.escape(line) for line in other.splitlines() if line))
    )

  blocks += [
    ("heading", 2, "Predicted against true scores"),
    (
      "image",
      "scatter plot of predicted against true scores",
      scatter_plot(predictions, targets, title=f"{method_name}, {split}", value_range=value_range),
      "scatter",
    ),
  ]

  blocks.append(("heading", 2, "Errors by attribute group"))
  blocks.append(
    _text(
      "Mean absolute error of the images that carry at least one attribute of the group "
      "(an image counts in each of its groups; Safe: images labelled a0_safe)."
    )
  )
  blocks.append(
    (
      "table",
      ("group", "images", "MAE", "mean true", "mean predicted"),
      [
        [
          g["group"],
          str(g["n"]),
          format_value(g["mae"]),
          format_value(g["mean_target"]),
          format_value(g["mean_prediction"]),
        ]
        for g in group_errors
      ],
    )
  )

  if localisation is not None:
    blocks.append(("heading", 2, "Attention localisation"))
    blocks.append(
      _text(
        f"Over the {localisation['num_images']} images with ground-truth boxes "
        f"({localisation['num_without_boxes']} images without boxes excluded). Mass in boxes against the "
        "boxes' share of the image (the level of uniform attention); pointing game: the most attended "
        "cell's centre lies in a box, against the share of cells whose centre does (chance)."
      )
    )
    blocks.append(("table", LOCALISATION_HEADERS, localisation_rows(localisation)))

  if redaction is not None:
    blocks += redaction_blocks(redaction, redaction_examples)

  sections = {"most": "Most risky images", "least": "Least risky images"}
  grouped: dict[str, list[Mapping]] = {}
  for example in examples:
    grouped.setdefault(
      example.get("kind") if example.get("kind") in sections else "other", []
    ).append(example)
  if examples:
    blocks.append(("heading", 2, f"Most and least risky {split} images (by predicted score)"))
  counter = 0
  for kind in ("most", "least", "other"):
    if kind not in grouped:
      continue
    blocks.append(("heading", 3, sections.get(kind, "Other examples")))
    for rank, example in enumerate(grouped[kind], start=1):
      image_id = _image_id(example["image_id"])
      target = example.get("target")
      caption = (
        f"{rank}. {image_id}: predicted {format_value(example['score'], 2)}, "
        f"true {format_value(target, 2)}"
      )
      blocks.append(("heading", 4, caption))
      blocks.append(
        (
          "image",
          f"attention panel of {image_id}",
          _to_pil(example["panel"]),
          f"example_{counter:03d}_{_safe_stem(image_id)}",
        )
      )
      counter += 1

  # Each image is PNG-encoded once, for both renderings (the encoding is most of a report's time).
  blocks = [(*b[:2], _png_bytes(b[2]), b[3]) if b[0] == "image" else b for b in blocks]
  md_path, html_path = out_dir / "report.md", out_dir / "report.html"
  md_path.write_text(_render_markdown(blocks, out_dir / ASSETS_DIR))
  html_path.write_text(_render_html(blocks, title))
  return md_path, html_path
