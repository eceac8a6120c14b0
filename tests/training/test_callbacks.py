"""LR plateau (PyTorch semantics), early stopping, checkpoints, backup/restore, TensorBoard."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from flair_tf import nomenclature
from flair_tf.training import callbacks as cb
from flair_tf.training.metrics import ConfusionMatrixMetric
from flair_tf.training.tensorboard import FlairTensorBoard, render_confusion_matrix, render_patches


def test_plateau_hand_simulated_sequence():
    # patience 2, cooldown 1, factor 0.5, rel threshold 0.1: improvement iff v < best * 0.9.
    p = cb.TorchPlateau(factor=0.5, patience=2, threshold=0.1, cooldown=1, min_lr=0.3)
    values = [10, 9.5, 9.2, 9.1, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    lrs, lr = [], 1.0
    for v in values:
        lr = p.step(v, lr)
        lrs.append(lr)
    # e0 best=10; e1 9.5 !< 9 bad1; e2 bad2; e3 bad3 > 2 -> 0.5, cooldown 1; e4 8.0 < 9 best (cooldown
    # ends); e5 bad1; e6 bad2; e7 bad3 -> 0.3 (min_lr), cooldown; e8 cooldown (bad reset); e9 bad1;
    # e10 bad2.
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3]


_TORCH_PLATEAU = r"""
import json, sys, torch
values = json.loads(sys.argv[1]) if len(sys.argv) > 1 else VALUES
param = torch.nn.Parameter(torch.zeros(1))
opt = torch.optim.SGD([param], lr=0.02)
sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=10, cooldown=4, min_lr=1e-7)
lrs = []
for v in values:
    sched.step(v)
    lrs.append(opt.param_groups[0]["lr"])
print(json.dumps(lrs))
"""


def test_plateau_matches_pytorch(snippet):
    """The same sequence through torch's own scheduler (in a subprocess: torch and TF clash in one process)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    values = np.concatenate([np.linspace(1, 0.5, 15), 0.5 + rng.normal(0, 1e-5, 40), np.linspace(0.5, 0.2, 10),
                             np.full(60, 0.2)]).tolist()
    torch_lrs = snippet.json(_TORCH_PLATEAU.replace("VALUES", json.dumps(values)))
    ours, lr, lrs = cb.TorchPlateau(), 0.02, []
    for v in values:
        lr = ours.step(v, lr)
        lrs.append(lr)
    np.testing.assert_allclose(lrs, torch_lrs, rtol=1e-12)
    assert lrs[-1] < 0.02 / 4  # several reductions happened


def test_plateau_state_round_trip():
    a = cb.TorchPlateau(patience=1)
    lr = 1.0
    for v in [3, 3, 3, 2.9]:
        lr = a.step(v, lr)
    b = cb.TorchPlateau(patience=1)
    b.set_state(json.loads(json.dumps(a.get_state())))
    assert [a.step(3.0, 1.0) for _ in range(8)] == [b.step(3.0, 1.0) for _ in range(8)]


class _Model:
    stop_training = False


def test_early_stopping_patience_and_state():
    es = cb.EarlyStopping(patience=3)
    es.set_model(_Model())
    for epoch, v in enumerate([1.0, 0.9, 0.9, 0.95, 0.91]):
        es.on_epoch_end(epoch, {"val_loss": v})
    assert es.stopped_epoch == 4 and es.model.stop_training
    es2 = cb.EarlyStopping(patience=3)
    es2.set_state(es.get_state())
    assert es2.wait == 3 and es2.best == 0.9


