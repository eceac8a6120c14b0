"""A run SIGKILLed after its first epoch resumes at the next epoch and ends bit-identical.

Three processes train the same config on the synthetic records: A without
interruption; B killed right after its epoch-1 backup is committed; C restarted
on B's --model_dir. C must start at epoch 2 (index 1) and end with A's weights,
optimizer state, learning rate and history. A small stand-in model (conv +
BatchNorm) replaces `build_model` to keep the three runs fast; the machinery
under test (backup, callback state, per-epoch pipelines with augmentation
finished in the train step by --aerial_on=device, deterministic ops) is the
real one.
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from training_helpers import REPO

_RUN = r"""
import json, time
import keras
import flair_tf.models
from flair_tf import train
from flair_tf.training import callbacks as cb

def tiny_model(config):
    inp = keras.Input((None, None, config["in_channels"]), name="aerial", dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(config["num_classes"], 1)(x)
    return keras.Model({"aerial": inp}, {"aerial": x})

flair_tf.models.build_model = tiny_model
if PAUSE_AFTER_EPOCH_1:
    save = cb.BackupAndRestore._save
    def slow_save(self, epoch):
        save(self, epoch)
        if epoch == 1:
            print("BACKUP_1_DONE", flush=True)
            time.sleep(120)  # killed here by the test
    cb.BackupAndRestore._save = slow_save

result = train.train({"model_dir": MODEL_DIR, "data_dir": DATA_DIR, "epochs": 3, "batch_size": 4,
                      "optimizer": "adam", "learning_rate": 0.01, "augment": True, "aerial_on": "device", "deterministic": True,
                      "plateau_patience": 0, "plateau_cooldown": 0, "tensorboard_images": 0, "verbose": "0"})
print(json.dumps({"initial_epoch": result["initial_epoch"], "history": result["history"]}))
"""


def _code(model_dir, data_dir, pause):
    return (_RUN.replace("PAUSE_AFTER_EPOCH_1", str(pause))
            .replace("MODEL_DIR", repr(model_dir)).replace("DATA_DIR", repr(data_dir)))


def _weights(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.slow
def test_killed_run_resumes_and_matches_uninterrupted(tmp_path, flair1_records, snippet):
    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    a = snippet.json(_code(a_dir, flair1_records, False))

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", _code(b_dir, flair1_records, True)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if "BACKUP_1_DONE" in line or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = json.load(open(os.path.join(b_dir, "backup", "state.json")))
    assert state["epoch"] == 1

    c = snippet.json(_code(b_dir, flair1_records, False))
    assert c["initial_epoch"] == 1 and len(c["history"]) == 3
    for ha, hc in zip(a["history"], c["history"]):
        assert hc["loss"] == pytest.approx(ha["loss"], rel=1e-6)
        assert hc["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-6)
    # Weights + optimizer slots + lr + iterations (the backup) and the last checkpoint.
    for rel in ("backup/epoch-0003.weights.h5", "checkpoints/last.weights.h5", "checkpoints/best.weights.h5"):
        wa, wc = _weights(os.path.join(a_dir, rel)), _weights(os.path.join(b_dir, rel))
        assert wa.keys() == wc.keys() and len(wa) >= 6
        for name in wa:
            np.testing.assert_allclose(wc[name], wa[name], rtol=1e-6, atol=1e-7, err_msg=f"{rel}:{name}")
    # The three epochs really changed the weights (the comparison is not vacuous).
    assert a["history"][0]["loss"] != a["history"][2]["loss"]
