"""models.winograd: wide 3x3 convolutions computed by Winograd F(4x4, 3x3), for CPU inference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from flair_tf.models import build_model
from flair_tf.models import layers as L
from flair_tf.models.folding import fold_batchnorm
from flair_tf.models.winograd import (WinogradConv2D, transform_kernel, winograd_candidates, winograd_conv2d,
                                      winograd_model)


def _direct(x, kernel, bias):
    return tf.nn.conv2d(x, kernel, 1, "SAME") + bias


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("shape", [(2, 16, 16, 8), (1, 7, 10, 5), (3, 4, 4, 16), (1, 1, 9, 3), (2, 12, 5, 1)])
def test_winograd_convolution_equals_the_direct_convolution(shape):
    """Any height and width (whole tiles or not), batch and channels; 'same' zero padding; bias."""
    rng = np.random.RandomState(sum(shape))
    x = rng.randn(*shape).astype(np.float32)
    kernel = rng.randn(3, 3, shape[-1], 6).astype(np.float32)
    bias = rng.randn(6).astype(np.float32)
    got = winograd_conv2d(x, transform_kernel(kernel).astype(np.float32), bias)
    assert got.shape == shape[:3] + (6,)
    assert _rel(got, _direct(x, kernel, bias)) < 1e-5


def test_kernel_transform_of_a_single_tap_reproduces_a_shift():
    """A kernel with one tap (at row 2, column 0) moves the image by (-1, +1): exact output values."""
    x = np.arange(2 * 9 * 11, dtype=np.float32).reshape(1, 9, 11, 2)
    kernel = np.zeros((3, 3, 2, 2), np.float32)
    kernel[2, 0, 0, 1] = 1.0  # output channel 1 = input channel 0 at (i + 1, j - 1)
    got = np.asarray(winograd_conv2d(x, transform_kernel(kernel).astype(np.float32), np.zeros(2, np.float32)))
    want = np.zeros((9, 11))
    want[:-1, 1:] = x[0, 1:, :-1, 0]
    np.testing.assert_allclose(got[0, :, :, 1], want, atol=1e-3)
    np.testing.assert_allclose(got[0, :, :, 0], 0, atol=1e-3)


def test_list_inputs_are_convolved_as_their_concatenation():
    rng = np.random.RandomState(0)
    a, b = rng.randn(2, 8, 12, 3).astype(np.float32), rng.randn(2, 8, 12, 5).astype(np.float32)
    kernel, bias = rng.randn(3, 3, 8, 4).astype(np.float32), rng.randn(4).astype(np.float32)
    got = winograd_conv2d([a, b], transform_kernel(kernel).astype(np.float32), bias)
    assert _rel(got, _direct(np.concatenate([a, b], -1), kernel, bias)) < 1e-5


def test_unknown_spatial_sizes_inside_a_graph():
    """Traced with (None, None, None, C): one function serves several sizes (XLA compiles each)."""
    rng = np.random.RandomState(0)
    kernel = rng.randn(3, 3, 4, 4).astype(np.float32)
    u, bias = tf.constant(transform_kernel(kernel).astype(np.float32)), tf.zeros([4])
    fn = tf.function(lambda x: winograd_conv2d(x, u, bias),
                     input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    for shape in ((1, 8, 8, 4), (2, 13, 6, 4)):
        x = rng.randn(*shape).astype(np.float32)
        assert _rel(fn(x), _direct(x, kernel, bias)) < 1e-5


def test_candidates_are_the_wide_3x3_stride_1_convolutions():
    x = keras.Input((16, 16, 128))
    y = keras.layers.Conv2D(128, 3, padding="same", name="wide")(x)
    y = keras.layers.Conv2D(64, 3, padding="same", name="narrow_out")(y)  # 128 * 64 / 192 < 64
    y = keras.layers.Conv2D(128, 3, padding="same", name="narrow_in")(y)  # 64 * 128 / 192 < 64
    y = keras.layers.Conv2D(128, 3, strides=2, padding="same", name="strided")(y)
    y = keras.layers.Conv2D(128, 3, padding="valid", name="valid")(y)
    y = keras.layers.Conv2D(128, 1, name="pointwise")(y)
    y = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="activated")(y)
    y = keras.layers.Conv2D(128, 3, padding="same", dilation_rate=2, name="dilated")(y)
    y = keras.layers.Conv2D(128, 3, padding="same", groups=2, name="grouped")(y)
    y = keras.layers.Conv2D(128, 3, padding="same", dtype="mixed_bfloat16", name="bf16")(y)
    y = L.Conv2D(256, 3, padding="same", name="concatenating")([y, y])
    y = keras.layers.Conv2D(64, 3, padding="same", name="below")(y)  # 256 * 64 / 320 = 51.2
    model = keras.Model(x, y)
    # stride 2 and 'valid' leave the later layers 6 x 6 px: below the default MIN_SIZE (16)
    assert winograd_candidates(model) == ["wide"]
    assert winograd_candidates(model, min_size=7) == ["wide"]
    assert winograd_candidates(model, min_size=6) == ["wide", "concatenating"]
    assert winograd_candidates(model, min_work=50, min_size=6) == ["wide", "concatenating", "below"]


def test_size_rule_on_the_unet():
    """From 512 px down to layer4's 16 px all 27 qualify; at 256 px not layer4; unknown sizes qualify."""
    folded = {size: fold_batchnorm(build_model({"arch": "unet", "input_size": size})) for size in (256, 512, None)}
    assert len(winograd_candidates(folded[512])) == 27
    assert len(winograd_candidates(folded[None])) == 27
    at_256 = winograd_candidates(folded[256])
    assert len(at_256) == 22 and not any(name.startswith("encoder.layer4.") for name in at_256)


