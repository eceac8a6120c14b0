"""tools/compute_miou.py and flair_tf.inference.score_folders: the challenge scoring of PRED/MSK folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flair_tf.inference import score_folders
from eval_runs import unet13_run, unet19_run  # noqa: F401  (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, compression="tiff_lzw")


def _official(cm, first=12):
    cm = cm.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    return np.nanmean(iou[:first])


def _folders(tmp_path, n=5, pred_classes=13, seed=0, pred_name="PRED_{}.tif"):
    """Random masks (codes 1..19, in a nested tree) and predictions; returns dirs and the raw arrays."""
    rng = np.random.default_rng(seed)
    preds, masks = {}, {}
    for k in range(n):
        pid = f"{70 + 3 * k:06d}"
        masks[pid] = rng.integers(1, 20, (32, 32))
        masks[pid][:4] = 1 + k  # a few classes dominate some patches
        preds[pid] = rng.integers(0, pred_classes, (32, 32))
        _save(str(tmp_path / "labels" / f"D00{k % 2}_2020" / "Z1_AA" / "msk" / f"MSK_{pid}.tif"), masks[pid])
        _save(str(tmp_path / "preds" / pred_name.format(pid)), preds[pid])
    return str(tmp_path / "preds"), str(tmp_path / "labels"), preds, masks


def test_13_class_score_is_the_official_formula(tmp_path):
    pred_dir, mask_dir, preds, masks = _folders(tmp_path)
    result = score_folders.score_folders(pred_dir, mask_dir, progress=False)
    cm = np.zeros((13, 13), np.int64)
    for pid in masks:  # sklearn-style per-patch matrices, summed (the challenge script)
        t = masks[pid].ravel() - 1
        t[t > 12] = 12
        np.add.at(cm, (t, preds[pid].ravel()), 1)
    assert result["num_patches"] == 5
    np.testing.assert_array_equal(np.asarray(result["confusion_matrix"]), cm)
    assert result["miou"] == pytest.approx(_official(cm))


def test_19_class_predictions_in_both_conventions(tmp_path):
    pred_dir, mask_dir, preds, masks = _folders(tmp_path, pred_classes=19, pred_name="PRED_IMG_{}.tif")
    with pytest.raises(ValueError, match="pred_num_classes=19"):
        score_folders.score_folders(pred_dir, mask_dir, progress=False)
    s13 = score_folders.score_folders(pred_dir, mask_dir, "13", pred_num_classes=19, progress=False)
    s19 = score_folders.score_folders(pred_dir, mask_dir, "19", progress=False)
    cm19 = np.zeros((19, 19), np.int64)
    for pid in masks:
        np.add.at(cm19, (masks[pid].ravel() - 1, preds[pid].ravel()), 1)
    idx = np.minimum(np.arange(19), 12)
    cm13 = np.zeros((13, 13), np.int64)
    np.add.at(cm13, (idx[:, None], idx[None, :]), cm19)
    assert s13["miou"] == pytest.approx(_official(cm13))
    kept = [i for i in range(19) if i not in (14, 15, 16, 18)]
    red = cm19[np.ix_(kept, kept)].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.nan_to_num(np.diag(red) / (red.sum(0) + red.sum(1) - np.diag(red)))
    assert s19["miou"] == pytest.approx(iou.mean())
    with pytest.raises(ValueError, match="19-class convention needs predictions over 19"):
        score_folders.score_folders(pred_dir, mask_dir, "19", pred_num_classes=13, progress=False)


def test_missing_and_extra_files_are_named(tmp_path):
    pred_dir, mask_dir, _, _ = _folders(tmp_path)
    os.remove(os.path.join(pred_dir, "PRED_000073.tif"))
    _save(os.path.join(pred_dir, "PRED_999999.tif"), np.zeros((32, 32)))
    with pytest.raises(ValueError) as err:
        score_folders.score_folders(pred_dir, mask_dir, progress=False)
    assert "MSK_000073.tif" in str(err.value) and "PRED_999999.tif" in str(err.value)
    _save(os.path.join(pred_dir, "nested", "PRED_000070.tif"), np.zeros((32, 32)))
    with pytest.raises(ValueError, match="Two files for patch 000070"):
        score_folders.pair_folders(pred_dir, mask_dir)


def test_wrong_size_and_bad_codes_are_named(tmp_path):
    pred_dir, mask_dir, _, masks = _folders(tmp_path, n=2)
    _save(os.path.join(pred_dir, "PRED_000070.tif"), np.zeros((16, 32)))
    with pytest.raises(ValueError, match="PRED_000070.tif is 32x16 but its mask"):
        score_folders.score_folders(pred_dir, mask_dir, progress=False)
    _save(os.path.join(pred_dir, "PRED_000070.tif"), np.zeros((32, 32)))
    bad = masks["000073"].copy()
    bad[0, 0] = 0
    _save(os.path.join(mask_dir, "D001_2020", "Z1_AA", "msk", "MSK_000073.tif"), bad)
    with pytest.raises(ValueError, match="MSK_000073.tif: Mask codes must be in 1..19"):
        score_folders.score_folders(pred_dir, mask_dir, progress=False)


def test_cli_on_our_predictions_agrees_with_evaluate(flair1_tree, flair1_records, unet13_run, tmp_path):
    from flair_tf import evaluate, predict

    preds = tmp_path / "preds"
    predict.predict_patches(unet13_run, flair1_records, "test", str(preds), batch_size=3)
    ev = evaluate.evaluate(unet13_run, flair1_records, "test", batch_size=5, output_dir=str(tmp_path / "ev"),
                           progress=False)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "compute_miou.py"), f"--pred_dir={preds}",
         f"--mask_dir={os.path.join(flair1_tree, 'flair_1_labels_test')}", "--json",
         f"--output_dir={tmp_path / 'cli'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cli["num_patches"] == ev["num_patches"] == 8
    assert cli["miou"] == pytest.approx(ev["conventions"]["13"]["miou"], abs=1e-12)
    cli_iou = [np.nan if v is None else v for v in cli["per_class_iou"]]  # JSON null = NaN (absent class)
    assert cli_iou == pytest.approx(ev["conventions"]["13"]["per_class_iou"], nan_ok=True)
    np.testing.assert_array_equal(np.load(tmp_path / "cli" / "confusion_matrix.npy"), ev["confusion_matrix"])


def test_19_class_predictions_agree_with_evaluate_in_both_conventions(flair1_tree, flair1_records, unet19_run,
                                                                     tmp_path):
    from flair_tf import evaluate, predict

    preds = tmp_path / "preds19"
    predict.predict_patches(unet19_run, flair1_records, "test", str(preds), batch_size=4)
    ev = evaluate.evaluate(unet19_run, flair1_records, "test", batch_size=8, output_dir=str(tmp_path / "ev"),
                           progress=False)
    masks = os.path.join(flair1_tree, "flair_1_labels_test")
    s19 = score_folders.score_folders(str(preds), masks, "19", progress=False)
    s13 = score_folders.score_folders(str(preds), masks, "13", pred_num_classes=19, progress=False)
    assert s19["miou"] == pytest.approx(ev["conventions"]["19"]["miou"], abs=1e-12)
    assert s13["miou"] == pytest.approx(ev["conventions"]["13"]["miou"], abs=1e-12)
