"""Fused SGD / Adam: Keras's results, eagerly, under XLA and under MirroredStrategy; same checkpoints."""

import keras
import numpy as np
import pytest

from flair_tf.training import optimizers

CASES = {
    "sgd": lambda m: m.SGD(0.1),
    "sgd_momentum": lambda m: m.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda m: m.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda m: m.Adam(0.01),
    "adam_amsgrad": lambda m: m.Adam(0.01, amsgrad=True),  # Keras's own path
}


def _model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def _train(opt, steps=6, jit=False):
    model = _model()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    rng = np.random.RandomState(1)
    x, y = rng.randn(32, 8).astype("float32"), rng.randint(0, 3, 32)
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_and_slots_as_keras(case, jit):
    ours = _train(CASES[case](optimizers), jit=jit)
    theirs = _train(CASES[case](keras.optimizers), jit=jit)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    slots = [(v.path, v.numpy()) for v in ours.optimizer.variables]
    their_slots = [(v.path, v.numpy()) for v in theirs.optimizer.variables]
    # The same variables (names differ only by Keras's unique-name counters).
    kind = lambda path, value: (path.rsplit("/", 1)[-1].rsplit("_", 1)[-1], value.shape)  # noqa: E731
    assert [kind(*s) for s in slots] == [kind(*s) for s in their_slots]
    for (path, a), (_, b) in zip(slots, their_slots):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
    moved = max(float(np.abs(w.numpy() - v.numpy()).max()) for w, v in zip(ours.weights, _model().weights))
    assert moved > 1e-3  # the updates did happen


def test_config_and_checkpoint_interchangeable_with_keras(tmp_path):
    ours = optimizers.Adam(0.003, beta_1=0.8, name="opt")
    assert ours.get_config() == keras.optimizers.Adam(0.003, beta_1=0.8, name="opt").get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(ours))
    assert type(restored) is optimizers.Adam
    model = _train(optimizers.Adam(0.01), steps=2)
    model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    assert type(back.optimizer) is optimizers.Adam
    for a, b in zip(model.optimizer.variables, back.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


_MIRRORED = r"""
import json
import numpy as np, tensorflow as tf, keras
from flair_tf.training import optimizers

rng = np.random.RandomState(1)
x, y = rng.randn(16, 8).astype("float32"), rng.randint(0, 3, 16)

def train(strategy, module, name):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8,))
        model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(16, activation="relu")(inp)))
        opt = module.SGD(0.1, momentum=0.9) if name == "sgd" else module.Adam(0.01)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    return np.concatenate([w.numpy().ravel() for w in model.weights])

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {}
for name in ("sgd", "adam"):
    ours = train(mirrored, optimizers, name)
    keras_single = train(tf.distribute.get_strategy(), keras.optimizers, name)
    keras_mirrored = train(mirrored, keras.optimizers, name)
    out[name] = {"vs_keras_mirrored": float(np.abs(ours - keras_mirrored).max()),
                 "vs_keras_single": float(np.abs(ours - keras_single).max())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_mirrored_strategy_updates_every_replica_like_keras(snippet):
    out = snippet.json(_MIRRORED, logical_cpus=2)
    for name, r in out.items():
        assert r["vs_keras_mirrored"] < 1e-5, (name, r)
        assert r["vs_keras_single"] < 1e-4, (name, r)
