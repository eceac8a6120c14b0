"""models.folding: BatchNorm folded into the preceding convolution, for inference."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from flair_tf.models import build_model
from flair_tf.models import layers as L
from flair_tf.models.folding import FoldedBatchNorm, fold_batchnorm, foldable_pairs


def _perturb_batchnorms(model, seed=0):
    """Statistics and affine parameters far from the identity, so a wrong fold shows."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            gamma, beta, mean, var = shapes
            layer.set_weights([rng.uniform(0.5, 1.5, gamma).astype("f"), rng.normal(0, 0.3, beta).astype("f"),
                               rng.normal(0, 0.3, mean).astype("f"), rng.uniform(0.3, 2.0, var).astype("f")])


def _count(model, cls):
    return sum(isinstance(layer, cls) for layer in model.layers)


def _max_rel_diff(a, b):
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max() / (np.abs(np.asarray(a[k])).max() + 1e-6))
               for k in a)


def _inputs(model, batch, rng):
    out = {}
    for name, t in model.input.items():
        shape = (batch,) + tuple(t.shape[1:])
        if name == "aerial":
            out[name] = rng.randint(0, 256, shape).astype(np.uint8)
        elif name == "sentinel_dates":
            out[name] = np.tile(np.arange(shape[1], dtype=np.float32) * 30 - 100, (batch, 1))
        elif name == "sentinel_pad_mask":
            out[name] = np.zeros(shape, bool)
        else:
            out[name] = (rng.rand(*shape) * (2000 if name == "sentinel" else 1)).astype(np.float32)
    return out


@pytest.mark.parametrize("config, folded_pairs", [
    ({"arch": "unet", "input_size": 64, "use_metadata": True}, 46),  # every BatchNorm of the U-Net
    ({"arch": "utt", "input_size": 64, "num_dates": 3, "use_metadata": True}, None),
])
def test_folded_model_computes_the_same_outputs(config, folded_pairs):
    keras.utils.set_random_seed(0)
    model = build_model(config)
    _perturb_batchnorms(model)
    before = [w.copy() for w in model.get_weights()]
    x = _inputs(model, 2, np.random.RandomState(1))
    expected = model(x, training=False)

    pairs = foldable_pairs(model)
    folded = fold_batchnorm(model)
    got = folded(x, training=False)

    assert _max_rel_diff(expected, got) < 1e-5
    assert sorted(got) == sorted(expected)
    if folded_pairs is not None:
        assert len(pairs) == folded_pairs
    # every folded BatchNorm became an identity of the same name; the others are kept
    assert _count(folded, FoldedBatchNorm) == len(pairs) > 0
    assert _count(folded, keras.layers.BatchNormalization) == _count(model, keras.layers.BatchNormalization) - len(pairs)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    for conv in pairs:
        assert folded.get_layer(conv).use_bias  # U-TAE convolutions had one already
    # the trained model is left as it was
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_only_a_convolution_with_a_single_batchnorm_consumer_is_folded():
    rng = np.random.RandomState(0)
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", use_bias=True, name="biased")(inp)  # has its own bias
    a = L.batch_norm("bn_a")(a)
    b = keras.layers.Conv2D(4, 1, name="shared_out")(inp)  # feeds a BatchNorm and an Add
    c = L.batch_norm("bn_b")(b)
    d = keras.layers.Conv2D(4, 1, activation="relu", name="activated")(inp)  # non-linear before the BN
    d = L.batch_norm("bn_d")(d)
    e = keras.layers.Dense(4, name="dense")(inp)  # not a convolution
    e = L.batch_norm("bn_e")(e)
    out = keras.layers.Add()([a, b, c, d, e])
    model = keras.Model(inp, out)
    _perturb_batchnorms(model)
    assert foldable_pairs(model) == {"biased": "bn_a"}

    folded = fold_batchnorm(model)
    x = rng.randn(2, 8, 8, 3).astype(np.float32)
    np.testing.assert_allclose(folded(x), model(x, training=False), rtol=1e-5, atol=1e-5)
    assert isinstance(folded.get_layer("bn_a"), FoldedBatchNorm)
    for name in ("bn_b", "bn_d", "bn_e"):
        assert isinstance(folded.get_layer(name), keras.layers.BatchNormalization)


def test_concatenating_convolution_with_a_bias_equals_the_convolution_of_the_concatenation():
    """L.Conv2D([a, b]) adds its bias to the first part (fusable); same result as one convolution."""
    rng = np.random.RandomState(0)
    a, b = rng.randn(2, 8, 8, 3).astype(np.float32), rng.randn(2, 8, 8, 5).astype(np.float32)
    split = L.Conv2D(4, 3, padding="same", use_bias=True, bias_initializer="random_normal")
    y = split([a, b])
    whole = keras.layers.Conv2D(4, 3, padding="same", use_bias=True)
    whole.build((None, 8, 8, 8))
    whole.set_weights(split.get_weights())
    np.testing.assert_allclose(y, whole(np.concatenate([a, b], -1)), rtol=1e-5, atol=1e-5)
    assert np.abs(split.get_weights()[1]).max() > 0


def test_folded_model_saves_and_loads(tmp_path):
    model = build_model({"arch": "unet", "input_size": 32})
    _perturb_batchnorms(model)
    folded = fold_batchnorm(model)
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    back = keras.models.load_model(path)
    x = {"aerial": np.random.RandomState(0).randint(0, 256, (1, 32, 32, 5)).astype(np.uint8)}
    np.testing.assert_array_equal(back(x)["aerial"], folded(x)["aerial"])
