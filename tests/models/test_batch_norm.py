"""`layers.BatchNormalization` (fused kernel) against PyTorch's ``nn.BatchNorm`` and Keras's layer."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from flair_tf.models import layers as L


def _layer(shape, seed=0):
    channels = shape[-1]
    layer = L.batch_norm("bn")
    layer.build((None,) + tuple(shape[1:]))
    rng = np.random.RandomState(seed)
    layer.set_weights([
        rng.rand(channels).astype(np.float32) + 0.5,  # gamma
        rng.randn(channels).astype(np.float32) * 0.1,  # beta
        rng.randn(channels).astype(np.float32),  # moving_mean
        rng.rand(channels).astype(np.float32) + 0.5,  # moving_variance
    ])
    return layer


def _reference(x, gamma, beta, mean, var, training, momentum=0.1, eps=1e-5):
    """nn.BatchNorm semantics in float64 numpy (channels last)."""
    x = x.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    if training:
        n = x.size // x.shape[-1]
        bm, bv = x.mean(axes), x.var(axes)
        y = (x - bm) / np.sqrt(bv + eps) * gamma + beta
        mean = (1 - momentum) * mean + momentum * bm
        var = (1 - momentum) * var + momentum * bv * n / (n - 1)
        return y, mean, var
    return (x - mean) / np.sqrt(var + eps) * gamma + beta, mean, var


@pytest.mark.parametrize("shape", [(2, 6, 5, 8), (7, 8), (2, 3, 4, 4, 8)])
@pytest.mark.parametrize("training", [False, True])
def test_matches_torch_semantics_for_any_rank(shape, training):
    layer = _layer(shape)
    gamma, beta, mean, var = [w.astype(np.float64) for w in layer.get_weights()]
    x = np.random.RandomState(1).randn(*shape).astype(np.float32) * 3 + 1
    y = layer(x, training=training)
    ref_y, ref_mean, ref_var = _reference(x, gamma, beta, mean, var, training)
    assert y.shape == shape
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=2e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref_var, rtol=1e-5)


def test_training_step_equals_torch_including_gradients():
    torch = pytest.importorskip("torch")
    layer = _layer((2, 6, 5, 8), seed=3)
    gamma, beta, mean, var = layer.get_weights()
    x = np.random.RandomState(2).randn(2, 6, 5, 8).astype(np.float32)
    w = np.random.RandomState(4).randn(2, 6, 5, 8).astype(np.float32)

    bn = torch.nn.BatchNorm2d(8, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        for p, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), (gamma, beta, mean, var)):
            p.copy_(torch.from_numpy(v))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    (bn.train()(tx) * torch.from_numpy(w.transpose(0, 3, 1, 2))).sum().backward()

    xv = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xv)
        loss = tf.reduce_sum(layer(xv, training=True) * w)
    gx, gg, gb = tape.gradient(loss, [xv, layer.gamma.value, layer.beta.value])
    np.testing.assert_allclose(gx.numpy(), tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(gg.numpy(), bn.weight.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(gb.numpy(), bn.bias.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), bn.running_var.numpy(), rtol=1e-5)


def test_keras_fallback_for_a_mask_and_identical_inference():
    """A mask takes Keras's path; without one, inference equals Keras's layer exactly."""
    layer = _layer((3, 5, 4))
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    plain.build((None, 5, 4))
    plain.set_weights(layer.get_weights())
    x = np.random.RandomState(5).randn(3, 5, 4).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(plain(x)), atol=1e-6)
    mask = np.ones((3, 5), bool)
    before = layer.moving_variance.numpy()
    np.testing.assert_allclose(np.asarray(layer(x, training=True, mask=mask)),
                               np.asarray(plain(x, training=True, mask=mask)), atol=1e-5)
    # Keras's update (biased variance), not the fused one.
    np.testing.assert_allclose(layer.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-6)
    assert not np.allclose(layer.moving_variance.numpy(), before)


def test_mixed_bfloat16_keeps_float32_statistics():
    layer = L.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="mixed_bfloat16")
    x = tf.cast(np.random.RandomState(6).randn(2, 4, 4, 8) * 2 + 3, tf.bfloat16)
    y = layer(x, training=True)
    assert y.dtype == tf.bfloat16
    assert layer.moving_mean.dtype == "float32"
    ref = _reference(np.asarray(tf.cast(x, tf.float32)), 1.0, 0.0, np.zeros(8), np.ones(8), True)
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), ref[0], atol=0.05)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref[1], atol=1e-2)


def test_config_round_trip_and_checkpoint_compatibility(tmp_path):
    layer = _layer((1, 3, 3, 4))
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(clone) is L.BatchNormalization and clone.epsilon == 1e-5 and clone.momentum == 0.9
    inputs = keras.Input((3, 3, 4))
    model = keras.Model(inputs, layer(inputs))
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    plain = keras.Model(inputs2 := keras.Input((3, 3, 4)), keras.layers.BatchNormalization(name="bn")(inputs2))
    plain.load_weights(path)  # the same variables, so Keras checkpoints interchange
    for a, b in zip(plain.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
