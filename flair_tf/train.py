"""Trains a FLAIR model: ``python -m flair_tf.train --flagfile=configs/flair1_unet.flags``.

Order (TF Model Garden's): strategy first, then the input pipelines (one per
replica group through `distribute_datasets_from_function`), then model,
optimizer, losses and metrics inside ``strategy.scope()``; then one `fit` call
per epoch, each on a pipeline seeded by (seed, epoch), so that a run resumed
from ``backup/`` sees exactly the data of an uninterrupted run. Everything lands in
``--model_dir`` (local or gs://)::

    flags.txt            the effective flags (a flagfile: --flagfile=flags.txt reruns it)
    model_config.json    the dict for flair_tf.models.build_model
    data_config.json     PipelineConfig.to_dict()
    checkpoints/         best.weights.h5 (lowest val_loss), last.weights.h5
    backup/              preemption backup: a rerun with the same --model_dir resumes
    logs/train, logs/validation    TensorBoard
    train_result.json    final metrics (also returned by `train`)

`train(config)` runs in-process from a dict of flag values (tests, notebooks);
`run()` is the `flair-tf-train` console script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Mapping

from absl import app, flags, logging

from flair_tf import flags as flair_flags

ENV_LOGICAL_CPUS = "FLAIR_TF_NUM_LOGICAL_CPUS"


# ----------------------------------------------------------------------------------------
# Configs derived from the flags.


def model_io_keys(model_config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The input and output keys of the model `build_model(model_config)` will build."""
    inputs = ["aerial"]
    if model_config.get("use_metadata"):
        inputs.append("metadata")
    outputs = ["aerial"]
    if model_config["arch"] == "utt":
        inputs += ["sentinel", "sentinel_dates", "sentinel_pad_mask"]
        outputs.append("sentinel")
    return inputs, outputs


def _aerial_on(flag: str) -> str:
    """--aerial_on: auto = on the accelerator when the process sees one (GPU or TPU), else in the pipeline."""
    if flag != "auto":
        return flag
    from flair_tf.training import strategy as strategy_lib

    return "device" if strategy_lib.accelerator_visible() else "host"


def pipeline_config(cfg: Mapping[str, Any], info: Mapping[str, Any]):
    """The `PipelineConfig` for these flags and records (fields the pipeline lacks are skipped)."""
    from flair_tf.data import pipeline

    values = {
        "task": cfg["task"],
        "num_classes": cfg["num_classes"],
        "channels": tuple(cfg["channels"]),
        "use_metadata": cfg["use_metadata"],
        "fix_month_quirk": cfg["fix_month_quirk"],
        "augment": cfg["augment"],
        "augment_sentinel": cfg["augment_sentinel"],
        "aerial_on": _aerial_on(cfg["aerial_on"]),
        "sentinel_size": cfg["sentinel_size"],
        "filter_clouds": cfg["filter_clouds"],
        "cloud_area_threshold": cfg["cloud_area_threshold"],
        "cloud_proba_threshold": cfg["cloud_proba_threshold"],
        "average_month": cfg["average_month"],
        "sentinel_scaling": cfg["sentinel_scaling"],
        "norm_type": cfg["norm_type"],
        "norm_means": tuple(float(v) for v in cfg["norm_means"]) or None,
        "norm_stds": tuple(float(v) for v in cfg["norm_stds"]) or None,
        "norm_stats_from": cfg["norm_stats_from"],
        "seed": cfg["seed"],
        "deterministic": True if cfg["deterministic"] else None,
        "compression": cfg["compression"] if cfg["compression"] is not None else info.get("compression"),
    }
    if cfg["max_dates"]:
        values["max_dates"] = cfg["max_dates"]
    if cfg["shuffle_buffer"]:
        values["shuffle_buffer"] = cfg["shuffle_buffer"]
    fields = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)}
    dropped = sorted(k for k in values if k not in fields)
    if dropped:
        logging.warning("PipelineConfig has no field(s) %s; ignored.", dropped)
    return pipeline.PipelineConfig(**{k: v for k, v in values.items() if k in fields})


