"""Two fixes that let Keras 3's `fit` train under MultiWorkerMirroredStrategy on several workers.

Keras 3 (3.15, with TF 2.21; keras-team/keras#20585, tensorflow/tensorflow#72388) fails there
before and during the first step:

1. Before `fit` (and `evaluate`) runs a step, `_maybe_symbolic_build` all-reduces the whole
   first input batch (a MEAN over the workers) only to learn its shapes and dtypes. The
   collective cannot take a nested structure: ``ValueError: Attempt to convert a value
   (PerReplica ...) with an unsupported type``. Fixed: the first local replica's batch, which
   has the same shapes and dtypes.
2. Each step's logs (scalar metric results) are reduced with
   ``strategy.reduce("MEAN", v, axis=0)``: ``Invalid reduction dimension 0 for input with 0
   dimensions``. Fixed: scalars are averaged over the replicas of all workers (``axis=None``),
   as Keras does on one machine; anything else goes to Keras as before.

`install()` puts both into the process's Keras trainer. They change nothing unless the
strategy is a MultiWorkerMirroredStrategy in multi-worker mode, where Keras fails without
them. `tests/training/test_strategy.py` checks that plain Keras still fails on a real
two-worker cluster of local processes: when a Keras release passes it, this module can go.

Keras internals used (checked by `install`): `TensorFlowTrainer._maybe_symbolic_build`,
`reduce_per_replica` and `_collective_all_reduce_multi_worker` in
`keras.src.backend.tensorflow.trainer`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src import tree

_INSTALLED = False


def _trainer_module():
    from keras.src.backend.tensorflow import trainer  # noqa: PLC0415 - private, checked below

    missing = [name for name in ("TensorFlowTrainer", "reduce_per_replica", "_collective_all_reduce_multi_worker")
               if not hasattr(trainer, name)]
    if missing or not hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build"):
        raise RuntimeError(
            f"Keras {keras.__version__} changed the TensorFlow trainer that flair_tf.training.multi_worker "
            f"fixes (missing: {missing or ['TensorFlowTrainer._maybe_symbolic_build']}). Check whether this "
            "Keras trains under MultiWorkerMirroredStrategy on several workers by itself "
            "(tests/training/test_strategy.py), or use Keras 3.15."
        )
    return trainer


def _first_local_value(strategy, x):
    if isinstance(x, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(x)[0]
    return x


def install() -> None:
    """Installs both fixes (idempotent); see the module docstring."""
    global _INSTALLED
    if _INSTALLED:
        return
    trainer = _trainer_module()
    is_multi_worker = trainer._collective_all_reduce_multi_worker  # pylint: disable=protected-access
    keras_build = trainer.TensorFlowTrainer._maybe_symbolic_build  # pylint: disable=protected-access
    keras_reduce = trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy  # pylint: disable=protected-access
        if iterator is None or strategy is None or not is_multi_worker(strategy):
            return keras_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tree.map_structure(lambda x: _first_local_value(strategy, x), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def reduce_one(v):
            # With one replica per worker `strategy.run` gives plain tensors, not PerReplica.
            local = strategy.experimental_local_results(v)
            if all(getattr(getattr(t, "shape", None), "rank", None) == 0 for t in local):
                return strategy.reduce("MEAN", v, axis=None)
            return keras_reduce(v, strategy, reduction)

        return tree.map_structure(reduce_one, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build  # pylint: disable=protected-access
    trainer.reduce_per_replica = reduce_per_replica
    _INSTALLED = True
