"""`flair_tf.train`: flags, model_dir artefacts, and `fit` under MirroredStrategy (2 logical CPUs)."""

import json
import os

import pytest
from training_helpers import event_tags, last_json, run_cluster

from flair_tf import flags as flair_flags
from flair_tf import train as train_lib

_MIRRORED = r"""
import json
from flair_tf import train
out = {}
for name, data_dir, task, arch in RUNS:
    r = train.train({"model_dir": ROOT + "/" + name, "data_dir": data_dir, "task": task, "arch": arch,
                     "strategy": "mirrored", "epochs": 2, "batch_size": 4, "optimizer": "adam",
                     "learning_rate": 1e-3, "lr_schedule": "none", "tensorboard_images": 2, "verbose": "0",
                     "augment": True, "aerial_on": "device"})  # finished in the train step, per replica
    out[name] = {"replicas": r["num_replicas"], "history": r["history"], "val_miou": r["val_miou"],
                 "per_class_iou": r["val_scores"]["per_class_iou"]}
print(json.dumps(out))
"""




@pytest.mark.slow
def test_fit_two_epochs_mirrored_utt(tmp_path, flair2_records, snippet):
    """U-T&T; the U-Net half of this check runs in test_learning.py (same code path, longer run)."""
    runs = [("utt", flair2_records, "flair2", "utt")]
    code = _MIRRORED.replace("RUNS", repr(runs)).replace("ROOT", repr(str(tmp_path)))
    out = snippet.json(code, logical_cpus=2, timeout=900)
    for name, *_ in runs:
        r, model_dir = out[name], tmp_path / name
        assert r["replicas"] == 2
        losses = [h["loss"] for h in r["history"]]
        assert len(losses) == 2 and losses[1] < losses[0], (name, losses)
        assert 0.0 <= r["val_miou"] <= 1.0 and len(r["per_class_iou"]) == 13
        for rel in ("flags.txt", "model_config.json", "data_config.json", "train_result.json",
                    "checkpoints/best.weights.h5", "checkpoints/last.weights.h5", "backup/state.json"):
            assert (model_dir / rel).exists(), rel
        train_tags, val_tags = event_tags(model_dir / "logs" / "train"), event_tags(model_dir / "logs" / "validation")
        assert {"loss", "learning_rate", "examples_per_second", "iou/building"} <= train_tags
        assert {"loss", "iou/building", "overall_accuracy", "confusion_matrix", "patches"} <= val_tags
        assert any(t.endswith("miou") for t in val_tags)
        if name == "utt":
            assert {"aerial_loss", "sentinel_loss"} <= train_tags and {"aerial_loss", "sentinel_loss"} <= val_tags
        config = json.loads((model_dir / "model_config.json").read_text())
        assert config["arch"] == name and config["input_size"] == 64
    assert json.loads((tmp_path / "utt" / "model_config.json").read_text())["num_dates"] == 12


def test_flags_defaults_flagfile_and_flags_txt(tmp_path):
    defaults = flair_flags.default_config()
    assert defaults["learning_rate"] == 0.02 and defaults["optimizer"] == "sgd" and defaults["momentum"] == 0.0
    assert defaults["plateau_patience"] == 10 and defaults["plateau_cooldown"] == 4
    assert defaults["early_stopping_patience"] == 30 and defaults["seed"] == 2022
    # A flagfile including another one; later flags win.
    base = tmp_path / "base.flags"
    base.write_text("--task=flair2\n--arch=utt\n--learning_rate=0.001\n--channels=R,G,B\n")
    top = tmp_path / "top.flags"
    top.write_text(f"--flagfile={base}\n--learning_rate=0.005\n--augment\n")
    fv = flags_values = _parse([f"--flagfile={top}", "--model_dir=/m", "--data_dir=/d"])
    cfg = flair_flags.config_from_flags(flags_values)
    assert (cfg["task"], cfg["arch"], cfg["learning_rate"], cfg["augment"]) == ("flair2", "utt", 0.005, True)
    assert cfg["channels"] == ["R", "G", "B"]
    # flags.txt is itself a flagfile that reproduces the config.
    path = tmp_path / "flags.txt"
    flair_flags.write_flags_file(cfg, str(path))
    again = flair_flags.config_from_flags(_parse([f"--flagfile={path}"]))
    assert again == cfg
    assert fv["learning_rate"].help  # every flag documents itself


