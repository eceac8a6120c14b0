"""FLAIR scores from a confusion matrix, exactly as the challenges computed them (numpy only).

Two conventions (spec flair1 §5):

* ``"13"`` -- the challenge / Codalab ranking (FLAIR #1 and #2): targets
  ``MSK - 1`` with everything above 12 set to 12, a 13 x 13 confusion matrix
  summed over all patches (rows = truth, columns = prediction),
  ``IoU_c = C_cc / (row_c + col_c - C_cc)`` and **mIoU = nanmean of the first 12
  IoUs**. "other" (index 12) stays in the matrix: predicting class k on an
  "other" pixel is a false positive for k.
* ``"19"`` -- IGN's later library: a 19 x 19 matrix (``MSK - 1``), rows and
  columns of the weight-0 classes (clear cut, mixed, ligneous, other) deleted,
  per-class IoU / precision / recall / F-score with NaN -> 0, averaged over the
  15 remaining classes; overall accuracy = trace / sum of that reduced matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flair_tf import nomenclature

# 0-based indices dropped by the 19-class convention: codes 15, 16, 17, 19.
DROPPED_19 = (14, 15, 16, 18)


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows = truth, columns = prediction), int64.

    Pixels whose target or prediction lies outside [0, num_classes) are ignored,
    like ``sklearn.metrics.confusion_matrix(..., labels=range(num_classes))``.
    """
    t = np.asarray(target, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"target and prediction differ in size: {t.shape} vs {p.shape}")
    ok = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    idx = t[ok] * num_classes + p[ok]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def target_from_codes(codes: np.ndarray, convention: str = "13") -> np.ndarray:
    """Raw mask codes (1..19) -> 0-based targets of the given convention."""
    return nomenclature.remap(codes, 13 if convention == "13" else 19)


def _per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    rows = cm.sum(axis=1)  # truth
    cols = cm.sum(axis=0)  # prediction
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (rows + cols - tp)
        precision = tp / cols
        recall = tp / rows
        f1 = 2 * precision * recall / (precision + recall)
    return {"iou": iou, "precision": precision, "recall": recall, "f1": f1}


def scores(cm: np.ndarray, convention: str = "13") -> dict[str, Any]:
    """All FLAIR scores from a summed confusion matrix.

    Args:
      cm: (13, 13) for convention "13", (19, 19) for convention "19".
      convention: "13" (challenge, the default) or "19" (IGN's later library).

    Returns:
      dict with ``miou``, ``overall_accuracy``, ``mean_f1``, ``mean_precision``,
      ``mean_recall``, ``class_names`` and ``per_class_{iou,precision,recall,f1}``
      (lists, NaN as None in JSON terms left to the caller), and ``confusion_matrix``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if convention == "13":
        if cm.shape != (13, 13):
            raise ValueError(f"convention '13' needs a 13x13 matrix. Received: shape={cm.shape}")
        names = nomenclature.class_names(13)
        pc = _per_class(cm)
        keep = slice(0, 12)  # "other" kept in the matrix, left out of the means
        mean = lambda v: float(np.nanmean(v[keep])) if np.isfinite(v[keep]).any() else float("nan")  # noqa: E731
        total = cm.sum()
        oa = float(np.trace(cm) / total) if total else float("nan")
    elif convention == "19":
        if cm.shape != (19, 19):
            raise ValueError(f"convention '19' needs a 19x19 matrix. Received: shape={cm.shape}")
        kept = [i for i in range(19) if i not in DROPPED_19]
        cm = cm[np.ix_(kept, kept)]
        names = [nomenclature.class_names(19)[i] for i in kept]
        pc = {k: np.nan_to_num(v, nan=0.0) for k, v in _per_class(cm).items()}
        mean = lambda v: float(np.mean(v))  # noqa: E731
        total = cm.sum()
        oa = float(np.trace(cm) / total) if total else float("nan")
    else:
        raise ValueError(f"convention must be '13' or '19'. Received: convention={convention!r}")
    return {
        "convention": convention,
        "miou": mean(pc["iou"]),
        "overall_accuracy": oa,
        "mean_f1": mean(pc["f1"]),
        "mean_precision": mean(pc["precision"]),
        "mean_recall": mean(pc["recall"]),
        "class_names": names,
        "per_class_iou": pc["iou"].tolist(),
        "per_class_precision": pc["precision"].tolist(),
        "per_class_recall": pc["recall"].tolist(),
        "per_class_f1": pc["f1"].tolist(),
        "confusion_matrix": cm.tolist(),
    }


def miou(cm: np.ndarray) -> float:
    """The official challenge mIoU of a 13 x 13 confusion matrix."""
    return scores(cm, "13")["miou"]
