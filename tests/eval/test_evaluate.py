"""python -m flair_tf.evaluate: conventions, exact confusion matrix, report files, TensorBoard."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from flair_tf import evaluate, nomenclature, scoring
from eval_runs import unet13_run, unet19_run  # noqa: F401  (fixtures)


def _official_miou_13(cm):
    """The challenge formula written out independently: IoU = TP / (row + col - TP), nanmean of the first 12."""
    cm = cm.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    return np.nansum(iou[:12]) / np.isfinite(iou[:12]).sum()


def _reference_confusion_matrix(records_dir, split, run_dir, num_classes):
    """Record by record, without the pipeline's batching/padding: decode, predict, count."""
    import tensorflow as tf

    from flair_tf.data import schema
    from flair_tf.inference import model_io

    model = model_io.load_model(run_dir).model
    info = schema.load_dataset_info(records_dir)
    spec = schema.RecordSpec.from_info(info)
    files = sorted(glob.glob(schema.shard_pattern(records_dir, "flair1", split)))
    cm = np.zeros((num_classes, num_classes), np.int64)
    n = 0
    for raw in tf.data.TFRecordDataset(files):
        ex = schema.decode(raw, spec)
        image = tf.concat([ex["aerial"], ex["elevation"]], -1)[None]
        pred = np.argmax(model({"aerial": image}, training=False)["aerial"].numpy()[0], -1)
        target = nomenclature.remap(ex["label"].numpy(), num_classes)
        cm += scoring.confusion_matrix(target, pred, num_classes)
        n += 1
    return cm, n


def test_conventions_follow_the_model_classes():
    assert evaluate.conventions_for(13) == ["13"]
    assert evaluate.conventions_for(19) == ["19", "13"]
    assert evaluate.conventions_for(19, ["13"]) == ["13"]
    with pytest.raises(ValueError, match="needs a model trained with 19 classes"):
        evaluate.conventions_for(13, ["19"])
    with pytest.raises(ValueError, match="13 and/or 19"):
        evaluate.conventions_for(19, ["15"])


def test_merge_to_13_equals_remapping_targets_and_predictions():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 19, 5000), rng.integers(0, 19, 5000)
    cm19 = scoring.confusion_matrix(t, p, 19)
    expected = scoring.confusion_matrix(np.minimum(t, 12), np.minimum(p, 12), 13)
    np.testing.assert_array_equal(evaluate.merge_to_13(cm19), expected)
    s = evaluate.scores_by_convention(cm19, ["13", "19"])
    assert s["13"]["miou"] == pytest.approx(_official_miou_13(expected))
    assert len(s["19"]["per_class_iou"]) == 15


