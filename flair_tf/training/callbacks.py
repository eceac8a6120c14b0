"""Training callbacks: the reference LR schedule and stopping, checkpoints, preemption backup.

* `TorchReduceLROnPlateau`: PyTorch's `ReduceLROnPlateau` exactly (relative
  threshold, cooldown, min lr), which Keras' absolute `min_delta` cannot express.
* `EarlyStopping`: Lightning's rule (patience on `val_loss`, `min_delta` 0).
* `BestAndLastCheckpoint`: `checkpoints/best.weights.h5` (lowest `val_loss`)
  and `checkpoints/last.weights.h5`, model weights only, written atomically.
* `BackupAndRestore`: everything a killed run needs to continue at the next
  epoch with the same result: weights + optimizer state, the epoch, the state of
  the callbacks above and the history; committed by an atomic rename of
  `state.json`, so a kill at any instant leaves the previous backup usable.

Every stateful callback here has `get_state()` / `set_state()` (JSON values),
which `BackupAndRestore` saves and restores. Only the chief writes files.
The TensorBoard callback lives in `flair_tf.training.tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Protocol

import keras
import tensorflow as tf
from absl import logging


class Stateful(Protocol):
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def save_model_weights(model: keras.Model, path: str, include_optimizer: bool = False) -> None:
    """Writes `model`'s weights to `path` (`*.weights.h5`, local or gs://) atomically.

    Without the optimizer the file loads into a freshly built model
    (`build_model(config).load_weights(path)`).
    """
    from keras.src.saving import saving_lib  # objects_to_skip is not in the public API

    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    skip = [] if include_optimizer or model.optimizer is None else [model.optimizer]
    saving_lib.save_weights_only(model, tmp, objects_to_skip=skip)
    tf.io.gfile.rename(tmp, path, overwrite=True)


# ----------------------------------------------------------------------------------------
# Learning-rate schedule and stopping.


class TorchPlateau:
    """PyTorch `ReduceLROnPlateau(mode="min")` as a pure state machine.

    ``step(value, lr) -> new lr``: an epoch improves iff
    ``value < best * (1 - threshold)`` ("rel") or ``value < best - threshold``
    ("abs"); after more than `patience` bad epochs the lr becomes
    ``max(lr * factor, min_lr)`` (kept if the change is below `eps`), then
    `cooldown` epochs follow during which bad epochs are not counted.
    """

    def __init__(self, factor=0.5, patience=10, threshold=1e-4, threshold_mode="rel", cooldown=4, min_lr=1e-7, eps=1e-8):
        if factor >= 1.0:
            raise ValueError(f"factor must be < 1. Received: factor={factor}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs'. Received: {threshold_mode!r}")
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.threshold_mode, self.cooldown, self.min_lr, self.eps = threshold_mode, cooldown, min_lr, eps
        self.best = math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def is_better(self, value: float) -> bool:
        if self.threshold_mode == "rel":
            return value < self.best * (1.0 - self.threshold)
        return value < self.best - self.threshold

    def step(self, value: float, lr: float) -> float:
        if self.is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.eps:
                lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return lr

    def get_state(self) -> dict[str, Any]:
        return {"best": None if math.isinf(self.best) else self.best,
                "num_bad_epochs": self.num_bad_epochs, "cooldown_counter": self.cooldown_counter}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])


class TorchReduceLROnPlateau(keras.callbacks.Callback):
    """Keras callback applying `TorchPlateau` to the optimizer's lr at each epoch end.

    Args:
      monitor: the log key (default "val_loss"; "loss" when there is no validation).
      **plateau_kwargs: `TorchPlateau` arguments (the reference: factor 0.5,
        patience 10, cooldown 4, min_lr 1e-7, threshold 1e-4 relative).
    """

    def __init__(self, monitor: str = "val_loss", **plateau_kwargs):
        super().__init__()
        self.monitor = monitor
        self.plateau = TorchPlateau(**plateau_kwargs)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.monitor not in logs:
            logging.warning("ReduceLROnPlateau: %r not in the logs (%s); lr unchanged.", self.monitor, sorted(logs))
            return
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        new_lr = self.plateau.step(float(logs[self.monitor]), lr)
        if new_lr != lr:
            self.model.optimizer.learning_rate.assign(new_lr)
            logging.info("Epoch %d: %s plateaued, learning rate %.3g -> %.3g", epoch + 1, self.monitor, lr, new_lr)

    def get_state(self):
        return self.plateau.get_state()

    def set_state(self, state):
        self.plateau.set_state(state)


class EarlyStopping(keras.callbacks.Callback):
    """Stops when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    Lightning's rule (improvement iff ``value < best - min_delta``; stop when
    ``wait >= patience``), resumable through `get_state`/`set_state`.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 30, min_delta: float = 0.0):
        super().__init__()
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best = math.inf
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            logging.warning("EarlyStopping: %r not in the logs; not stopping.", self.monitor)
            return
        value = float(logs[self.monitor])
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            logging.info("Early stopping at epoch %d: no %s improvement for %d epochs.", epoch + 1, self.monitor, self.wait)

    def get_state(self):
        return {"best": None if math.isinf(self.best) else self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def set_state(self, state):
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]


