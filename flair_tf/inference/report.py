"""Evaluation reports: ``metrics.json``, a Markdown table, the confusion matrix (PNG and ``.npy``), TensorBoard.

Everything here works from the score dicts of :func:`flair_tf.scoring.scores`
(one per convention) and the raw confusion matrix, so the same report is made
by ``python -m flair_tf.evaluate`` and by ``tools/compute_miou.py``. The PNG is
drawn with PIL and numpy only (no matplotlib on training machines).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Mapping

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_NPY = "confusion_matrix.npy"
CONFUSION_TITLE = "confusion matrix: rows = truth, % of each row"

_CONVENTION_TITLES = {
    "13": "13-class challenge convention (mIoU over the first 12 classes, 'other' kept in the matrix)",
    "19": "19-class convention of IGN's later library (15 classes: clear cut, mixed, ligneous, other removed)",
}


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def markdown_table(scores: Mapping[str, Any]) -> str:
    """A Markdown table of per-class IoU, precision, recall and F1 (in %), then the averages.

    Args:
      scores: one dict of :func:`flair_tf.scoring.scores`.
    """
    conv = scores["convention"]
    lines = [
        f"### {_CONVENTION_TITLES.get(conv, conv)}",
        "",
        "| class | IoU | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for i, name in enumerate(scores["class_names"]):
        label = name
        if conv == "13" and i == 12:
            label += " (not in the means)"
        cells = [_fmt(scores[f"per_class_{k}"][i]) for k in ("iou", "precision", "recall", "f1")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **mean** | **{_fmt(scores['miou'])}** | {_fmt(scores['mean_precision'])} | "
        f"{_fmt(scores['mean_recall'])} | {_fmt(scores['mean_f1'])} |"
    )
    lines += ["", f"mIoU **{_fmt(scores['miou'])}**, overall accuracy **{_fmt(scores['overall_accuracy'])}** (%)."]
    return "\n".join(lines) + "\n"


def markdown_report(results: Mapping[str, Mapping[str, Any]], header: Mapping[str, Any] | None = None) -> str:
    """The full ``metrics.md``: a header of run facts, then one table per convention."""
    lines = ["# FLAIR evaluation", ""]
    for k, v in (header or {}).items():
        lines.append(f"- {k}: `{v}`")
    if header:
        lines.append("")
    for conv in sorted(results):
        lines.append(markdown_table(results[conv]))
    return "\n".join(lines)


def _blend(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]).round().astype(np.uint8)


def confusion_matrix_image(
    cm: np.ndarray, class_names: list[str], title: str = "", cell: int = 34
) -> Image.Image:
    """Renders a row-normalised confusion matrix (rows = truth) as an RGB image.

    Each cell shows the share of the row's pixels in percent, shaded white ->
    dark blue; rows without pixels stay grey. Columns are labelled by class
    index, rows by index and name.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    if cm.shape != (n, n) or len(class_names) != n:
        raise ValueError(
            f"confusion matrix and class names disagree. Received: shape={cm.shape}, {len(class_names)} names"
        )
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, cm / rows, np.nan)
    font = ImageFont.load_default(size=11)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{i:2d} {name}" for i, name in enumerate(class_names)]
    label_w = max(scratch.textbbox((0, 0), s, font=font)[2] for s in labels) + 12
    top = 44 if title else 26
    width, height = label_w + n * cell + 10, top + n * cell + 26
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    draw.text((label_w, top - 14), "prediction ->", fill="black", font=font)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    for j in range(n):
        draw.text((label_w + j * cell + cell // 2 - 6, top + n * cell + 6), f"{j}", fill="black", font=font)
    for i in range(n):
        y = top + i * cell
        draw.text((4, y + cell // 2 - 6), labels[i], fill="black", font=font)
        for j in range(n):
            x = label_w + j * cell
            v = norm[i, j]
            if np.isnan(v):
                colour = (200, 200, 200)
            else:
                colour = tuple(int(c) for c in _blend(white, blue, np.array([v]))[0])
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(230, 230, 230))
            if not np.isnan(v) and v >= 0.005:
                text = f"{100 * v:.0f}"
                tw = draw.textbbox((0, 0), text, font=font)[2]
                draw.text(
                    (x + (cell - tw) // 2, y + cell // 2 - 6), text, fill="white" if v > 0.5 else "black", font=font
                )
    return img


def _write_bytes(path: str, data: bytes) -> None:
    gfile = _gfile()
    with gfile.GFile(path, "wb") as f:
        f.write(data)


def write_report(
    output_dir: str,
    results: Mapping[str, Mapping[str, Any]],
    confusion_matrix: np.ndarray,
    class_names: list[str],
    header: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Writes ``metrics.json``, ``metrics.md``, ``confusion_matrix.npy`` and ``confusion_matrix.png``.

    Args:
      output_dir: local or ``gs://`` folder (created).
      results: convention ("13"/"19") -> dict of :func:`flair_tf.scoring.scores`.
      confusion_matrix: the raw summed matrix in the model's classes (13x13 or
        19x19, rows = truth), saved unreduced to ``confusion_matrix.npy``.
      class_names: names of its rows.
      header: run facts stored under ``"run"`` in the JSON and listed in the
        Markdown (model, data, split, number of patches...).

    Returns:
      Kind ("json", "markdown", "npy", "png") -> written path.
    """
    gfile = _gfile()
    gfile.makedirs(output_dir)
    paths = {
        "json": os.path.join(output_dir, METRICS_JSON),
        "markdown": os.path.join(output_dir, METRICS_MD),
        "npy": os.path.join(output_dir, CONFUSION_NPY),
        "png": os.path.join(output_dir, CONFUSION_PNG),
    }
    payload = {"run": dict(header or {}), "conventions": {k: dict(v) for k, v in results.items()}}
    _write_bytes(paths["json"], (json.dumps(json_safe(payload), indent=2) + "\n").encode())
    _write_bytes(paths["markdown"], markdown_report(results, header).encode())
    buf = io.BytesIO()
    np.save(buf, np.asarray(confusion_matrix, dtype=np.int64))
    _write_bytes(paths["npy"], buf.getvalue())
    buf = io.BytesIO()
    confusion_matrix_image(confusion_matrix, class_names, CONFUSION_TITLE).save(buf, "PNG")
    _write_bytes(paths["png"], buf.getvalue())
    logging.info("Wrote %s", ", ".join(paths.values()))
    return paths


def log_to_tensorboard(
    logdir: str,
    results: Mapping[str, Mapping[str, Any]],
    confusion_matrix: np.ndarray,
    class_names: list[str],
    step: int = 0,
) -> None:
    """Logs the scores (scalars), the Markdown tables (text) and the confusion matrix (image)."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default(step=step):
        for conv, s in results.items():
            prefix = f"convention_{conv}"
            for key in ("miou", "overall_accuracy", "mean_f1", "mean_precision", "mean_recall"):
                if s[key] is not None and math.isfinite(s[key]):
                    tf.summary.scalar(f"{prefix}/{key}", s[key])
            for name, iou in zip(s["class_names"], s["per_class_iou"]):
                if iou is not None and math.isfinite(iou):
                    tf.summary.scalar(f"{prefix}/iou/{name.replace(' ', '_')}", iou)
            tf.summary.text(f"{prefix}/table", markdown_table(s))
        image = np.asarray(confusion_matrix_image(confusion_matrix, class_names, CONFUSION_TITLE))
        tf.summary.image("confusion_matrix", image[None], max_outputs=1)
    writer.flush()
    writer.close()


def class_map_preview(geotiff: str, png: str, num_classes: int, max_side: int = 1024, nodata: int | None = None) -> str:
    """Writes a colour PNG of an argmax class-map GeoTIFF, decimated to at most ``max_side`` pixels a side.

    The raster is read at the reduced size (nearest neighbour), so memory is
    bounded whatever its size; nodata pixels are white.
    """
    import rasterio
    from rasterio.enums import Resampling

    from flair_tf import nomenclature

    with rasterio.open(geotiff) as src:
        scale = max(src.width, src.height) / max_side
        shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
        classes = src.read(1, out_shape=shape, resampling=Resampling.nearest)
        nodata = src.nodata if nodata is None else nodata
    rgb = nomenclature.colorize(np.where(classes < num_classes, classes, 0), num_classes)
    if nodata is not None:
        rgb[classes == nodata] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    _write_bytes(png, buf.getvalue())
    return png
