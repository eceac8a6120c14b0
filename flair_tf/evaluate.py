"""Scores a trained model on TFRecords: ``python -m flair_tf.evaluate``.

The official FLAIR mIoU (the 13-class challenge convention) and, for models
trained on 19 classes, the later 19-class convention of IGN's library (spec
flair1 §5): per-class IoU, precision, recall and F1, overall accuracy and the
confusion matrix. Every record of the split counts exactly once (the last batch
is padded and the padding masked out). Outputs, in ``--output_dir`` (default
``<model_dir>/evaluation/<split>``)::

    metrics.json            run facts + one score dict per convention
    metrics.md              the per-class tables
    confusion_matrix.npy    the raw summed matrix (13x13 or 19x19, rows = truth)
    confusion_matrix.png    row-normalised heat map

and TensorBoard summaries in ``<model_dir>/logs/evaluation`` (or
``<output_dir>/logs`` when ``--output_dir`` is given).

Example:
  python -m flair_tf.evaluate --model_dir=runs/flair1_unet --data_dir=records --split=test
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable

import numpy as np
from absl import app, flags, logging

from flair_tf import nomenclature, scoring
from flair_tf.progress import Progress

CONVENTIONS = ("13", "19")


def conventions_for(num_classes: int, requested: Iterable[str] | None = None) -> list[str]:
    """The metric conventions that apply to a model with ``num_classes`` outputs.

    A 13-class model can only be scored in the 13-class convention; a 19-class
    model in both (its predictions merged 12..18 -> 12 for the 13-class one).
    Default: the model's own convention, plus the challenge one for 19 classes.

    Raises:
      ValueError: for a convention that does not apply.
    """
    if requested:
        conv = [str(c) for c in requested]
    else:
        conv = ["13"] if num_classes == 13 else ["19", "13"]
    bad = [c for c in conv if c not in CONVENTIONS]
    if bad:
        raise ValueError(f"--nomenclature takes 13 and/or 19. Received: {bad}")
    if num_classes == 13 and "19" in conv:
        raise ValueError(
            "The 19-class convention needs a model trained with 19 classes; this model predicts 13 "
            "(codes >= 13 merged into 'other'), so only --nomenclature=13 applies."
        )
    return list(dict.fromkeys(conv))


def merge_to_13(cm19: np.ndarray) -> np.ndarray:
    """A 19x19 confusion matrix -> the 13x13 one of the challenge remap (indices >= 12 -> 12), both axes."""
    cm19 = np.asarray(cm19)
    if cm19.shape != (19, 19):
        raise ValueError(f"expected a 19x19 matrix. Received: shape={cm19.shape}")
    index = np.minimum(np.arange(19), nomenclature.OTHER_INDEX_13)
    cm13 = np.zeros((13, 13), dtype=np.int64)
    np.add.at(cm13, (index[:, None], index[None, :]), cm19)
    return cm13


def scores_by_convention(cm: np.ndarray, conventions: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Scores of the model's raw confusion matrix (13x13 or 19x19) in each convention."""
    cm = np.asarray(cm, dtype=np.int64)
    out = {}
    for conv in conventions:
        if conv == "13":
            out[conv] = scoring.scores(cm if cm.shape == (13, 13) else merge_to_13(cm), "13")
        else:
            if cm.shape != (19, 19):
                raise ValueError("The 19-class convention needs a 19x19 confusion matrix (a 19-class model)")
            out[conv] = scoring.scores(cm, "19")
    return out


