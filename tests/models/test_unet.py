"""U-Net/ResNet34 builder: parameter counts, input normalisation, metadata fusion, build_model."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from flair_tf.models import build_model, build_unet
from flair_tf.models import layers as L
from flair_tf.models.layers import InputNormalization
from flair_tf.models.unet import AddAlongHeight


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def test_parameter_counts_match_pytorch():
    assert _trainable(build_unet(num_classes=13, input_size=512)) == 24_444_381
    assert _trainable(build_unet(num_classes=13, input_size=512, use_metadata=True)) == 24_444_381 + 5_552
    model = build_unet(num_classes=19, input_size=512)
    assert _trainable(model) == 24_445_251
    assert model.get_layer("encoder.bn1").momentum == 0.9 and model.get_layer("encoder.bn1").epsilon == 1e-5


def test_input_normalization():
    x = np.array([[[[0, 255], [51, 102]]]], np.uint8)  # (1, 1, 2, 2)
    np.testing.assert_allclose(InputNormalization()(x).numpy(), x / 255.0, rtol=1e-6)
    layer = InputNormalization([10.0, 20.0], [2.0, 5.0])
    np.testing.assert_allclose(layer(x).numpy(), (x - [10.0, 20.0]) / [2.0, 5.0], rtol=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        InputNormalization([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])(x)
    with pytest.raises(ValueError, match="both be given"):
        InputNormalization([1.0, 2.0], None)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        assert InputNormalization()(x).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_metadata_is_added_along_the_bottleneck_height():
    e = np.arange(16, dtype=np.float32)[None] + 100.0
    out = AddAlongHeight()([np.zeros((1, 16, 16, 3), np.float32), e]).numpy()
    # Reference: e.unsqueeze(1).unsqueeze(-1).repeat(1, C, 1, 16) -> value[b, c, h, w] = e[b, h].
    np.testing.assert_array_equal(out, np.broadcast_to(e[0][None, :, None, None], (1, 16, 16, 3)))
    small = AddAlongHeight()([np.zeros((1, 2, 2, 1), np.float32), e]).numpy()
    np.testing.assert_array_equal(small[0, :, 0, 0], [100.0, 101.0])
    tall = AddAlongHeight()([np.zeros((1, 20, 1, 1), np.float32), e]).numpy()
    np.testing.assert_array_equal(tall[0, :, 0, 0], [100.0 + h % 16 for h in range(20)])


def test_unet_with_metadata_small_forward():
    model = build_unet(num_classes=13, input_size=64, use_metadata=True)
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (2, 64, 64, 5)).astype(np.uint8)
    m1, m2 = rng.rand(2, 45).astype(np.float32), rng.rand(2, 45).astype(np.float32)
    # Make the (ReLU-ended) MLP output non-zero so the fusion is visible.
    model.get_layer("enc.enc_mlp.6").bias.assign(np.linspace(0.5, 2.0, 16).astype(np.float32))
    y1 = model({"aerial": x, "metadata": m1}, training=False)["aerial"]
    y2 = model({"aerial": x, "metadata": m2}, training=False)["aerial"]
    assert y1.shape == (2, 64, 64, 13) and y1.dtype == "float32"
    assert np.abs(y1.numpy() - y2.numpy()).max() > 1e-6
    with pytest.raises(ValueError, match="multiple of 32"):
        build_unet(input_size=100)


def test_build_model_from_json_config():
    config = json.loads(json.dumps({"arch": "unet", "num_classes": 19, "in_channels": 4, "input_size": 32,
                                    "norm_mean": [1, 2, 3, 4], "norm_std": [1, 1, 1, 1]}))
    model = build_model(config)
    assert model.output["aerial"].shape == (None, 32, 32, 19)
    assert model.input["aerial"].shape == (None, 32, 32, 4)
    with pytest.raises(ValueError, match="Unknown arch 'fcn'"):
        build_model({"arch": "fcn"})
    with pytest.raises(ValueError, match="Invalid model_config"):
        build_model({"arch": "unet", "num_clases": 13})


@pytest.mark.parametrize("jit", [False, True])
def test_nearest_upsampling_equals_keras_forward_and_backward(jit):
    # The decoder's upsampling (resize forward, reshape-sum gradient) against Keras's layer.
    x = tf.random.stateless_normal([2, 5, 3, 4], seed=[1, 2])
    w = tf.random.stateless_normal([2, 10, 6, 4], seed=[3, 4])

    def run(layer):
        @tf.function(jit_compile=jit)
        def f(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * w)
            return y, tape.gradient(loss, x)
        return f(x)

    ours, keras_ = run(L.UpSampling2D(2)), run(keras.layers.UpSampling2D(2))
    np.testing.assert_array_equal(ours[0].numpy(), keras_[0].numpy())
    np.testing.assert_allclose(ours[1].numpy(), keras_[1].numpy(), rtol=1e-6, atol=1e-6)
    # Each input's gradient is the sum of its 2x2 block of output gradients.
    expected = w.numpy().reshape(2, 5, 2, 3, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(ours[1].numpy(), expected, rtol=1e-6, atol=1e-6)