def test_every_flag_has_help():
    fv = _parse([])
    for name in flair_flags.flag_names():
        assert len(fv[name].help) > 15, name


def _parse(argv):
    from absl import flags

    fv = flags.FlagValues()
    flair_flags.define_flags(fv)
    fv(["prog", *argv])
    return fv


def test_config_errors_name_the_fix(tmp_path, flair1_records):
    with pytest.raises(ValueError, match="--model_dir is required"):
        train_lib.train({"data_dir": flair1_records})
    with pytest.raises(ValueError, match="Unknown training option"):
        train_lib.train({"model_dir": str(tmp_path), "data_dir": flair1_records, "lr": 0.1})
    with pytest.raises(ValueError, match="--arch=utt needs --task=flair2"):
        train_lib.train({"model_dir": str(tmp_path), "data_dir": flair1_records, "arch": "utt"})
    with pytest.raises(ValueError, match="holds flair1 records but --task=flair2"):
        train_lib.train({"model_dir": str(tmp_path), "data_dir": flair1_records, "task": "flair2", "arch": "utt"})
    with pytest.raises(FileNotFoundError, match="No validation records match"):
        train_lib.train({"model_dir": str(tmp_path), "data_dir": flair1_records, "val_split": "nope"})


def test_model_and_pipeline_config_from_flags(flair1_records):
    from flair_tf.data import schema

    info = schema.load_dataset_info(flair1_records)
    cfg = {**flair_flags.default_config(), "channels": ["R", "G", "B"], "use_metadata": True,
           "norm_type": "custom", "norm_means": ["100", "110", "120"], "norm_stds": ["50", "51", "52"],
           "model_overrides": '{"metadata_dropout": 0.1}'}
    data = train_lib.pipeline_config(cfg, info)
    assert data.channels == ("R", "G", "B") and data.use_metadata and data.seed == 2022
    model = train_lib.model_config(cfg, info, data)
    assert model == {"arch": "unet", "num_classes": 13, "in_channels": 3, "input_size": 64, "use_metadata": True,
                     "norm_mean": [100.0, 110.0, 120.0], "norm_std": [50.0, 51.0, 52.0], "metadata_dropout": 0.1}
    assert train_lib.model_io_keys(model) == (["aerial", "metadata"], ["aerial"])
    with pytest.raises(ValueError, match="--norm_means has 2 values for 3 channels"):
        train_lib.model_config({**cfg, "norm_means": ["1", "2"]}, info, data)


def test_every_config_parses_and_states_its_target():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    names = sorted(f for f in os.listdir(configs) if f.endswith(".flags"))
    assert {"flair1_unet.flags", "flair1_unet_metadata_aug.flags", "flair2_utt.flags",
            "flair2_utt_filter_monthly_aug.flags", "demo.flags"} <= set(names)
    cwd = os.getcwd()
    os.chdir(os.path.dirname(configs))  # flagfiles include each other relative to the repo root
    try:
        for name in names:
            cfg = flair_flags.config_from_flags(_parse([f"--flagfile=configs/{name}"]))
            text = open(os.path.join(configs, name)).read()
            assert "python -m flair_tf.train --flagfile=configs/" in text or name.endswith(("_x4.flags", "_8.flags")), name
            if name.startswith("flair"):
                assert "Command" in text and "Hardware assumed" in text and "mIoU" in text, name
            if name.startswith(("gpu_flair", "tpu_flair")):
                assert "Command" in text and "Target" in text, name
            if "utt" in name:
                assert (cfg["task"], cfg["arch"], cfg["loss_averaging"]) == ("flair2", "utt", "weights"), name
            elif name.startswith(("flair1", "gpu_flair1", "tpu_flair1")):
                assert (cfg["task"], cfg["optimizer"], cfg["learning_rate"]) == ("flair1", "sgd", 0.02), name
    finally:
        os.chdir(cwd)
    fma = _parse(["--flagfile=configs/flair2_utt_filter_monthly_aug.flags"])
    assert fma["filter_clouds"].value and fma["average_month"].value and fma["augment"].value
    assert _parse(["--flagfile=configs/tpu_flair2_utt.flags"])["precision"].value == "mixed_bfloat16"