# ----------------------------------------------------------------------------------------
# Checkpoints and backup.


class BestAndLastCheckpoint(keras.callbacks.Callback):
    """Saves `best.weights.h5` (lowest `monitor`, strict improvement) and `last.weights.h5`.

    Args:
      directory: the `checkpoints/` folder (local or gs://).
      monitor: log key to minimise ("val_loss"; falls back to "loss" if absent).
      chief: False on non-chief workers (they write nothing).
    """

    def __init__(self, directory: str, monitor: str = "val_loss", chief: bool = True):
        super().__init__()
        self.directory, self.monitor, self.chief = directory, monitor, chief
        self.best = math.inf
        self.best_epoch: int | None = None

    @property
    def best_path(self) -> str:
        return os.path.join(self.directory, "best.weights.h5")

    @property
    def last_path(self) -> str:
        return os.path.join(self.directory, "last.weights.h5")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        key = self.monitor if self.monitor in logs else "loss"
        value = float(logs.get(key, math.nan))
        improved = value < self.best
        if improved:
            self.best, self.best_epoch = value, epoch
        if not self.chief:
            return
        tf.io.gfile.makedirs(self.directory)
        save_model_weights(self.model, self.last_path)
        if improved:
            save_model_weights(self.model, self.best_path)
            logging.info("Epoch %d: %s improved to %.5f, saved %s", epoch + 1, key, value, self.best_path)

    def get_state(self):
        return {"best": None if math.isinf(self.best) else self.best, "best_epoch": self.best_epoch}

    def set_state(self, state):
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.best_epoch = state["best_epoch"]


class BackupAndRestore(keras.callbacks.Callback):
    """Preemption-safe training state in `backup_dir`, restored by `restore()` before `fit`.

    At each epoch end (chief only): weights + optimizer go to
    ``epoch-NNNN.weights.h5``, then ``state.json`` (epoch, callback states,
    history) is written to a temporary file and renamed over the
    old one -- the commit point -- and older weight files are deleted. Unlike
    `keras.callbacks.BackupAndRestore` this keeps the callbacks' state (plateau
    counters, best val_loss, early-stopping patience), so a resumed run ends
    exactly like an uninterrupted one, and an early-stopped run stays stopped.

    Args:
      backup_dir: the `backup/` folder (local or gs://).
      stateful: name -> object with `get_state`/`set_state`, saved with the backup.
      chief: False on non-chief workers (they restore but never write).
    """

    STATE = "state.json"

    def __init__(self, backup_dir: str, stateful: dict[str, Stateful] | None = None, chief: bool = True):
        super().__init__()
        self.backup_dir, self.stateful, self.chief = backup_dir, dict(stateful or {}), chief
        self.history: list[dict[str, float]] = []
        self.epoch_times: list[float] = []
        self._t0 = 0.0

    @property
    def state_path(self) -> str:
        return os.path.join(self.backup_dir, self.STATE)

    def read_state(self) -> dict[str, Any] | None:
        if not tf.io.gfile.exists(self.state_path):
            return None
        with tf.io.gfile.GFile(self.state_path) as f:
            return json.load(f)

    def restore(self, model: keras.Model) -> int:
        """Loads the last backup into `model` (compiled) and the callbacks.

        Returns:
          The epoch to start at (0 without a backup).
        """
        state = self.read_state()
        if state is None:
            return 0
        weights = os.path.join(self.backup_dir, state["weights"])
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(weights)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"Cannot restore the backup {weights} named by {self.state_path} ({e}). Delete "
                f"{self.backup_dir} to start over, or point --model_dir elsewhere."
            ) from e
        for name, obj in self.stateful.items():
            if name in state.get("callbacks", {}):
                obj.set_state(state["callbacks"][name])
        self.history = list(state.get("history", []))
        logging.info("Restored %s: resuming after epoch %d", weights, state["epoch"])
        return int(state["epoch"])

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({k: float(v) for k, v in (logs or {}).items() if _is_number(v)})
        self.epoch_times.append(time.monotonic() - self._t0)
        self._save(epoch + 1)

    def _save(self, epoch: int) -> None:
        if not self.chief:
            return
        tf.io.gfile.makedirs(self.backup_dir)
        name = f"epoch-{epoch:04d}.weights.h5"
        save_model_weights(self.model, os.path.join(self.backup_dir, name), include_optimizer=True)
        state = {
            "epoch": epoch,
            "weights": name,
            "callbacks": {k: obj.get_state() for k, obj in self.stateful.items()},
            "history": self.history,
        }
        _write_text_atomic(self.state_path, json.dumps(state, indent=1))
        for old in tf.io.gfile.glob(os.path.join(self.backup_dir, "epoch-*.weights.h5")):
            if os.path.basename(old) != name:
                tf.io.gfile.remove(old)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
