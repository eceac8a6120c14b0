"""TensorBoard logging: scalars, per-class IoU, prediction images and the confusion matrix.

Writes to ``<model_dir>/logs/train`` and ``<model_dir>/logs/validation``, one
step per epoch (step = epoch index, 0-based, as Keras' own callback):

* scalars: every numeric Keras log (``loss``, ``aerial_loss``, ``miou``, ...;
  ``val_*`` keys go to `validation` without the prefix), ``learning_rate``,
  ``steps_per_second`` / ``examples_per_second`` (train), and
  ``iou/<class name>`` plus ``overall_accuracy`` from the confusion matrix;
* image ``patches``: for a fixed set of validation patches, RGB | label |
  prediction side by side, labels in the FLAIR colours;
* image ``confusion_matrix``: the row-normalised matrix as a heat map with
  class indices and per-cent values, rendered with PIL (no matplotlib).
"""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from flair_tf import nomenclature, scoring
from flair_tf.training.metrics import ConfusionMatrixMetric


def render_patches(aerial: np.ndarray, labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """RGB | label | prediction strips, uint8 [N, H, 3W + 2 gaps, 3].

    Args:
      aerial: [N, H, W, C] uint8 (or float in 0..255) input patches; the first
        three channels are shown as RGB (one channel: grey).
      labels: [N, H, W] class indices.
      preds: [N, H, W] predicted class indices.
      num_classes: 13 or 19 (for the palette).
    """
    rgb = np.asarray(aerial)
    rgb = np.repeat(rgb[..., :1], 3, -1) if rgb.shape[-1] < 3 else rgb[..., :3]
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    n, h = rgb.shape[:2]
    gap = np.full((n, h, 2, 3), 255, np.uint8)
    lab = nomenclature.colorize(np.asarray(labels), num_classes)
    prd = nomenclature.colorize(np.asarray(preds), num_classes)
    return np.concatenate([rgb, gap, lab, gap, prd], axis=2)


def render_confusion_matrix(cm: np.ndarray, cell: int = 28) -> np.ndarray:
    """Row-normalised confusion matrix as a heat map, uint8 [1, S, S, 3].

    Rows = truth, columns = prediction; cells are shaded white -> dark blue
    by the share of the row's pixels and print that share in per cent.
    Row and column headers are the class indices ("t\\p" in the corner: truth
    down, prediction across).
    """
    cm = np.asarray(cm, dtype=np.float64)
    c = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = cell * (c + 1)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.text((3, 8), "t\\p", fill="grey")  # rows: truth, columns: prediction
    for i in range(c):
        draw.text((cell * (i + 1) + 4, 8), str(i), fill="black")
        draw.text((6, cell * (i + 1) + 8), str(i), fill="black")
        for j in range(c):
            v = share[i, j]
            colour = tuple(int(255 - v * (255 - t)) for t in (8, 48, 107))
            x0, y0 = cell * (j + 1), cell * (i + 1)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(220, 220, 220))
            if v >= 0.005:
                draw.text((x0 + 3, y0 + 8), f"{100 * v:.0f}", fill="white" if v > 0.5 else "black")
    return np.asarray(img, dtype=np.uint8)[None]


class FlairTensorBoard(keras.callbacks.Callback):
    """Epoch-level TensorBoard summaries for FLAIR training (chief only).

    Args:
      log_dir: ``<model_dir>/logs``.
      cm_metric: the compiled `ConfusionMatrixMetric` (its state is the
        training matrix when validation starts, the validation matrix at
        epoch end).
      image_batch: (features, labels) numpy dicts of the fixed validation
        patches, or None for no images.
      global_batch_size: to turn steps/s into examples/s.
      chief: False on non-chief workers (they write nothing).
    """

    def __init__(
        self,
        log_dir: str,
        cm_metric: ConfusionMatrixMetric | None,
        image_batch: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
        global_batch_size: int | None = None,
        chief: bool = True,
    ):
        super().__init__()
        self.log_dir, self.cm_metric, self.image_batch = log_dir, cm_metric, image_batch
        self.global_batch_size, self.chief = global_batch_size, chief
        self._writers: dict[str, Any] = {}
        self._train_cm: np.ndarray | None = None
        self._t0 = 0.0
        self._train_seconds = 0.0
        self._steps = 0
        self._lr = float("nan")
        self.throughput: list[dict[str, float]] = []

    def _writer(self, split: str):
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(tf.io.gfile.join(self.log_dir, split))
        return self._writers[split]

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.monotonic()
        self._steps = 0
        self._train_seconds = 0.0
        self._train_cm = None
        self._lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1

    def on_test_begin(self, logs=None):
        # Called before evaluate() resets the metrics: keep the training matrix.
        if self._t0 and not self._train_seconds:
            self._train_seconds = time.monotonic() - self._t0
            if self.cm_metric is not None:
                self._train_cm = self.cm_metric.confusion_matrix()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if not self._train_seconds:  # no validation this epoch
            self._train_seconds = time.monotonic() - self._t0
            if self.cm_metric is not None:
                self._train_cm = self.cm_metric.confusion_matrix()
        has_val = any(k.startswith("val_") for k in logs)
        rate = {"steps_per_second": self._steps / max(self._train_seconds, 1e-9)}
        if self.global_batch_size:
            rate["examples_per_second"] = rate["steps_per_second"] * self.global_batch_size
        self.throughput.append(rate)
        # Read on every worker: under MultiWorkerMirroredStrategy reading the matrix is a
        # collective all workers must join.
        val_cm = self.cm_metric.confusion_matrix() if has_val and self.cm_metric is not None else None
        if not self.chief:
            return
        with self._writer("train").as_default(step=epoch):
            for k, v in logs.items():
                if not k.startswith("val_"):
                    tf.summary.scalar(k, float(v))
            tf.summary.scalar("learning_rate", self._lr)
            for k, v in rate.items():
                tf.summary.scalar(k, v)
            if self._train_cm is not None:
                self._write_cm_scalars(self._train_cm)
        if has_val:
            with self._writer("validation").as_default(step=epoch):
                for k, v in logs.items():
                    if k.startswith("val_"):
                        tf.summary.scalar(k[4:], float(v))
                if val_cm is not None:
                    self._write_cm_scalars(val_cm)
                    tf.summary.image("confusion_matrix", render_confusion_matrix(val_cm), step=epoch)
                if self.image_batch is not None:
                    self._write_images(epoch)
        for w in self._writers.values():
            w.flush()

    def _write_cm_scalars(self, cm: np.ndarray) -> None:
        scores = scoring.scores(cm, self.cm_metric.convention)
        for name, iou in zip(scores["class_names"], scores["per_class_iou"]):
            if iou == iou:  # NaN: class absent from truth and prediction
                tf.summary.scalar(f"iou/{name}", iou)
        if scores["overall_accuracy"] == scores["overall_accuracy"]:
            tf.summary.scalar("overall_accuracy", scores["overall_accuracy"])

    def _write_images(self, epoch: int) -> None:
        features, labels = self.image_batch
        outputs = self.model(features, training=False)
        logits = outputs["aerial"] if isinstance(outputs, dict) else outputs
        preds = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        num_classes = self.cm_metric.num_classes if self.cm_metric is not None else 13
        strips = render_patches(features["aerial"], labels["aerial"], preds, num_classes)
        tf.summary.image("patches", strips, step=epoch, max_outputs=len(strips))

    def on_train_end(self, logs=None):
        for w in self._writers.values():
            w.close()
        self._writers = {}