_VAL_LOSS = r"""
import json
import numpy as np
import tensorflow as tf
from flair_tf import train
from flair_tf.data import pipeline, schema
from flair_tf.models import build_model
from flair_tf.training import losses as losses_lib
r = train.train({"model_dir": ROOT, "data_dir": DATA, "task": "flair1", "arch": "unet", "strategy": "mirrored",
                 "epochs": 1, "batch_size": 4, "optimizer": "sgd", "learning_rate": 1e-2, "lr_schedule": "none",
                 "tensorboard_images": 0, "verbose": "0"})
# The same weights on one device, every validation example once: the loss over all their pixels.
model = build_model(json.load(open(ROOT + "/model_config.json")))
model.load_weights(ROOT + "/checkpoints/last.weights.h5")
loss = losses_lib.build_losses("flair1", 13, ["aerial"])[0]["aerial"]
config = pipeline.PipelineConfig.from_dict(json.load(open(ROOT + "/data_config.json")))
ds = pipeline.make_dataset(schema.shard_pattern(DATA, "flair1", "val"), "val", config, 2, training=False,
                           pad_final_batch=True, repeat=False)
num = den = 0.0
for features, labels in ds:
    logits = model({"aerial": features["aerial"]}, training=False)["aerial"]
    n, d = losses_lib.weighted_cross_entropy_terms(labels["aerial"], logits, loss.class_weights, loss.averaging,
                                                   tf.cast(features["valid"], tf.float32))
    num, den = num + float(n), den + float(d)
print(json.dumps({"val_loss": r["history"][-1]["val_loss"], "expected": num / den}))
"""


def test_val_loss_under_mirrored_strategy_is_the_loss_over_the_validation_split(tmp_path, flair1_records, snippet):
    """Keras, left to find the end of a distributed dataset, counted extra empty steps at random.

    They made val_loss 10/11 or 10/12 of its value. What remains is the replicas' own
    BatchNorm statistics (each replica validates with the running statistics of its own
    training batches; the saved weights hold their mean): 0.1% here.
    """
    code = _VAL_LOSS.replace("ROOT", repr(str(tmp_path / "run"))).replace("DATA", repr(flair1_records))
    out = snippet.json(code, logical_cpus=2, timeout=600)
    assert out["val_loss"] == pytest.approx(out["expected"], rel=5e-3)


_PIPELINES = r"""
import json
import tensorflow as tf
from flair_tf import train
from flair_tf.data import pipeline, schema
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
multi_worker = tf.distribute.MultiWorkerMirroredStrategy()  # no TF_CONFIG: one worker
out = {"default": train._num_input_pipelines(tf.distribute.get_strategy()),
       "mirrored": train._num_input_pipelines(mirrored),
       "multi_worker": train._num_input_pipelines(multi_worker)}
pattern, config = schema.shard_pattern(DATA, "flair1", "val"), pipeline.PipelineConfig()
steps = train._validation_pass_steps(pattern, "val", config, 6, mirrored)
ds = train.make_distributed_dataset(mirrored, pattern, "val", config, 6, False, ["aerial"], ["aerial"], False)
out["steps"], out["batches"] = steps, sum(1 for _ in ds)
print(json.dumps(out))
"""


def test_validation_steps_count_one_pass_per_input_pipeline(flair1_records, snippet):
    """The host count comes from the strategy (MultiWorkerMirroredStrategy keeps it private:
    if that attribute goes, this fails rather than multi-worker runs silently counting one host)."""
    out = snippet.json(_PIPELINES.replace("DATA", repr(flair1_records)), logical_cpus=2, timeout=300)
    assert out["default"] == out["mirrored"] == out["multi_worker"] == 1
    assert out["steps"] == out["batches"] > 0


_CLUSTER_INPUT = r"""
import json
import tensorflow as tf
from flair_tf import train
from flair_tf.data import pipeline, schema
strategy = tf.distribute.MultiWorkerMirroredStrategy()
config = pipeline.PipelineConfig(task="flair1")
out = {"pipelines": train._num_input_pipelines(strategy), "replicas": strategy.num_replicas_in_sync}
pattern = schema.shard_pattern(DATA, "flair1", "val")
ds = strategy.distribute_datasets_from_function(lambda ctx: pipeline.make_dataset(
    pattern, "val", config, 4, input_context=ctx, training=False, pad_final_batch=True, repeat=False))
ids, steps = [], 0
for features, _ in ds:  # a finite distributed dataset: the workers agree on its end
    steps += 1
    for f in strategy.experimental_local_results(features):
        ids += [i.decode() for i, v in zip(f["patch_id"].numpy(), f["valid"].numpy()) if v]
out["val"] = {"steps": steps, "ids": ids,
              "counted": train._validation_pass_steps(pattern, "val", config, 4, strategy)}
# Training: one finite pass, then the epoch train runs.
pattern = schema.shard_pattern(DATA, "flair1", "train")
info = schema.load_dataset_info(DATA)
steps, repeat = train._training_epoch(info, "train", 4, strategy)
out["train"] = {"steps": steps, "repeat": repeat}
for name, rep in (("finite", False), ("epoch", repeat)):
    ds = train.make_distributed_dataset(strategy, pattern, "train", config, 4, True, ["aerial"], ["aerial"], rep)
    sizes = []
    for k, (features, _) in enumerate(ds):
        if rep and k == steps:
            break
        sizes += [int(t.shape[0]) for t in strategy.experimental_local_results(features["aerial"])]
    out["train"][name] = sizes
print(json.dumps(out))
"""