def test_evaluate_counts_every_record_once_and_writes_the_report(flair1_records, unet13_run, tmp_path):
    out = tmp_path / "report"
    # batch 3 does not divide the 8 val records: the padded last batch must be masked.
    result = evaluate.evaluate(unet13_run, flair1_records, "val", batch_size=3, output_dir=str(out), progress=False)
    ref_cm, n = _reference_confusion_matrix(flair1_records, "val", unet13_run, 13)
    assert result["num_patches"] == n == 8
    np.testing.assert_array_equal(result["confusion_matrix"], ref_cm)
    assert ref_cm.sum() == 8 * 64 * 64
    s = result["conventions"]["13"]
    assert s["miou"] == pytest.approx(_official_miou_13(ref_cm))
    assert 0 < s["miou"] < 1

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["split"] == "val" and metrics["run"]["num_patches"] == 8
    assert metrics["conventions"]["13"]["miou"] == pytest.approx(s["miou"])
    assert set(metrics["conventions"]) == {"13"}
    np.testing.assert_array_equal(np.load(out / "confusion_matrix.npy"), ref_cm)
    md = (out / "metrics.md").read_text()
    assert "| building |" in md and "other (not in the means)" in md and f"{100 * s['miou']:.2f}" in md
    png = Image.open(out / "confusion_matrix.png")
    assert png.mode == "RGB" and png.size[0] > 13 * 30 and png.size[1] > 13 * 30
    events = glob.glob(str(out / "logs" / "events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "convention_13/miou" in tags and "confusion_matrix" in tags
    import tensorflow as tf

    logged = float(tf.make_ndarray(acc.Tensors("convention_13/miou")[0].tensor_proto))
    assert logged == pytest.approx(s["miou"], rel=1e-6)


def test_19_class_model_is_scored_in_both_conventions(flair1_records, unet19_run, tmp_path):
    result = evaluate.evaluate(unet19_run, flair1_records, "val", batch_size=4, output_dir=str(tmp_path),
                               progress=False)
    ref_cm, _ = _reference_confusion_matrix(flair1_records, "val", unet19_run, 19)
    np.testing.assert_array_equal(result["confusion_matrix"], ref_cm)
    conv = result["conventions"]
    assert set(conv) == {"13", "19"}
    assert conv["13"]["miou"] == pytest.approx(_official_miou_13(evaluate.merge_to_13(ref_cm)))
    # 19-class convention: drop clear cut, mixed, ligneous, other; NaN -> 0; mean over 15.
    kept = [i for i in range(19) if i not in (14, 15, 16, 18)]
    red = ref_cm[np.ix_(kept, kept)].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.nan_to_num(np.diag(red) / (red.sum(0) + red.sum(1) - np.diag(red)))
    assert conv["19"]["miou"] == pytest.approx(iou.mean())
    assert np.load(tmp_path / "confusion_matrix.npy").shape == (19, 19)


def test_a_13_class_model_refuses_the_19_convention(flair1_records, unet13_run, tmp_path):
    with pytest.raises(ValueError, match="only --nomenclature=13 applies"):
        evaluate.evaluate(unet13_run, flair1_records, "val", conventions=["19"], output_dir=str(tmp_path),
                          progress=False)


def test_missing_run_files_are_named(tmp_path, flair1_records):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        evaluate.evaluate(str(tmp_path), flair1_records, "val", progress=False)
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "model_config.json").write_text('{"arch": "unet", "num_classes": 13}')
    (tmp_path / "data_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="best.weights.h5"):
        evaluate.evaluate(str(tmp_path), flair1_records, "val", progress=False)


def test_load_model_folds_batchnorm_for_inference_by_default(unet13_run):
    import keras

    from flair_tf.inference import model_io
    from flair_tf.models.folding import FoldedBatchNorm

    folded = model_io.load_model(unet13_run, winograd=False).model
    trained = model_io.load_model(unet13_run, fold_batchnorm=False).model
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert sum(isinstance(layer, FoldedBatchNorm) for layer in folded.layers) == 46
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in trained.layers) == 46
    x = {"aerial": np.random.default_rng(0).integers(0, 256, (2, 64, 64, 5), dtype=np.uint8)}
    a, b = folded(x, training=False)["aerial"].numpy(), trained(x, training=False)["aerial"].numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_load_model_computes_wide_convolutions_by_winograd_on_cpu(unet13_run):
    from flair_tf.inference import model_io
    from flair_tf.models.winograd import WinogradConv2D

    # these tests see no GPU; any_size: inputs of unknown size, so every wide convolution qualifies
    auto = model_io.load_model(unet13_run, any_size=True).model
    direct = model_io.load_model(unet13_run, any_size=True, winograd=False).model
    assert sum(isinstance(layer, WinogradConv2D) for layer in auto.layers) == 27
    assert not any(isinstance(layer, WinogradConv2D) for layer in direct.layers)
    # trained at 64 px: the wide layers see 2-8 px, below winograd.MIN_SIZE
    assert not any(isinstance(layer, WinogradConv2D) for layer in model_io.load_model(unet13_run).model.layers)
    x = {"aerial": np.random.default_rng(0).integers(0, 256, (2, 64, 64, 5), dtype=np.uint8)}
    a, b = auto(x, training=False)["aerial"].numpy(), direct(x, training=False)["aerial"].numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5 * np.abs(b).max())


def test_winograd_flag_values():
    from absl import flags

    from flair_tf.inference import model_io

    assert [model_io.winograd_setting(v) for v in ("auto", "on", "off")] == [None, True, False]
    with pytest.raises(ValueError, match="--winograd must be one of"):
        model_io.winograd_setting("yes")
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["evaluate", "--winograd=off"])
    assert model_io.winograd_setting(fv.winograd) is False