def test_winograd_unet_computes_the_folded_unet_outputs():
    keras.utils.set_random_seed(0)
    model = build_model({"arch": "unet", "input_size": 64, "use_metadata": True})
    folded = fold_batchnorm(model)
    converted = winograd_model(folded, min_size=0)  # 64 px: layer4 at 2 x 2 px, one partial tile
    names = winograd_candidates(folded, min_size=0)
    assert winograd_candidates(folded) == []  # the default leaves images this small alone
    # layer2-4 of the encoder without the strided first convolutions, decoder blocks 0 and 1
    assert len(names) == 27 and "decoder.blocks.0.conv1.0" in names and "decoder.blocks.2.conv1.0" not in names
    assert [layer.name for layer in converted.layers] == [layer.name for layer in folded.layers]
    assert sum(isinstance(layer, WinogradConv2D) for layer in converted.layers) == 27
    for layer in converted.layers:
        if layer.name not in names and layer.weights:
            for got, want in zip(layer.get_weights(), folded.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(got, want)
    rng = np.random.RandomState(1)
    x = {"aerial": rng.randint(0, 256, (2, 64, 64, 5)).astype(np.uint8), "metadata": rng.rand(2, 45).astype("f")}
    want = folded(x, training=False)["aerial"]
    got = converted(x, training=False)["aerial"]
    assert _rel(got, want) < 5e-5  # 27 layers of rounding (about 1e-5 of the range each)
    assert (np.argmax(got, -1) == np.argmax(want, -1)).mean() > 0.999


def test_winograd_utt_computes_the_folded_utt_outputs():
    """U-T&T: the aerial U-Net's wide convolutions are converted, U-TAE's (reflect padding) are not."""
    keras.utils.set_random_seed(0)
    folded = fold_batchnorm(build_model({"arch": "utt", "input_size": 64, "num_dates": 3}))
    names = winograd_candidates(folded, min_size=0)
    assert len(names) == 27 and all(name.startswith("arch_vhr.") for name in names)
    converted = winograd_model(folded, min_size=0)
    rng = np.random.RandomState(0)
    x = {"aerial": rng.randint(0, 256, (2, 64, 64, 5)).astype(np.uint8),
         "sentinel": (rng.rand(2, 3, 40, 40, 10) * 2000).astype(np.float32),
         "sentinel_dates": np.tile(np.array([-100, 0, 60], np.float32), (2, 1)),
         "sentinel_pad_mask": np.zeros((2, 3), bool)}
    want, got = folded(x, training=False), converted(x, training=False)
    for key in ("aerial", "sentinel"):
        assert _rel(got[key], want[key]) < 5e-5


def test_winograd_model_with_unknown_input_size_and_saved(tmp_path):
    keras.utils.set_random_seed(0)
    folded = fold_batchnorm(build_model({"arch": "unet", "input_size": None}))
    converted = winograd_model(folded)
    rng = np.random.RandomState(0)
    x = {"aerial": rng.randint(0, 256, (1, 32, 64, 5)).astype(np.uint8)}
    assert _rel(converted(x)["aerial"], folded(x)["aerial"]) < 5e-5
    path = str(tmp_path / "winograd.keras")
    converted.save(path)
    back = keras.models.load_model(path)
    np.testing.assert_array_equal(back(x)["aerial"], converted(x)["aerial"])