def confusion_matrix_step(model, num_classes: int):
    """A compiled ``step(features, labels) -> flattened confusion matrix [K*K] int64``.

    Counts pixels of examples that are real (``valid``) and labelled
    (``has_label`` when present); labels outside [0, K) -- invalid codes map to
    255 -- are ignored, like ``sklearn.metrics.confusion_matrix(labels=range(K))``.
    """
    import tensorflow as tf

    from flair_tf.inference import model_io

    names = model_io.input_names(model)
    k = num_classes

    @tf.function
    def step(features, labels):
        out = model({n: features[n] for n in names}, training=False)
        pred = tf.argmax(model_io.aerial_logits(model, out), axis=-1, output_type=tf.int32)
        y = tf.cast(labels["aerial"], tf.int32)
        keep = features["valid"]
        if "has_label" in features:
            keep = keep & features["has_label"]
        mask = keep[:, None, None] & (y >= 0) & (y < k) & (pred >= 0) & (pred < k)
        idx = tf.boolean_mask(y * k + pred, mask)
        counts = tf.math.bincount(idx, minlength=k * k, maxlength=k * k, dtype=tf.int64)
        return counts, tf.reduce_sum(tf.cast(keep, tf.int64)), tf.reduce_sum(tf.cast(features["valid"], tf.int64))

    return step


def evaluate_model(model, dataset, num_classes: int, total: int | None = None,
                   progress: bool = True) -> tuple[np.ndarray, int]:
    """Runs ``model`` over ``dataset`` and sums the confusion matrix.

    Args:
      model: contract-D Keras model.
      dataset: batches from :func:`flair_tf.data.pipeline.make_dataset` with
        ``pad_final_batch=True`` (``features["valid"]``), ideally keeping
        ``has_label``.
      num_classes: the model's classes (13 or 19).
      total: records in the split (progress bar).
      progress: show a progress bar.

    Returns:
      ``(confusion matrix [K, K] int64, number of labelled records)``.

    Raises:
      ValueError: if no record has a label.
    """
    step = confusion_matrix_step(model, num_classes)
    cm = np.zeros(num_classes * num_classes, dtype=np.int64)
    labelled = seen = 0
    with Progress(total, desc="evaluate", unit="patch", enabled=progress) as bar:
        for features, labels in dataset:
            counts, n_lab, n_valid = step(features, labels)
            cm += counts.numpy()
            labelled += int(n_lab)
            seen += int(n_valid)
            bar.update(int(n_valid))
    if labelled == 0:
        raise ValueError("No labelled record in this split (test records converted without masks?); "
                         "evaluate a split with labels, or predict it with python -m flair_tf.predict")
    if labelled < seen:
        logging.warning("%d of %d records have no label and were not scored", seen - labelled, seen)
    return cm.reshape(num_classes, num_classes), labelled


def evaluate(model_dir: str | None, data_dir: str, split: str = "val", conventions: Iterable[str] | None = None,
             batch_size: int = 8, output_dir: str | None = None, weights: str | None = None,
             logdir: str | None = None, progress: bool = True, winograd: bool | None = None) -> dict[str, Any]:
    """Evaluates a training run on a split and writes the report (the library entry point).

    Args:
      model_dir: training run folder (contract E); None to take it from ``weights``.
      data_dir: TFRecords folder (with ``dataset_info.json``).
      split: record split ("val", "test"...).
      conventions: metric conventions ("13", "19"); default per :func:`conventions_for`.
      batch_size: evaluation batch size.
      output_dir: report folder; default ``<model_dir>/evaluation/<split>``.
      weights: weights file; default the run's best checkpoint.
      logdir: TensorBoard folder; default ``<model_dir>/logs/evaluation``, or
        ``<output_dir>/logs`` when ``output_dir`` is given.
      progress: progress bar.
      winograd: `model_io.load_model`'s switch (None: on CPU-only machines).

    Returns:
      ``{"conventions": {conv: scores}, "paths": {...}, "num_patches": n, ...}``.
    """
    from flair_tf.inference import model_io, report

    start = time.monotonic()
    run_dir = model_io.run_dir_of(model_dir, weights)
    model_config, data_config = model_io.read_configs(run_dir)  # check before the slow model build
    k = int(model_config.get("num_classes", 13))
    conventions = conventions_for(k, conventions)
    data_k = int(data_config.get("num_classes", k))
    if data_k != k:
        raise ValueError(f"{run_dir}: model_config.json says {k} classes but data_config.json {data_k}; "
                         "the run folder is inconsistent")
    loaded = model_io.load_model(run_dir, weights, winograd=winograd)
    dataset = model_io.eval_dataset(data_dir, split, loaded.data_config, batch_size, keep_keys=("has_label",))
    cm, n = evaluate_model(loaded.model, dataset, k, model_io.split_size(data_dir, split), progress)
    results = scores_by_convention(cm, conventions)
    out_dir = output_dir or os.path.join(run_dir, "evaluation", split)
    logdir = logdir or (os.path.join(output_dir, "logs") if output_dir else os.path.join(run_dir, "logs", "evaluation"))
    header = {"model_dir": run_dir, "weights": loaded.weights, "data_dir": data_dir, "split": split,
              "num_patches": n, "num_classes": k, "arch": loaded.arch}
    paths = report.write_report(out_dir, results, cm, nomenclature.class_names(k), header)
    report.log_to_tensorboard(logdir, results, cm, nomenclature.class_names(k))
    paths["tensorboard"] = logdir
    return {"conventions": results, "paths": paths, "num_patches": n, "num_classes": k,
            "confusion_matrix": cm, "seconds": time.monotonic() - start}


