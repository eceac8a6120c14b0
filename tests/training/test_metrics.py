"""ConfusionMatrixMetric against the numpy official formulas (flair_tf.scoring)."""

import numpy as np
import pytest
import tensorflow as tf

from flair_tf import scoring
from flair_tf.training.metrics import ConfusionMatrixMetric


def _batch(seed, n=3, size=8, classes=13):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(n, size, size)).astype(np.int32)
    logits = rng.normal(size=(n, size, size, classes)).astype(np.float32)
    # Make predictions agree with labels often, so IoUs are far from 0.
    agree = rng.random((n, size, size)) < 0.6
    np.put_along_axis(logits, labels[..., None], np.where(agree, 10.0, 0.0)[..., None], axis=-1)
    return labels, logits


@pytest.mark.parametrize("classes,convention", [(13, "13"), (19, "19")])
def test_streaming_matrix_and_miou_equal_numpy(classes, convention):
    metric = ConfusionMatrixMetric(classes)
    cm = np.zeros((classes, classes), np.int64)
    for seed in range(3):
        labels, logits = _batch(seed, classes=classes)
        metric.update_state(labels, logits)
        cm += scoring.confusion_matrix(labels, logits.argmax(-1), classes)
    np.testing.assert_array_equal(metric.confusion_matrix(), cm)
    expected = scoring.scores(cm, convention)
    assert float(metric.result()) == pytest.approx(expected["miou"], rel=1e-6)
    got = metric.scores()
    np.testing.assert_allclose(got["per_class_iou"], expected["per_class_iou"])
    assert got["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])


def test_other_class_stays_in_matrix_but_not_in_mean():
    # Truth "other" predicted as building: a false positive for building.
    labels = np.array([[[0, 12]]], np.int32)
    logits = np.zeros((1, 1, 2, 13), np.float32)
    logits[..., 0] = 1.0
    metric = ConfusionMatrixMetric(13)
    metric.update_state(labels, logits)
    assert float(metric.result()) == pytest.approx(0.5)  # IoU(building) = 1 / 2, other classes absent
    assert float(metric.result()) == pytest.approx(scoring.miou(metric.confusion_matrix()))


def test_mask_drops_padded_examples_and_reset():
    labels, logits = _batch(4)
    metric = ConfusionMatrixMetric(13)
    metric.update_state(labels, logits, sample_weight=np.array([1.0, 0.0, 1.0]))
    expected = scoring.confusion_matrix(labels[[0, 2]], logits[[0, 2]].argmax(-1), 13)
    np.testing.assert_array_equal(metric.confusion_matrix(), expected)
    metric.reset_state()
    assert metric.confusion_matrix().sum() == 0


def test_counts_beyond_float32_and_int32_stay_exact():
    metric = ConfusionMatrixMetric(13)
    labels = np.zeros((1, 64, 64), np.int32)
    logits = np.zeros((1, 64, 64, 13), np.float32)
    logits[..., 0] = 1
    # Start near 2^31 counts in cell (0, 0): hi * 2^20 + lo.
    metric.cm_hi.assign(np.full((13, 13), 2047, np.int32))
    metric.cm_lo.assign(np.full((13, 13), (1 << 20) - 100, np.int32))
    for _ in range(3):
        metric.update_state(labels, logits)
    base = 2047 * (1 << 20) + (1 << 20) - 100
    cm = metric.confusion_matrix()
    assert cm[0, 0] == base + 3 * 64 * 64 and cm[1, 1] == base
    assert cm[0, 0] > 2**31


def test_inside_tf_function_and_keras_serialisation():
    labels, logits = _batch(5)
    metric = ConfusionMatrixMetric(13)
    tf.function(metric.update_state)(tf.constant(labels), tf.constant(logits))
    np.testing.assert_array_equal(metric.confusion_matrix(), scoring.confusion_matrix(labels, logits.argmax(-1), 13))
    clone = ConfusionMatrixMetric.from_config(metric.get_config())
    assert clone.num_classes == 13 and clone.convention == "13"
    with pytest.raises(ValueError, match="convention"):
        ConfusionMatrixMetric(13, convention="19")


_MIRRORED = r"""
import json
import numpy as np, tensorflow as tf
from flair_tf import scoring
from flair_tf.training.metrics import ConfusionMatrixMetric

rng = np.random.default_rng(0)
labels = rng.integers(0, 13, size=(4, 8, 8)).astype("int32")
logits = rng.normal(size=(4, 8, 8, 13)).astype("float32")
valid = np.array([1, 1, 1, 0], "float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    metric = ConfusionMatrixMetric(13)
ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((labels, logits, valid)).batch(4))

@tf.function
def step(batch):
    strategy.run(lambda l, p, v: metric.update_state(l, p, v), args=batch)

for batch in ds:
    step(batch)
cm = metric.confusion_matrix()
ref = scoring.confusion_matrix(labels[:3], logits[:3].argmax(-1), 13)
print(json.dumps({"equal": bool((cm == ref).all()), "total": int(cm.sum()), "miou": float(metric.result()),
                  "ref_miou": scoring.miou(ref)}))
"""


@pytest.mark.slow
def test_mirrored_replicas_are_summed(snippet):
    out = snippet.json(_MIRRORED, logical_cpus=2)
    assert out["equal"] and out["total"] == 3 * 64
    assert out["miou"] == pytest.approx(out["ref_miou"], rel=1e-6)