def model_config(cfg: Mapping[str, Any], info: Mapping[str, Any], data_config) -> dict[str, Any]:
    """The JSON-serialisable `build_model` config."""
    from flair_tf.data import pipeline

    channels = list(cfg["channels"])
    for name in ("norm_means", "norm_stds"):
        if cfg[name] and len(cfg[name]) != len(channels):
            raise ValueError(
                f"--{name} has {len(cfg[name])} values for {len(channels)} channels ({','.join(channels)}); "
                "give one per channel."
            )
    mean, std = pipeline.normalization_stats(data_config, info)
    config: dict[str, Any] = {
        "arch": cfg["arch"],
        "num_classes": cfg["num_classes"],
        "in_channels": len(channels),
        "input_size": int(info["patch_size"]),
        "use_metadata": bool(cfg["use_metadata"]),
        "norm_mean": None if mean is None else [float(v) for v in mean],
        "norm_std": None if std is None else [float(v) for v in std],
    }
    if cfg["arch"] == "utt":
        if cfg["task"] != "flair2":
            raise ValueError("--arch=utt needs Sentinel-2 inputs: use --task=flair2 with FLAIR #2 records.")
        config["sentinel_size"] = int(getattr(data_config, "sentinel_size", cfg["sentinel_size"]))
        config["num_dates"] = 12 if cfg["average_month"] else int(getattr(data_config, "max_dates"))
    overrides = json.loads(cfg["model_overrides"] or "{}")
    if not isinstance(overrides, dict):
        raise ValueError(f"--model_overrides must be a JSON object. Received: {cfg['model_overrides']!r}")
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------------------
# Data.


def _keras_batches(input_keys, output_keys):
    """Maps pipeline batches to Keras' (x, y[, sample_weight])."""
    import tensorflow as tf

    def fn(features, labels):
        # bool inputs (sentinel_pad_mask) travel as uint8 (the model's bool Input
        # casts back): Keras 3.15's first-`fit` build averages a distributed batch
        # over the replicas, which fails on bool ("AddN ... bool").
        cast = lambda v: tf.cast(v, tf.uint8) if v.dtype == tf.bool else v  # noqa: E731
        if "aerial_codes" in labels:
            # aerial_on="device": the batch as the pipeline made it; the train step
            # finishes it, then takes the model's inputs and outputs (`finishing_train_step`).
            return {k: cast(v) for k, v in features.items()}, dict(labels)
        x = {k: cast(features[k]) for k in input_keys}
        y = {k: labels[k] for k in output_keys}
        if "valid" in features:  # padded evaluation batch: mask the padding
            return x, y, tf.cast(features["valid"], tf.float32)
        return x, y

    return fn


def finishing_train_step(model, data_config, input_keys, output_keys):
    """``aerial_on="device"``: `model.fit`'s train step finishes each batch before the forward pass.

    It runs `pipeline.finish_batch` (band interleave, class remap, flips and
    rotations) on each replica's batch, on the accelerator or under XLA with the
    rest of the step, instead of in the host's input pipeline. Keras looks
    `train_step` up on the model when it builds its train function; this sets it
    on this model object (nothing of it is saved with the weights). Call it after
    `compile`: it also builds the compiled losses and metrics from the model's
    own shapes, which Keras would otherwise build from the first training batch,
    whose keys and shapes are the pipeline's, not the model's.
    """
    import keras

    from flair_tf.data import pipeline

    base = model.train_step

    def train_step(data):
        features, labels = pipeline.finish_batch(data[0], data[1], data_config)
        return base(({k: features[k] for k in input_keys}, {k: labels[k] for k in output_keys}))

    model.train_step = train_step
    build = getattr(model, "_symbolic_build", None)  # Keras 3's own build from one batch's shapes
    if build is None:
        raise RuntimeError(f"Keras {keras.__version__} has no Model._symbolic_build, which --aerial_on=device "
                           "uses to build the compiled losses and metrics; pass --aerial_on=host")
    x = {k: keras.KerasTensor(t.shape, t.dtype) for k, t in model.input.items()}
    y = {k: keras.KerasTensor(model.output[k].shape[:-1], "uint8") for k in output_keys}
    with model.distribute_strategy.scope():
        build(data_batch=(x, y))
    return model