# ------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Flags of ``python -m flair_tf.evaluate`` (safe to call twice)."""
    from flair_tf.inference import define_flag, model_io

    f = flags
    define_flag(f.DEFINE_string, "model_dir", None,
                "Training run folder (model_config.json, data_config.json, checkpoints/).", fv)
    define_flag(f.DEFINE_string, "weights", None,
                "Weights file (.weights.h5); default <model_dir>/checkpoints/best.weights.h5. Without "
                "--model_dir, the run folder is taken from its path.", fv)
    define_flag(f.DEFINE_string, "data_dir", None, "TFRecords folder (with dataset_info.json).", fv)
    define_flag(f.DEFINE_string, "split", "val", "Record split to score (val, or test when converted with masks).", fv)
    define_flag(f.DEFINE_list, "nomenclature", [],
                "Metric conventions: 13 (challenge: 13x13, mIoU over the first 12 classes) and/or 19 "
                "(IGN's later library: 19x19 minus clear cut/mixed/ligneous/other, mean over 15). "
                "Default: 13 for 13-class models, 19,13 for 19-class models.", fv)
    define_flag(f.DEFINE_integer, "batch_size", 8, "Evaluation batch size.", fv)
    define_flag(f.DEFINE_string, "output_dir", None, "Report folder; default <model_dir>/evaluation/<split>.", fv)
    define_flag(f.DEFINE_enum, "winograd", "auto", list(model_io.WINOGRAD_FLAG_VALUES), model_io.WINOGRAD_FLAG_HELP, fv)


def main(argv) -> None:
    del argv
    if not FLAGS.data_dir or not (FLAGS.model_dir or FLAGS.weights):
        raise app.UsageError("--data_dir and --model_dir (or --weights) are required")
    from flair_tf.inference import model_io, report

    result = evaluate(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, FLAGS.nomenclature or None,
                      FLAGS.batch_size, FLAGS.output_dir, FLAGS.weights,
                      winograd=model_io.winograd_setting(FLAGS.winograd))
    for conv, s in result["conventions"].items():
        print(report.markdown_table(s))
    lines = [f"Evaluated {result['num_patches']} patches of split '{FLAGS.split}' in {result['seconds']:.1f} s."]
    for conv, s in result["conventions"].items():
        lines.append(f"  mIoU ({conv}-class convention): {s['miou']:.4f}   "
                     f"overall accuracy {s['overall_accuracy']:.4f}")
    p = result["paths"]
    lines += [f"  metrics:          {p['json']}",
              f"  table:            {p['markdown']}",
              f"  confusion matrix: {p['png']} (+ .npy)",
              f"  TensorBoard:      tensorboard --logdir={p['tensorboard']}"]
    print("\n".join(lines), file=sys.stdout)


def run() -> None:
    """Console script ``flair-tf-evaluate``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
