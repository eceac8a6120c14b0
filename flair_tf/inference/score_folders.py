"""Scores a folder of ``PRED_*.tif`` against a folder of ``MSK_*.tif``, as the challenges did.

The challenge scripts (spec flair1 §5.1, flair2 §6.1) read every prediction and
mask, built one ``sklearn`` confusion matrix per patch with
``labels=range(13)`` on ``target = MSK - 1; target[target > 12] = 12`` and
summed them. This module does the same with :mod:`flair_tf.scoring`, so a
submission scored here gets the Codalab number, and adds the later 19-class
convention (spec flair1 §5.2).

Files are paired by patch id, not by sort order: ``PRED_000717.tif`` (challenge
naming) or ``PRED_IMG_000717.tif`` (IGN's later library) pairs with
``MSK_000717.tif``. Both folders are searched recursively, so the released
``flair_labels_test/<domain>/<zone>/msk/`` tree works as the mask folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import re
import warnings
from typing import Any

import numpy as np
from absl import logging

from flair_tf import nomenclature, scoring
from flair_tf.progress import Progress

PRED_RE = re.compile(r"^PRED_(?:IMG_)?(\d+)\.tiff?$", re.IGNORECASE)
MASK_RE = re.compile(r"^MSK_(\d+)\.tiff?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class PatchPair:
    """One prediction file and its ground-truth mask."""

    patch_id: str
    pred: str
    mask: str


def _gfile():
    import tensorflow as tf  # Lazy: listing local folders should not pay for TF twice.

    return tf.io.gfile


def find_patch_files(folder: str, pattern: re.Pattern = MASK_RE) -> dict[str, str]:
    """Maps patch id -> path for the files of ``folder`` (recursively) whose name matches.

    Args:
      folder: local or ``gs://`` directory.
      pattern: regular expression with the patch id as its first group.

    Raises:
      FileNotFoundError: if the folder does not exist.
      ValueError: if two files carry the same patch id.
    """
    gfile = _gfile()
    if not gfile.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory (expected a folder of {pattern.pattern} files)")
    found: dict[str, str] = {}
    for root, _, files in gfile.walk(folder):
        for name in files:
            m = pattern.match(name)
            if not m:
                continue
            path = os.path.join(root, name)
            pid = m.group(1)
            if pid in found:
                raise ValueError(
                    f"Two files for patch {pid}: {found[pid]} and {path}. Keep one per patch id."
                )
            found[pid] = path
    return found


def _preview(ids: list[str], n: int = 10) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def pair_folders(pred_dir: str, mask_dir: str) -> list[PatchPair]:
    """Pairs ``PRED_*.tif`` with ``MSK_*.tif`` by patch id, sorted by numeric id.

    Raises:
      ValueError: naming the patches with a prediction but no mask and those
        with a mask but no prediction (the challenge demanded exactly one
        prediction per test patch).
    """
    preds = find_patch_files(pred_dir, PRED_RE)
    masks = find_patch_files(mask_dir, MASK_RE)
    if not preds:
        raise ValueError(f"No PRED_<id>.tif files found under {pred_dir}")
    if not masks:
        raise ValueError(f"No MSK_<id>.tif files found under {mask_dir}")
    no_mask = sorted(set(preds) - set(masks), key=int)
    no_pred = sorted(set(masks) - set(preds), key=int)
    problems = []
    if no_pred:
        problems.append(
            f"{len(no_pred)} mask(s) in {mask_dir} have no prediction in {pred_dir}: "
            + _preview([f"MSK_{i}.tif" for i in no_pred])
        )
    if no_mask:
        problems.append(
            f"{len(no_mask)} prediction(s) in {pred_dir} have no mask in {mask_dir}: "
            + _preview([os.path.basename(preds[i]) for i in no_mask])
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Predict every patch of the split, or point to the matching mask folder."
        )
    return [PatchPair(pid, preds[pid], masks[pid]) for pid in sorted(preds, key=int)]


def read_single_band(path: str) -> np.ndarray:
    """Reads band 1 of a (local or ``gs://``) GeoTIFF/TIFF as a 2-D array."""
    from rasterio.io import MemoryFile

    gfile = _gfile()
    with gfile.GFile(path, "rb") as f:
        data = f.read()
    with MemoryFile(io.BytesIO(data)) as mem, mem.open() as src:
        if src.count != 1:
            raise ValueError(f"{path} has {src.count} bands, expected 1 (a class map)")
        return src.read(1)


def pair_confusion_matrix(
    pair: PatchPair, convention: str = "13", pred_num_classes: int | None = None
) -> np.ndarray:
    """Confusion matrix of one patch in the given convention.

    Args:
      pair: the prediction and mask files.
      convention: "13" (challenge) or "19" (IGN's later library).
      pred_num_classes: number of classes the predictions use (13 or 19);
        defaults to the convention's. 19-class predictions scored in the "13"
        convention are merged like the masks (index >= 12 -> 12).
    """
    n = 13 if convention == "13" else 19
    pred_n = pred_num_classes or n
    if convention == "19" and pred_n != 19:
        raise ValueError(
            "The 19-class convention needs predictions over 19 classes (0..18); "
            f"Received: pred_num_classes={pred_n}. Score 13-class predictions with convention '13'."
        )
    pred = read_single_band(pair.pred)
    codes = read_single_band(pair.mask)
    if pred.shape != codes.shape:
        raise ValueError(
            f"{pair.pred} is {pred.shape[1]}x{pred.shape[0]} but its mask {pair.mask} is "
            f"{codes.shape[1]}x{codes.shape[0]}; predictions must have the patch size"
        )
    if pred.size and int(pred.max()) >= pred_n:
        raise ValueError(
            f"{pair.pred} holds class index {int(pred.max())}, outside 0..{pred_n - 1}. "
            + ("If the model predicts 19 classes, pass pred_num_classes=19 (--pred_num_classes=19)."
               if pred_n == 13 else "Predictions must be 0-based class indices.")
        )
    try:
        target = scoring.target_from_codes(codes, convention)
    except ValueError as e:
        raise ValueError(f"{pair.mask}: {e}") from None
    if convention == "13" and pred_n == 19:
        pred = np.minimum(pred, nomenclature.OTHER_INDEX_13)
    return scoring.confusion_matrix(target, pred, n)


def folder_confusion_matrix(
    pairs: list[PatchPair],
    convention: str = "13",
    pred_num_classes: int | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> np.ndarray:
    """Sum of the per-patch confusion matrices (int64), read with a thread pool."""
    n = 13 if convention == "13" else 19
    total = np.zeros((n, n), dtype=np.int64)
    from rasterio.errors import NotGeoreferencedWarning

    # Set here, not in the reader threads: `catch_warnings` is process-global.
    # Challenge predictions carry no georeferencing by design.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        _accumulate(total, pairs, convention, pred_num_classes, num_workers, progress)
    return total


def _accumulate(total, pairs, convention, pred_num_classes, num_workers, progress) -> None:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool, Progress(
        len(pairs), desc="score", unit="patch", enabled=progress
    ) as bar:
        for cm in pool.map(lambda p: pair_confusion_matrix(p, convention, pred_num_classes), pairs):
            total += cm
            bar.update()


def score_folders(
    pred_dir: str,
    mask_dir: str,
    convention: str = "13",
    pred_num_classes: int | None = None,
    num_workers: int = 4,
    progress: bool = True,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Scores ``PRED_*.tif`` files against ``MSK_*.tif`` files.

    Args:
      pred_dir: folder of predictions (uint8 class indices), searched recursively.
      mask_dir: folder of masks (raw codes 1..19), searched recursively.
      convention: "13" (challenge mIoU over the first 12 classes) or "19".
      pred_num_classes: 13 or 19, the classes the predictions use (defaults to
        the convention's).
      num_workers: reader threads.
      progress: show a progress bar.
      output_dir: if given, ``metrics.json``, ``metrics.md`` and the confusion
        matrix (``.npy``, ``.png``) are written there (see
        :mod:`flair_tf.inference.report`).

    Returns:
      The dict of :func:`flair_tf.scoring.scores` plus ``num_patches``.

    Example:
      >>> s = score_folders("predictions_unet", "flair_labels_test")  # doctest: +SKIP
      >>> round(s["miou"], 4)  # doctest: +SKIP
    """
    pairs = pair_folders(pred_dir, mask_dir)
    logging.info("Scoring %d patches from %s against %s (convention %s)", len(pairs), pred_dir, mask_dir, convention)
    cm = folder_confusion_matrix(pairs, convention, pred_num_classes, num_workers, progress)
    result = scoring.scores(cm, convention)
    result["num_patches"] = len(pairs)
    if output_dir:
        from flair_tf.inference import report

        header = {"predictions": pred_dir, "masks": mask_dir, "num_patches": len(pairs)}
        report.write_report(output_dir, {convention: result}, cm, nomenclature.class_names(cm.shape[0]), header)
    return result