def test_two_worker_cluster_validates_every_example_once_and_trains_full_batches(tmp_path, flair1_tree):
    """Two local processes form a real two-worker cluster (MultiWorkerMirroredStrategy).

    Each worker is an input pipeline reading its own files. The validation split is made of
    3 shards of 3, 2 and 3 examples, so one worker holds 6 examples and the other 2: the
    padded evaluation must still give both the same number of steps (counted up front from
    the per-shard counts), and every example exactly once over the cluster.
    """
    from flair_tf.data import convert, schema

    records = str(tmp_path / "records")
    convert.convert(convert.ConvertOptions(
        task="flair1", data_root=flair1_tree, output_dir=records, patch_size=64, num_workers=1,
        min_shards=3, show_progress=False, command_line="test"))
    info = schema.load_dataset_info(records)
    shard_sizes = sorted(s["num_examples"] for s in info["splits"]["val"]["shards"])
    assert shard_sizes == [2, 3, 3], shard_sizes  # the uneven split this test is about
    outs = [last_json(p) for p in run_cluster(_CLUSTER_INPUT.replace("DATA", repr(records)), 2, timeout=240)]
    assert [o["pipelines"] for o in outs] == [2, 2] and [o["replicas"] for o in outs] == [2, 2]
    val = [o["val"] for o in outs]
    # 6 examples on one worker in batches of 2 (global 4 over 2 replicas): 3 steps everywhere.
    assert val[0]["steps"] == val[1]["steps"] == val[0]["counted"] == val[1]["counted"] == 3
    seen = val[0]["ids"] + val[1]["ids"]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == info["splits"]["val"]["num_examples"]
    # Training: the shares are uneven too (3 shards of 8 examples: 16 and 8). A finite pass
    # gives the short worker empty batches while the other still trains (a TPU pod could not
    # run them); the epoch train runs repeats each share for 24 // 4 = 6 full steps.
    train = [o["train"] for o in outs]
    assert train[0]["steps"] == train[1]["steps"] == 6 and train[0]["repeat"] and train[1]["repeat"]
    assert sorted(len(t["finite"]) for t in train) == [8, 8]
    assert sorted(t["finite"].count(0) for t in train) == [0, 4]
    assert [t["epoch"] for t in train] == [[2] * 6, [2] * 6]


_CLUSTER_TRAIN = r"""
import json
from flair_tf import train
r = train.train({"model_dir": ROOT, "data_dir": DATA, "task": "flair1", "arch": "unet",
                 "strategy": "multi_worker", "epochs": EPOCHS, "batch_size": 4, "optimizer": "adam",
                 "learning_rate": 1e-3, "lr_schedule": "cosine", "tensorboard_images": 2, "verbose": "0"})
print(json.dumps({"replicas": r["num_replicas"], "initial_epoch": r["initial_epoch"],
                  "history": r["history"], "val_miou": r["val_miou"]}))
"""