def make_distributed_dataset(strategy, pattern, split, data_config, batch_size, training, input_keys, output_keys, repeat):
    """`strategy.distribute_datasets_from_function` over the pipeline, in Keras form."""
    import tensorflow as tf

    from flair_tf.data import pipeline

    def dataset_fn(context: tf.distribute.InputContext):
        ds = pipeline.make_dataset(
            pattern, split, data_config, batch_size, input_context=context, training=training,
            pad_final_batch=not training, repeat=repeat,
        )
        return ds.map(_keras_batches(input_keys, output_keys), num_parallel_calls=tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def image_batch(pattern, split, data_config, count, input_keys):
    """The first `count` validation examples as numpy (the fixed TensorBoard patches)."""
    from flair_tf.data import pipeline

    ds = pipeline.make_dataset(pattern, split, data_config, count, training=False, pad_final_batch=True, repeat=False)
    features, labels = next(iter(ds.take(1)))
    valid = features["valid"].numpy().astype(bool) if "valid" in features else None
    x = {k: features[k].numpy() for k in input_keys}
    y = {"aerial": labels["aerial"].numpy()}
    if valid is not None:
        x = {k: v[valid] for k, v in x.items()}
        y = {k: v[valid] for k, v in y.items()}
    return x, y


# ----------------------------------------------------------------------------------------
# Training.


def _progress_bar(total_epochs: int):
    """Keras' progress bar, showing "Epoch e/total" although each `fit` call runs one epoch."""
    import keras

    class EpochOfTotalProgbar(keras.callbacks.ProgbarLogger):
        def set_params(self, params):
            super().set_params({**params, "epochs": total_epochs})

    return EpochOfTotalProgbar()


def _optimizer(cfg, steps_per_epoch: int | None):
    import keras

    lr = cfg["learning_rate"]
    if cfg["lr_schedule"] == "cosine":
        if not steps_per_epoch:
            raise ValueError("--lr_schedule=cosine needs a known epoch length: set --steps_per_epoch.")
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=cfg["epochs"] * steps_per_epoch)
    from flair_tf.training import optimizers  # Keras's SGD / Adam with fused variable updates

    if cfg["optimizer"] == "sgd":
        return optimizers.SGD(learning_rate=lr, momentum=cfg["momentum"])
    if cfg["optimizer"] == "adam":
        return optimizers.Adam(learning_rate=lr)
    return keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg["weight_decay"])


def _jit(value: str):
    return {"auto": "auto", "true": True, "false": False}[value]


def _write_json(path: str, obj: Any) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _check_config(cfg: Mapping[str, Any]) -> None:
    for name in ("model_dir", "data_dir"):
        if not cfg.get(name):
            raise ValueError(f"--{name} is required (e.g. --{name}=/path). Received: --{name}={cfg.get(name)!r}")
    if cfg["arch"] == "utt" and cfg["task"] != "flair2":
        raise ValueError("--arch=utt needs --task=flair2 (FLAIR #2 records with Sentinel-2 data).")
    if cfg["batch_size"] < 1:
        raise ValueError(f"--batch_size must be >= 1. Received: {cfg['batch_size']}")


