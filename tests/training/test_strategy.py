"""Strategy selection, absent-hardware errors, precision and steps_per_execution checks."""

import json
import math

import keras
import pytest
import tensorflow as tf

from training_helpers import free_ports, last_json, run_cluster, run_python, tf_config
from flair_tf.training import precision, strategy


def test_tpu_on_a_cpu_machine_says_what_to_do():
    with pytest.raises(RuntimeError) as e:
        strategy.get_strategy("tpu", tpu="local")
    msg = str(e.value)
    assert "--strategy=tpu --tpu='local': no TPU could be reached" in msg
    assert "tensorflow-tpu" in msg and "--strategy=default" in msg


def test_unknown_strategy_and_missingtf_config(monkeypatch):
    with pytest.raises(ValueError, match="--strategy must be one of default, one_device, mirrored"):
        strategy.get_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="TF_CONFIG"):
        strategy.get_strategy("multi_worker")


def test_mirrored_asking_for_absent_gpus():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this machine has GPUs")
    with pytest.raises(RuntimeError, match="only 0 GPU"):
        strategy.get_strategy("mirrored", num_gpus=2)


def test_default_and_one_device_are_chief():
    for name in ("default", "one_device"):
        s = strategy.get_strategy(name)
        assert s.num_replicas_in_sync == 1 and strategy.is_chief(s) and not strategy.is_tpu(s)


def test_precision_policy_and_validation():
    try:
        precision.set_precision("mixed_bfloat16")
        assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
    finally:
        precision.set_precision("float32")
    with pytest.raises(ValueError, match="--precision must be one of"):
        precision.set_precision("float64")


def test_steps_per_execution_check():
    default = tf.distribute.get_strategy()
    assert precision.check_steps_per_execution(4, default) == 4
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert precision.check_steps_per_execution(1, mirrored) == 1
    with pytest.raises(ValueError, match="keras-team/keras#19246.*--steps_per_execution=1"):
        precision.check_steps_per_execution(2, mirrored)
    with pytest.raises(ValueError, match=">= 1"):
        precision.check_steps_per_execution(0, default)


_PROBE = r"""
import json, numpy as np, tensorflow as tf, keras
from flair_tf.training import strategy as strategy_lib
strategy = strategy_lib.get_strategy("mirrored")
try:
    strategy_lib.split_cpu(3)
    late = "no error"
except RuntimeError as e:
    late = str(e)
x = np.ones((32, 4), "float32")
with strategy.scope():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    m.compile("sgd", "mse", steps_per_execution=2)
try:
    m.fit(tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8), epochs=1, verbose=0)
    fit = "FIT_OK"
except tf.errors.InvalidArgumentError as e:
    fit = "KERAS_BUG placeholder" if "placeholder" in str(e) else "OTHER " + str(e)[:300]
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "late": late, "fit": fit}))
"""


@pytest.fixture(scope="module")
def mirrored_probe():
    """One subprocess with 2 logical CPUs: a mirrored strategy, a late split, a spe=2 fit."""
    return last_json(run_python(_PROBE, logical_cpus=2))


def test_split_cpu_gives_two_replicas_and_refuses_late_split(mirrored_probe):
    assert mirrored_probe["replicas"] == 2
    assert "already initialised" in mirrored_probe["late"] and "--num_logical_cpus" in mirrored_probe["late"]


@pytest.mark.slow
def test_keras_still_fails_steps_per_execution_under_mirrored(mirrored_probe):
    """Documents the upstream bug that `check_steps_per_execution` guards against.

    If this fails with FIT_OK, Keras has fixed keras-team/keras#19246: relax the check.
    """
    assert mirrored_probe["fit"] == "KERAS_BUG placeholder", mirrored_probe["fit"]


_ONE_WORKER = r"""
import json
from flair_tf import train
r = train.train({"model_dir": ROOT, "data_dir": DATA, "task": "flair1", "arch": "unet",
                 "strategy": "multi_worker", "epochs": 1, "batch_size": 4, "steps_per_epoch": 2,
                 "validation_steps": 1, "tensorboard_images": 0, "verbose": "0"})
print(json.dumps({"replicas": r["num_replicas"], "epochs": r["epochs_completed"],
                  "loss": r["history"][-1]["loss"]}))
"""


def test_multi_worker_with_one_worker_trains(tmp_path, flair1_records):
    """Nothing starts TensorFlow's runtime before the strategy is made.

    MultiWorkerMirroredStrategy configures its collectives at creation, which fails once the
    runtime has started ("Collective ops must be configured at program startup"):
    `get_strategy` listed the logical GPUs first, for every strategy, and did that.
    """
    code = _ONE_WORKER.replace("ROOT", repr(str(tmp_path / "run"))).replace("DATA", repr(flair1_records))
    out = last_json(run_python(code, timeout=300, env={"TF_CONFIG": tf_config(free_ports(1), 0)}))
    assert out["replicas"] == 1 and out["epochs"] == 1 and out["loss"] == out["loss"]


_TWO_WORKER_FIT = r"""
import json, numpy as np, tensorflow as tf, keras
keras.utils.set_random_seed(0)
if FIXED:
    from flair_tf.training import multi_worker
    multi_worker.install()
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x = np.arange(64, dtype="float32").reshape(16, 4) / 64
with strategy.scope():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    m.compile("sgd", "mse", metrics=["mae"])
try:
    h = m.fit(tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4).repeat(), epochs=2,
              steps_per_epoch=2, verbose=0)
    fit = "FIT_OK"
    loss = h.history["loss"]
except Exception as e:
    fit, loss = "KERAS_BUG " + type(e).__name__ + ": " + str(e)[:200], None
print(json.dumps({"fit": fit, "loss": loss}), flush=True)
"""


def _two_worker_fits(fixed: bool) -> list[dict]:
    outs = []
    for p in run_cluster(_TWO_WORKER_FIT.replace("FIXED", repr(fixed)), 2):
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        outs.append(json.loads(lines[-1]) if lines else {"fit": "NO OUTPUT " + p.stderr[-1500:]})
    return outs


@pytest.mark.slow
def test_keras_still_fails_fit_under_multi_worker_with_two_workers():
    """Documents the upstream bug that `flair_tf.training.multi_worker` fixes.

    Two local worker processes make a real two-worker cluster. If this fails with FIT_OK,
    Keras has fixed keras-team/keras#20585: `flair_tf.training.multi_worker` can go.
    """
    fits = [o["fit"] for o in _two_worker_fits(fixed=False)]
    assert not any(f == "FIT_OK" for f in fits), fits
    # The two known failures (batch all-reduce, then axis-0 reduction of scalar logs); any
    # other outcome (a cluster that did not form) fails here too.
    known = ("Attempt to convert a value (PerReplica", "Invalid reduction dimension 0")
    assert all(f.startswith("KERAS_BUG") and any(k in f for k in known) for f in fits), fits


def test_multi_worker_fixes_let_keras_fit_on_two_workers():
    outs = _two_worker_fits(fixed=True)
    assert [o["fit"] for o in outs] == ["FIT_OK", "FIT_OK"], outs
    # Each worker trains on its own half of the data; the logged loss is the mean over both.
    assert outs[0]["loss"] == outs[1]["loss"] and all(math.isfinite(v) and v > 0 for v in outs[0]["loss"])
