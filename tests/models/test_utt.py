"""U-T&T builder: parameter counts and each reference quirk with its switch."""

from __future__ import annotations

import numpy as np
import pytest

from flair_tf.models import build_utt
from flair_tf.models.utt import collapsed_mlp_widths


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def test_parameter_counts():
    assert _trainable(build_utt(input_size=512)) == 27_254_744
    assert _trainable(build_utt(input_size=512, use_metadata=True)) == 27_254_744 + 5_552
    assert [collapsed_mlp_widths(64, c) for c in (5, 64, 128, 256, 512)] == [
        (45, 26, 5), (128, 128, 64), (85, 106, 128), (128, 192, 256), (213, 362, 512)]


def _inputs(seed=0, b=2, t=3):
    rng = np.random.RandomState(seed)
    return {
        "aerial": rng.randint(0, 256, (b, 64, 64, 5)).astype(np.uint8),
        "sentinel": rng.rand(b, t, 16, 16, 10).astype(np.float32),
        "sentinel_dates": np.sort(rng.randint(-100, 200, (b, t)), 1).astype(np.float32),
        "sentinel_pad_mask": np.zeros((b, t), bool),
    }


@pytest.fixture(scope="module")
def reference_model():
    return build_utt(input_size=64, sentinel_size=16)


def _variant(reference_model, **kwargs):
    model = build_utt(input_size=64, sentinel_size=16, **kwargs)
    model.set_weights(reference_model.get_weights())
    return model


def _run(model, inputs):
    out = model(inputs, training=False)
    return {k: v.numpy() for k, v in out.items()}


def test_collapsed_vector_comes_from_sample_zero(reference_model):
    x = _inputs()
    y = _inputs()
    y["sentinel"][0] += 1.0  # change only sample 0's Sentinel series
    ref_a, ref_b = _run(reference_model, x), _run(reference_model, y)
    # Reference quirk: sample 1's aerial logits change although its own inputs did not.
    assert np.abs(ref_a["aerial"][1] - ref_b["aerial"][1]).max() > 1e-5
    fixed = _variant(reference_model, per_sample_collapse=True)
    a, b = _run(fixed, x), _run(fixed, y)
    np.testing.assert_allclose(a["aerial"][1], b["aerial"][1], atol=1e-6)
    assert np.abs(a["aerial"][0] - b["aerial"][0]).max() > 1e-5
    # The output shapes/dtypes of contract D.
    assert a["aerial"].shape == a["sentinel"].shape == (2, 64, 64, 13)
    assert a["aerial"].dtype == a["sentinel"].dtype == np.float32


def test_level_zero_fusion_is_unused(reference_model):
    x = _inputs(1)
    before = _run(reference_model, x)
    model = _variant(reference_model)
    layer = model.get_layer("fm_utae_featmap_cropped.conv_list.0")
    layer.kernel.assign(layer.kernel.numpy() + 5.0)
    model.get_layer("fm_utae_featmap_collapsed.mlps.0.6").bias.assign(np.full(5, 9.0, np.float32))
    after = _run(model, x)
    np.testing.assert_array_equal(after["aerial"], before["aerial"])
    # ... while level 1 is used.
    model.get_layer("fm_utae_featmap_cropped.conv_list.1").bias.assign(np.full(64, 3.0, np.float32))
    assert np.abs(_run(model, x)["aerial"] - before["aerial"]).max() > 1e-5


def test_modality_dropout_at_inference(reference_model):
    x, y = _inputs(2), _inputs(2)
    y["sentinel"] *= 3.0
    dropped = _variant(reference_model, drop_utae_modality=1.0)  # reference: draws at inference too
    np.testing.assert_array_equal(_run(dropped, x)["aerial"], _run(dropped, y)["aerial"])
    train_only = _variant(reference_model, drop_utae_modality=1.0, modality_dropout_training_only=True)
    np.testing.assert_array_equal(_run(train_only, x)["aerial"], _run(reference_model, x)["aerial"])
    with pytest.raises(ValueError, match=r"drop_utae_modality must be in \[0, 1\]"):
        build_utt(input_size=64, sentinel_size=16, drop_utae_modality=1.5)


def test_aux_head_is_floor_nearest_upsampling_of_the_crop(reference_model):
    aux = _run(reference_model, _inputs(3))["sentinel"]
    src = np.floor(np.arange(64) * (10 / 64)).astype(int)  # PyTorch 'nearest'
    for i in range(64):
        for j in (0, 17, 63):
            same = np.where(src == src[i])[0]
            np.testing.assert_array_equal(aux[:, same, j], np.repeat(aux[:, i : i + 1, j], len(same), axis=1))
    # Block edges: rows 6 and 7 come from crop rows 0 and 1 (half-pixel nearest would put the edge elsewhere).
    assert src[6] == 0 and src[7] == 1
    assert np.abs(aux[:, 6] - aux[:, 7]).max() > 0