@pytest.mark.slow
def test_fit_on_a_two_worker_cluster_and_resume(tmp_path, flair1_records):
    """`--strategy=multi_worker` on a real two-worker cluster of local processes.

    Keras 3 alone fails there (tests/training/test_strategy.py); with
    `flair_tf.training.multi_worker` both workers train the same model in step, validate,
    the chief writes, and a second run resumes from the backup.
    """
    root = str(tmp_path / "run")
    outs = []
    for epochs in (2, 3):
        code = _CLUSTER_TRAIN.replace("ROOT", repr(root)).replace("DATA", repr(flair1_records))
        outs.append([last_json(p) for p in run_cluster(code.replace("EPOCHS", str(epochs)), 2, timeout=400)])
    first, resumed = outs
    assert [o["replicas"] for o in first] == [2, 2] and first[0] == first[1]
    losses = [h["loss"] for h in first[0]["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert 0.0 <= first[0]["val_miou"] <= 1.0
    assert resumed[0] == resumed[1] and resumed[0]["initial_epoch"] == 2
    assert resumed[0]["history"][:2] == first[0]["history"] and len(resumed[0]["history"]) == 3
    model_dir = tmp_path / "run"
    for rel in ("checkpoints/best.weights.h5", "checkpoints/last.weights.h5", "backup/state.json"):
        assert (model_dir / rel).exists(), rel
    assert {"patches", "confusion_matrix", "iou/building"} <= event_tags(model_dir / "logs" / "validation")


def test_training_epoch_length_and_repeat():
    import tensorflow as tf

    one_host = tf.distribute.get_strategy()
    info = {"splits": {"train": {"num_examples": 10}}}
    assert train_lib._training_epoch(info, "train", 4, one_host) == (2, False)  # one finite pass
    assert train_lib._training_epoch(info, "train", 4, one_host, steps_per_epoch=7) == (7, True)
    assert train_lib._training_epoch({}, "train", 4, one_host) == (None, False)  # Keras finds the end
    small = {"splits": {"train": {"num_examples": 3}}}
    with pytest.raises(ValueError, match="fewer than one batch of --batch_size=4"):
        train_lib._training_epoch(small, "train", 4, one_host)
    # An explicit epoch length repeats the data: a split smaller than a batch is fine then.
    assert train_lib._training_epoch(small, "train", 4, one_host, steps_per_epoch=5) == (5, True)


@pytest.mark.parametrize("augment_sentinel", [False, True])
def test_train_step_finishes_device_batches(flair2_records, augment_sentinel):
    """aerial_on=device: what the model's own train step receives equals the host-finished
    batch (the same draws), with the auxiliary labels un-augmented unless augment_sentinel."""
    import dataclasses

    import keras
    import numpy as np
    import tensorflow as tf

    from flair_tf.data import pipeline, schema

    inputs, outputs = ["aerial", "sentinel", "sentinel_dates", "sentinel_pad_mask"], ["aerial", "sentinel"]
    pattern = schema.shard_pattern(flair2_records, "flair2", "train")
    host = pipeline.PipelineConfig(task="flair2", augment=True, augment_sentinel=augment_sentinel, seed=9)
    device = dataclasses.replace(host, aerial_on="device")
    strategy = tf.distribute.get_strategy()

    def first_batch(config):
        ds = train_lib.make_distributed_dataset(strategy, pattern, "train", config, 4, True, inputs, outputs, True)
        return next(iter(ds))

    received = []
    x_in = {k: keras.Input(shape, name=k) for k, shape in
            (("aerial", (64, 64, 5)), ("sentinel", (12, 40, 40, 10)), ("sentinel_dates", (12,)),
             ("sentinel_pad_mask", (12,)))}
    model = keras.Model(x_in, {k: keras.layers.Conv2D(13, 1, name=f"head_{k}")(x_in["aerial"]) for k in outputs})
    model.compile(loss="sparse_categorical_crossentropy")
    model.train_step = received.append  # stands for Keras' own step: records its input
    train_lib.finishing_train_step(model, device, inputs, outputs)
    assert model._compile_loss.built  # built from the model's shapes, not from a device batch
    batch = first_batch(device)
    assert "aerial" not in batch[0] and set(batch[1]) == {"aerial_codes"}
    model.train_step(batch)
    (x, y), = received
    want_x, want_y = first_batch(host)
    assert sorted(x) == sorted(want_x) == sorted(inputs) and sorted(y) == sorted(want_y) == outputs
    for k in want_x:
        np.testing.assert_array_equal(x[k].numpy(), want_x[k].numpy(), err_msg=k)
    for k in want_y:
        np.testing.assert_array_equal(y[k].numpy(), want_y[k].numpy(), err_msg=k)
    moves = batch[0]["augment_move"].numpy()
    assert np.any(moves != 0)
    if not augment_sentinel:
        np.testing.assert_array_equal(y["sentinel"].numpy()[moves != 0], want_y["sentinel"].numpy()[moves != 0])
        assert not np.array_equal(y["aerial"].numpy()[moves != 0], y["sentinel"].numpy()[moves != 0])