def _tiny_model_and_data(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="aerial", dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(13, 3, padding="same", name="head")(x)
    model = keras.Model({"aerial": inp}, {"aerial": x})
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(8, 8, 8, 3)).astype(np.uint8)
    labels = (images[..., 0] // 20).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices(({"aerial": images}, {"aerial": labels})).batch(4)
    return model, ds, images, labels


def _compile(model, metric):
    model.compile(keras.optimizers.Adam(1e-2), loss={"aerial": keras.losses.SparseCategoricalCrossentropy(True)},
                  weighted_metrics={"aerial": [metric]})


def test_checkpoints_backup_and_restore(tmp_path):
    model, ds, *_ = _tiny_model_and_data()
    _compile(model, ConfusionMatrixMetric(13))
    ckpt = cb.BestAndLastCheckpoint(str(tmp_path / "checkpoints"))
    plateau = cb.TorchReduceLROnPlateau(patience=0, cooldown=0, factor=0.5)
    backup = cb.BackupAndRestore(str(tmp_path / "backup"), {"checkpoint": ckpt, "plateau": plateau})
    model.fit(ds, validation_data=ds, epochs=3, verbose=0, shuffle=False, callbacks=[ckpt, plateau, backup])
    assert os.path.exists(ckpt.best_path) and os.path.exists(ckpt.last_path)
    state = json.load(open(tmp_path / "backup" / "state.json"))
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert sorted(os.listdir(tmp_path / "backup")) == ["epoch-0003.weights.h5", "state.json"]
    best_val = min(h["val_loss"] for h in state["history"])
    assert state["callbacks"]["checkpoint"]["best"] == pytest.approx(best_val)
    # last == the in-memory weights; best/last load into a fresh uncompiled model.
    fresh, *_ = _tiny_model_and_data(seed=1)
    fresh.load_weights(ckpt.last_path)
    np.testing.assert_array_equal(fresh.get_layer("head").kernel.numpy(), model.get_layer("head").kernel.numpy())

    # Restore into a new model + callbacks: weights, optimizer state, lr and callback state.
    model2, ds2, *_ = _tiny_model_and_data(seed=2)
    _compile(model2, ConfusionMatrixMetric(13))
    ckpt2 = cb.BestAndLastCheckpoint(str(tmp_path / "checkpoints"))
    plateau2 = cb.TorchReduceLROnPlateau(patience=0, cooldown=0, factor=0.5)
    backup2 = cb.BackupAndRestore(str(tmp_path / "backup"), {"checkpoint": ckpt2, "plateau": plateau2})
    assert backup2.restore(model2) == 3
    np.testing.assert_array_equal(model2.get_layer("head").kernel.numpy(), model.get_layer("head").kernel.numpy())
    assert int(model2.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 6
    assert float(model2.optimizer.learning_rate.numpy()) == pytest.approx(float(model.optimizer.learning_rate.numpy()))
    assert ckpt2.best == pytest.approx(ckpt.best) and plateau2.get_state() == plateau.get_state()
    assert len(backup2.history) == 3


def test_interrupted_write_keeps_previous_backup(tmp_path):
    model, ds, *_ = _tiny_model_and_data()
    _compile(model, ConfusionMatrixMetric(13))
    backup = cb.BackupAndRestore(str(tmp_path))
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[backup])
    # A kill during the next save leaves a partial weight file and a temp state file.
    (tmp_path / "epoch-0002.weights.h5").write_bytes(b"\x89HDF partial")
    (tmp_path / "state.json.tmp").write_text('{"epoch": 2, "weights": "epo')
    model2, *_ = _tiny_model_and_data(seed=3)
    _compile(model2, ConfusionMatrixMetric(13))
    assert cb.BackupAndRestore(str(tmp_path)).restore(model2) == 1
    np.testing.assert_array_equal(model2.get_layer("head").kernel.numpy(), model.get_layer("head").kernel.numpy())


def test_render_images():
    cm = np.array([[8, 2], [0, 0]])
    img = render_confusion_matrix(np.pad(cm, ((0, 11), (0, 11))), cell=20)
    assert img.shape == (1, 280, 280, 3) and img.dtype == np.uint8
    # Cell (0, 0) at 80 % is darker than cell (0, 1) at 20 %; an empty row stays white.
    assert img[0, 25, 22].sum() < img[0, 25, 42].sum() < 3 * 255
    assert (img[0, 42, 22] == 255).all()
    labels = np.array([[[0, 12]]])
    strips = render_patches(np.full((1, 1, 2, 5), 7, np.uint8), labels, labels[..., ::-1], 13)
    assert strips.shape == (1, 1, 2 + 2 + 2 + 2 + 2, 3)
    np.testing.assert_array_equal(strips[0, 0, 4], nomenclature.palette(13)[0])
    np.testing.assert_array_equal(strips[0, 0, 8], nomenclature.palette(13)[12])


def _tags(event_dir):
    tags = set()
    for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def test_tensorboard_event_tags(tmp_path):
    model, ds, images, labels = _tiny_model_and_data()
    metric = ConfusionMatrixMetric(13)
    _compile(model, metric)
    tb = FlairTensorBoard(str(tmp_path), metric, ({"aerial": images[:2]}, {"aerial": labels[:2]}), global_batch_size=4)
    model.fit(ds, validation_data=ds, epochs=2, verbose=0, shuffle=False, callbacks=[tb])
    train, val = _tags(tmp_path / "train"), _tags(tmp_path / "validation")
    assert {"loss", "learning_rate", "steps_per_second", "examples_per_second", "iou/building", "overall_accuracy"} <= train
    assert any(t.endswith("miou") for t in train)
    assert {"loss", "iou/building", "confusion_matrix", "patches"} <= val
    assert any(t.endswith("miou") for t in val)
    assert not any(t.startswith("val_") for t in val)
    assert len(tb.throughput) == 2 and tb.throughput[0]["examples_per_second"] > 0