def train(config: Mapping[str, Any] | None = None, strategy=None) -> dict[str, Any]:
    """Trains (or resumes) a model as the flags say.

    Args:
      config: flag name -> value (see `flair_tf.flags`); missing names take
        their defaults. `model_dir` and `data_dir` are required.
      strategy: an existing `tf.distribute.Strategy` (default: from the flags).

    Returns:
      dict with ``initial_epoch``, ``epochs_completed``, ``history`` (one dict of
      logs per epoch, including epochs of earlier, interrupted runs),
      ``best_val_loss``, ``best_epoch``, ``val_miou`` and ``val_scores``
      (official scores of the last validation), ``throughput`` (steps and
      examples per second of each epoch of this run), ``model_dir``,
      ``checkpoints``, ``num_replicas`` and ``tensorboard_command``.
    """
    cfg = {**flair_flags.default_config(), **(config or {})}
    unknown = sorted(set(config or {}) - set(flair_flags.flag_names()))
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}; see `python -m flair_tf.train --helpfull`.")
    _check_config(cfg)

    from flair_tf.training import strategy as strategy_lib

    logical = cfg["num_logical_cpus"] or int(os.environ.get(ENV_LOGICAL_CPUS, "0") or 0)
    if logical and strategy is None:
        strategy_lib.split_cpu(logical)

    import keras
    import tensorflow as tf

    from flair_tf.data import schema
    from flair_tf.models import build_model
    from flair_tf.training import callbacks as cb
    from flair_tf.training import losses as losses_lib
    from flair_tf.training import metrics as metrics_lib
    from flair_tf.training import precision as precision_lib
    from flair_tf.training.tensorboard import FlairTensorBoard

    if cfg["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg["seed"])
    precision_lib.set_precision(cfg["precision"])
    if strategy is None:
        strategy = strategy_lib.get_strategy(cfg["strategy"], tpu=cfg["tpu"], num_gpus=cfg["num_gpus"] or None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        from flair_tf.training import multi_worker

        multi_worker.install()  # Keras 3 cannot fit on several workers without it
    chief = strategy_lib.is_chief(strategy)
    steps_per_execution = precision_lib.check_steps_per_execution(cfg["steps_per_execution"], strategy)

    model_dir = cfg["model_dir"]
    info = schema.load_dataset_info(cfg["data_dir"])
    if info.get("task") and info["task"] != cfg["task"]:
        raise ValueError(
            f"{cfg['data_dir']} holds {info['task']} records but --task={cfg['task']}; "
            f"use --task={info['task']} or point --data_dir at {cfg['task']} records."
        )
    data_config = pipeline_config(cfg, info)
    mconfig = model_config(cfg, info, data_config)
    input_keys, output_keys = model_io_keys(mconfig)
    if chief:
        tf.io.gfile.makedirs(model_dir)
        flair_flags.write_flags_file(cfg, os.path.join(model_dir, "flags.txt"))
        _write_json(os.path.join(model_dir, "model_config.json"), mconfig)
        _write_json(os.path.join(model_dir, "data_config.json"), data_config.to_dict())

    # Data, before the model (TPU: strategy, then datasets, then variables).
    train_pattern = schema.shard_pattern(cfg["data_dir"], cfg["task"], cfg["train_split"])
    if not tf.io.gfile.glob(train_pattern):
        raise FileNotFoundError(
            f"No training records match {train_pattern}; convert the data with "
            "tools/convert_to_tfrecords.py or fix --data_dir / --train_split."
        )
    steps_per_epoch, repeat = _training_epoch(info, cfg["train_split"], cfg["batch_size"], strategy,
                                              cfg["steps_per_epoch"])

    def train_dataset(epoch: int):
        # Each epoch reads a pipeline seeded by (seed, epoch): its file order,
        # shuffle and augmentation depend on the epoch alone, so a resumed run
        # sees exactly the data an uninterrupted run would have.
        epoch_config = dataclasses.replace(data_config, seed=cfg["seed"] + 1000003 * epoch)
        return make_distributed_dataset(
            strategy, train_pattern, cfg["train_split"], epoch_config, cfg["batch_size"], True,
            input_keys, output_keys, repeat=repeat,
        )

    val_ds, images, val_steps = None, None, None
    if cfg["val_split"]:
        val_pattern = schema.shard_pattern(cfg["data_dir"], cfg["task"], cfg["val_split"])
        if not tf.io.gfile.glob(val_pattern):
            raise FileNotFoundError(f"No validation records match {val_pattern}; fix --val_split or pass --val_split=''.")
        val_batch = cfg["val_batch_size"] or cfg["batch_size"]
        val_steps = _validation_pass_steps(val_pattern, cfg["val_split"], data_config, val_batch, strategy)
        val_ds = make_distributed_dataset(
            strategy, val_pattern, cfg["val_split"], data_config, val_batch, False, input_keys, output_keys, repeat=False
        )
        if cfg["tensorboard_images"] and chief:
            images = image_batch(val_pattern, cfg["val_split"], data_config, cfg["tensorboard_images"], input_keys)

    with strategy.scope():
        model = build_model(dict(mconfig))
        _check_model_keys(model, input_keys, output_keys)
        if cfg["encoder_weights"]:
            from flair_tf.models import weights as weights_lib

            loaded = weights_lib.load_encoder_file(model, cfg["encoder_weights"])
            logging.info("Encoder initialised from %s (%d tensors)", cfg["encoder_weights"], loaded)
        if cfg["init_checkpoint"]:
            from flair_tf.models import weights as weights_lib

            weights_lib.load_checkpoint(model, cfg["init_checkpoint"])
            logging.info("Model initialised from %s", cfg["init_checkpoint"])
        losses, loss_weights = losses_lib.build_losses(
            cfg["task"], cfg["num_classes"], output_keys,
            averaging=None if cfg["loss_averaging"] == "auto" else cfg["loss_averaging"],
            aerial_weight=cfg["aerial_loss_weight"], sentinel_weight=cfg["sentinel_loss_weight"],
            use_class_weights=cfg["use_class_weights"],
        )
        cm_metric = metrics_lib.ConfusionMatrixMetric(cfg["num_classes"], name="miou")
        model.compile(
            optimizer=_optimizer(cfg, steps_per_epoch), loss=losses, loss_weights=loss_weights,
            weighted_metrics={"aerial": [cm_metric]},
            steps_per_execution=steps_per_execution, jit_compile=_jit(cfg["jit_compile"]),
        )
        if data_config.aerial_on == "device":
            finishing_train_step(model, data_config, input_keys, output_keys)

    monitor = "val_loss" if val_ds is not None else "loss"
    stateful: dict[str, Any] = {}
    callbacks: list[keras.callbacks.Callback] = []
    tensorboard = FlairTensorBoard(
        os.path.join(model_dir, "logs"), cm_metric, images, global_batch_size=cfg["batch_size"], chief=chief
    )
    callbacks.append(tensorboard)
    if cfg["lr_schedule"] == "plateau":
        stateful["plateau"] = cb.TorchReduceLROnPlateau(
            monitor, factor=cfg["plateau_factor"], patience=cfg["plateau_patience"],
            threshold=cfg["plateau_threshold"], cooldown=cfg["plateau_cooldown"], min_lr=cfg["plateau_min_lr"],
        )
    early = None
    if cfg["early_stopping_patience"]:
        early = stateful["early_stopping"] = cb.EarlyStopping(monitor, patience=cfg["early_stopping_patience"])
    ckpt = stateful["checkpoint"] = cb.BestAndLastCheckpoint(os.path.join(model_dir, "checkpoints"), monitor, chief=chief)
    callbacks += list(stateful.values())
    backup = cb.BackupAndRestore(os.path.join(model_dir, "backup"), stateful, chief=chief)
    callbacks.append(backup)  # last: sees the other callbacks' end-of-epoch state
    callbacks.append(_progress_bar(cfg["epochs"]))

    with strategy.scope():
        initial_epoch = backup.restore(model)
    verbose = {"auto": 1 if sys.stdout.isatty() else 2}.get(cfg["verbose"], None)
    verbose = int(cfg["verbose"]) if verbose is None else verbose
    start = time.monotonic()
    # One `fit` call per epoch, each on that epoch's pipeline (see train_dataset);
    # the compiled train/eval functions are reused across calls.
    epoch = initial_epoch
    while epoch < cfg["epochs"] and not (early is not None and early.stopped_epoch is not None):
        with warnings.catch_warnings():
            # Keras warns whenever a dataset of unknown length ends an epoch (a split that
            # dataset_info.json does not count): the expected end of a pass here.
            warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
            model.fit(
                train_dataset(epoch), validation_data=val_ds, epochs=epoch + 1, initial_epoch=epoch,
                steps_per_epoch=steps_per_epoch, validation_steps=cfg["validation_steps"] or val_steps,
                callbacks=callbacks, verbose=verbose, shuffle=False,
            )
        epoch += 1
    if epoch == initial_epoch:
        logging.info("Nothing to train in %s: %s.", model_dir,
                     "early-stopped" if early is not None and early.stopped_epoch is not None
                     else f"{initial_epoch} of {cfg['epochs']} epochs done")
    result = _result(cfg, backup, ckpt, tensorboard, cm_metric, initial_epoch, val_ds is not None, time.monotonic() - start)
    result["num_replicas"] = strategy.num_replicas_in_sync
    if chief:
        _write_json(os.path.join(model_dir, "train_result.json"), result)
    return result


def _training_epoch(info, split, batch_size, strategy, steps_per_epoch: int = 0) -> tuple[int | None, bool]:
    """Steps of one training epoch over `split`, and whether each input pipeline repeats.

    `steps_per_epoch` (--steps_per_epoch) > 0: those steps over a repeated dataset.
    Otherwise, one input pipeline: the batches of one pass (drop_remainder) over a finite
    dataset. Several (several workers, TPU pods): each host reads its own files, whose
    example counts differ, so a finite pass would end on one host before the others, which
    then run their last steps with empty batches there (a TPU pod cannot run them at all).
    So each host repeats its share and the epoch is ``num_examples // batch_size`` steps:
    every batch full on every host, and a host that is a few examples short starts its next
    pass early. (None, False) when dataset_info.json does not count the split.
    """
    if steps_per_epoch:
        return steps_per_epoch, True
    count = (info.get("splits", {}).get(split) or {}).get("num_examples")
    if not count:
        return None, False
    steps = int(count) // batch_size
    if steps < 1:
        raise ValueError(
            f"The {split} split has {count} examples, fewer than one batch of --batch_size={batch_size}; "
            "lower --batch_size."
        )
    return steps, _num_input_pipelines(strategy) != 1


def _num_input_pipelines(strategy) -> int | None:
    """Input pipelines `distribute_datasets_from_function` runs under `strategy` (one per host).

    None if the strategy does not say (then nothing is counted up front).
    """
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # The count its InputContext carries (chief and workers); there is no public accessor.
        count = getattr(strategy.extended, "_num_workers", None)
    elif isinstance(strategy, tf.distribute.TPUStrategy):
        count = getattr(strategy.extended, "num_hosts", None)
    else:
        count = 1
    return None if count is None else int(count)


def _validation_pass_steps(pattern, split, data_config, batch_size, strategy) -> int | None:
    """Steps of one padded pass over `split` (every example once), on any number of hosts.

    Given to `fit` as ``validation_steps``. Left to find the end of a
    distributed dataset itself, Keras counted one or two steps more, at random,
    in the average it reports as ``val_loss`` (their loss is zero, their weight
    the static batch size), so ``val_loss`` came out 10/11 or 10/12 of its value
    on the same weights, and with it the best checkpoint and the schedule
    changed from run to run. The count comes from dataset_info.json's per-shard
    counts (`pipeline.evaluation_steps`, the padding's own arithmetic); None
    (Keras finds the end) without them, or if the strategy hides its host count.
    """
    from flair_tf.data import pipeline

    pipelines = _num_input_pipelines(strategy)
    if pipelines is None:
        return None
    return pipeline.evaluation_steps(pattern, split, data_config, batch_size, pipelines, strategy.num_replicas_in_sync)


def _check_model_keys(model, input_keys, output_keys) -> None:
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict) and set(struct) != set(input_keys):
        raise ValueError(
            f"build_model made a model with inputs {sorted(struct)} but the data gives {sorted(input_keys)}; "
            "check --arch / --use_metadata / --model_overrides."
        )
    outputs = getattr(model, "_outputs_struct", None)
    if isinstance(outputs, dict) and set(outputs) != set(output_keys):
        raise ValueError(f"Model outputs {sorted(outputs)} differ from the expected {sorted(output_keys)}.")


def _result(cfg, backup, ckpt, tensorboard, cm_metric, initial_epoch, has_val, seconds) -> dict[str, Any]:
    history = backup.history
    last = history[-1] if history else {}
    miou_key = next((k for k in last if k.startswith("val_") and k.endswith("miou")), None)
    scores = None
    if has_val and history and len(history) > initial_epoch:  # this run validated at least once
        scores = {k: v for k, v in cm_metric.scores().items() if k != "confusion_matrix"}
        scores["confusion_matrix"] = cm_metric.confusion_matrix().tolist()
    model_dir = cfg["model_dir"]
    return {
        "model_dir": model_dir,
        "initial_epoch": initial_epoch,
        "epochs_completed": len(history),
        "history": history,
        "best_val_loss": None if ckpt.best == float("inf") else ckpt.best,
        "best_epoch": ckpt.best_epoch,
        "val_miou": last.get(miou_key) if miou_key else None,
        "val_scores": scores,
        "throughput": tensorboard.throughput,
        "train_seconds": seconds,
        "checkpoints": {"best": ckpt.best_path, "last": ckpt.last_path},
        "tensorboard_command": f"tensorboard --logdir {os.path.join(model_dir, 'logs')}",
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = train(flair_flags.config_from_flags(flags.FLAGS))
    if result["val_miou"] is not None:
        n = result["epochs_completed"]
        print(f"Validation mIoU (official, after {n} epoch{'s' if n != 1 else ''}): {result['val_miou']:.4f}")
    if result["best_val_loss"] is not None:
        print(f"Best val_loss {result['best_val_loss']:.4f} at epoch {result['best_epoch'] + 1}: {result['checkpoints']['best']}")
    print(f"TensorBoard: {result['tensorboard_command']}")


def run() -> None:
    """Console script `flair-tf-train`."""
    flair_flags.define_flags()
    flags.mark_flags_as_required(["model_dir", "data_dir"])
    app.run(main)


if __name__ == "__main__":
    run()
