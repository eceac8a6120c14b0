"""The official FLAIR scores against a literal, loop-based re-statement of the challenge code."""

import math

import numpy as np
import pytest

from flair_tf import scoring


def _literal_challenge_miou(masks, preds):
    """generate_miou.py, written out: target = MSK-1, >12 -> 12, summed 13x13 matrix, nanmean(IoU[:12])."""
    cm = np.zeros((13, 13), dtype=np.int64)
    for msk, pred in zip(masks, preds):
        target = msk.astype(np.int64) - 1
        target[target > 12] = 12
        for t, p in zip(target.ravel(), pred.ravel()):
            cm[t, p] += 1
    ious = []
    for c in range(13):
        tp = cm[c, c]
        denom = cm[c, :].sum() + cm[:, c].sum() - tp
        ious.append(tp / denom if denom else float("nan"))
    return float(np.nanmean(ious[:12])), cm


def test_challenge_miou_matches_literal_formula():
    rng = np.random.default_rng(0)
    masks = [rng.integers(1, 20, size=(16, 16)).astype(np.uint8) for _ in range(4)]
    preds = [rng.integers(0, 13, size=(16, 16)).astype(np.uint8) for _ in range(4)]
    expected, cm_literal = _literal_challenge_miou(masks, preds)
    cm = sum(
        scoring.confusion_matrix(scoring.target_from_codes(m, "13"), p, 13) for m, p in zip(masks, preds)
    )
    np.testing.assert_array_equal(cm, cm_literal)
    assert scoring.miou(cm) == pytest.approx(expected, abs=1e-12)


def test_other_is_kept_in_matrix_but_not_averaged():
    # Truth: every pixel "other" (index 12) except one building pixel.
    target = np.full(10, 12)
    target[0] = 0
    pred = np.zeros(10, dtype=int)  # all predicted building
    cm = scoring.confusion_matrix(target, pred, 13)
    s = scoring.scores(cm, "13")
    # Building: tp=1, fp=9 from "other" pixels -> IoU 0.1 (other counted as FP).
    assert s["per_class_iou"][0] == pytest.approx(0.1)
    # Only building has pixels among the first 12 classes -> mIoU = 0.1.
    assert s["miou"] == pytest.approx(0.1)
    assert math.isnan(s["per_class_iou"][1])
    assert s["overall_accuracy"] == pytest.approx(0.1)


def test_absent_classes_are_nan_and_skipped():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    s = scoring.scores(scoring.confusion_matrix(target, pred, 13), "13")
    # class 0: tp 2, fp 1 -> 2/3; class 1: tp 1, fn 1 -> 1/2
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_19_class_convention_drops_weight_zero_classes():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 19, size=5000)
    pred = np.where(rng.random(5000) < 0.6, target, rng.integers(0, 19, size=5000))
    cm = scoring.confusion_matrix(target, pred, 19)
    s = scoring.scores(cm, "19")
    kept = [i for i in range(19) if i not in (14, 15, 16, 18)]
    assert len(s["class_names"]) == 15
    assert "clear cut" not in s["class_names"] and "other" not in s["class_names"]
    red = cm[np.ix_(kept, kept)].astype(float)
    iou = np.diag(red) / (red.sum(0) + red.sum(1) - np.diag(red))
    assert s["miou"] == pytest.approx(np.nan_to_num(iou).mean())
    assert s["overall_accuracy"] == pytest.approx(np.trace(red) / red.sum())


def test_19_class_absent_class_counts_as_zero():
    # Snow (index 13) never appears: the later library averages a 0 in for it.
    target = np.array([0, 1, 2])
    pred = np.array([0, 1, 2])
    s = scoring.scores(scoring.confusion_matrix(target, pred, 19), "19")
    assert s["miou"] == pytest.approx(3 / 15)


def test_confusion_matrix_ignores_out_of_range_and_checks_sizes():
    cm = scoring.confusion_matrix(np.array([0, 255, 1]), np.array([0, 0, 200]), 13)
    assert cm.sum() == 1
    with pytest.raises(ValueError, match="differ in size"):
        scoring.confusion_matrix(np.zeros(3), np.zeros(4), 13)
    with pytest.raises(ValueError, match="13x13"):
        scoring.scores(np.zeros((19, 19)), "13")
