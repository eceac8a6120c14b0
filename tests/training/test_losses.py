"""Weighted cross-entropy: reference averaging by hand, and exactness under MirroredStrategy."""

import numpy as np
import pytest
import tensorflow as tf

from flair_tf import nomenclature
from flair_tf.training import losses


def _numpy_terms(labels, logits, weights, sample_weight=None):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    w = np.asarray(weights)[labels]
    m = np.ones_like(ce) if sample_weight is None else np.broadcast_to(sample_weight[:, None, None], ce.shape)
    return (w * m * ce).sum(), m.sum(), (w * m).sum()


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 13, size=(3, 4, 5)).astype(np.int32)
    labels[0, :2] = 12  # plenty of weight-0 "other" pixels
    logits = rng.normal(size=(3, 4, 5, 13)).astype(np.float32) * 3
    return labels, logits


def test_pixels_averaging_is_sum_over_all_pixels(batch):
    labels, logits = batch
    weights = nomenclature.class_weights("flair1", 13)
    num, pixels, _ = _numpy_terms(labels, logits, weights)
    got = losses.WeightedCrossEntropy(weights, "pixels")(labels, logits)
    np.testing.assert_allclose(float(got), num / pixels, rtol=1e-5)
    # PyTorch's probability-target CE, 'mean' reduction, written out once more.
    onehot = np.eye(13)[labels]
    logp = tf.nn.log_softmax(logits).numpy()
    torch_like = (-(np.asarray(weights) * onehot * logp).sum(-1)).mean()
    np.testing.assert_allclose(float(got), torch_like, rtol=1e-5)


def test_weights_averaging_divides_by_weight_sum(batch):
    labels, logits = batch
    weights = nomenclature.class_weights("flair2", 13, "sentinel")  # plowed land and other at 0
    num, _, wsum = _numpy_terms(labels, logits, weights)
    got = losses.WeightedCrossEntropy(weights, "weights")(labels, logits)
    np.testing.assert_allclose(float(got), num / wsum, rtol=1e-5)
    pixels = losses.WeightedCrossEntropy(weights, "pixels")(labels, logits)
    assert abs(float(got) - float(pixels)) > 1e-3  # the two modes really differ here


@pytest.mark.parametrize("averaging", ["pixels", "weights"])
def test_sample_weight_masks_padded_examples(batch, averaging):
    labels, logits = batch
    weights = nomenclature.class_weights("flair1", 13)
    mask = np.array([1.0, 0.0, 1.0], np.float32)
    got = losses.WeightedCrossEntropy(weights, averaging)(labels, logits, sample_weight=mask)
    keep = mask > 0
    expected = losses.WeightedCrossEntropy(weights, averaging)(labels[keep], logits[keep])
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_float16_logits_are_computed_in_float32(batch):
    labels, logits = batch
    loss = losses.WeightedCrossEntropy([1.0] * 13, "pixels")
    value = loss(labels, tf.cast(logits, tf.bfloat16))
    assert value.dtype == tf.float32
    np.testing.assert_allclose(float(value), float(loss(labels, tf.cast(tf.cast(logits, tf.bfloat16), tf.float32))), rtol=1e-6)


def test_build_losses_reference_weights_and_defaults():
    ls, lw = losses.build_losses("flair2", 13, ["aerial", "sentinel"], sentinel_weight=0.5)
    assert ls["aerial"].class_weights == nomenclature.class_weights("flair2", 13, "aerial")
    assert ls["sentinel"].class_weights == nomenclature.class_weights("flair2", 13, "sentinel")
    assert ls["aerial"].averaging == "weights" and lw == {"aerial": 1.0, "sentinel": 0.5}
    ls, _ = losses.build_losses("flair1", 13, ["aerial"])
    assert ls["aerial"].averaging == "pixels"
    ls, _ = losses.build_losses("flair1", 19, ["aerial"])
    assert ls["aerial"].averaging == "weights" and ls["aerial"].class_weights[18] == 0.0
    with pytest.raises(ValueError, match="averaging"):
        losses.WeightedCrossEntropy([1.0] * 13, "mean")


_DISTRIBUTED = r"""
import json
import numpy as np, tensorflow as tf, keras
from flair_tf.training import losses

rng = np.random.default_rng(1)
x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
y = rng.integers(0, 13, size=(4, 6, 6)).astype("int32")
y[:2] = 12  # replica 0 sees only weight-0 "other" pixels but one example
y[1, 0, 0] = 3
sw = np.array([1, 1, 0, 1], "float32")  # one padded example on replica 1
weights = [1.0] * 12 + [0.0]
ds = lambda: tf.data.Dataset.from_tensor_slices((x, {"aerial": y}, sw)).batch(4)

def one_step(strategy, averaging):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 3), name="aerial")
        model = keras.Model({"aerial": inp}, {"aerial": keras.layers.Conv2D(13, 1, name="head")(inp)})
        model.compile(keras.optimizers.SGD(1.0), loss={"aerial": losses.WeightedCrossEntropy(weights, averaging)})
    data = ds().map(lambda a, b, c: ({"aerial": a}, b, c))
    hist = model.fit(data, epochs=1, verbose=0)
    return hist.history["loss"][0], model.get_layer("head").kernel.numpy()

out = {}
for averaging in ("pixels", "weights"):
    l1, k1 = one_step(tf.distribute.get_strategy(), averaging)
    l2, k2 = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), averaging)
    out[averaging] = {"loss_single": l1, "loss_mirrored": l2, "max_kernel_diff": float(np.abs(k1 - k2).max()),
                      "kernel_change": float(np.abs(k1).max())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_mirrored_two_replicas_equals_single_device(snippet):
    out = snippet.json(_DISTRIBUTED, logical_cpus=2)
    for averaging, r in out.items():
        assert r["loss_single"] == pytest.approx(r["loss_mirrored"], rel=1e-5), (averaging, r)
        assert r["max_kernel_diff"] < 1e-5, (averaging, r)


def test_replica_local_mean_would_be_wrong():
    """The batch of the distributed test: averaging per replica then over replicas is off."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 13, size=(4, 6, 6))
    labels[:2] = 12
    labels[1, 0, 0] = 3
    logits = rng.normal(size=(4, 6, 6, 13)).astype(np.float32)
    w = [1.0] * 12 + [0.0]
    n0, _, w0 = _numpy_terms(labels[:2], logits[:2], w)
    n1, _, w1 = _numpy_terms(labels[2:], logits[2:], w)
    assert abs((n0 / w0 + n1 / w1) / 2 - (n0 + n1) / (w0 + w1)) > 0.1
