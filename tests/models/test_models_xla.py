"""XLA (jit_compile=True) and mixed precision: train step and predict, float32 logits.

U-T&T contains every layer of the package (ResNet34 encoder, U-Net decoder and
head, metadata MLP, U-TAE, L-TAE, fusion and auxiliary head), so one model
covers them all; XLA compilation of a 27M-parameter graph on 2 CPU cores costs
about a minute per policy, hence one policy: mixed_bfloat16 (the TPU one), the
float32 graph being the same without casts.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from flair_tf.models import build_utt


@pytest.mark.slow
def test_utt_trains_and_predicts_under_xla_and_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_utt(input_size=32, sentinel_size=16, num_dates=2, use_metadata=True)
        assert model.get_layer("arch_vhr.encoder.conv1").compute_dtype == "bfloat16"
        losses = {k: keras.losses.SparseCategoricalCrossentropy(from_logits=True) for k in ("aerial", "sentinel")}
        # A small learning rate: batch-2 BatchNorm statistics over 1x1 bottlenecks give huge
        # gradients at 32 px, and a divergent step would make this test about the optimiser.
        model.compile(optimizer=keras.optimizers.SGD(1e-5), loss=losses, jit_compile=True)
        rng = np.random.RandomState(0)
        x = {
            "aerial": rng.randint(0, 256, (2, 32, 32, 5)).astype(np.uint8),
            "metadata": rng.rand(2, 45).astype(np.float32),
            "sentinel": rng.rand(2, 2, 16, 16, 10).astype(np.float32),
            "sentinel_dates": np.array([[-30.0, 60.0], [10.0, 0.0]], np.float32),
            "sentinel_pad_mask": np.array([[False, False], [False, True]]),
        }
        y = {k: rng.randint(0, 13, (2, 32, 32)) for k in ("aerial", "sentinel")}
        before = model.get_layer("arch_vhr.decoder.blocks.0.conv1.0").kernel.numpy().copy()
        history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert np.abs(model.get_layer("arch_vhr.decoder.blocks.0.conv1.0").kernel.numpy() - before).max() > 0
        assert model.get_layer("arch_vhr.decoder.blocks.0.conv1.0").kernel.dtype == "float32"
        out = model.predict(x, batch_size=2, verbose=0)
        assert out["aerial"].dtype == np.float32 and out["sentinel"].dtype == np.float32
        assert out["aerial"].shape == (2, 32, 32, 13) and np.all(np.isfinite(out["aerial"]))
        # The same model called eagerly (no XLA) under the bf16 policy agrees to bf16 precision.
        eager = model(x, training=False)
        assert eager["aerial"].dtype == "float32"
        np.testing.assert_allclose(eager["aerial"].numpy(), out["aerial"], atol=0.1, rtol=0.05)
    finally:
        keras.mixed_precision.set_global_policy("float32")
