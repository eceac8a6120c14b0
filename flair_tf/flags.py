"""Every command-line flag of `flair_tf.train` (and the data/model/runtime flags that
`evaluate` and `predict` share), defined in functions so that tests and library
callers never depend on global flag state.

* `define_flags()` defines them all on `absl.flags.FLAGS` (idempotent).
  Group helpers (`define_data_flags`, `define_model_flags`,
  `define_runtime_flags`, `define_train_flags`) let another entry point take
  only what it needs.
* `default_config()` is the dict of every flag's default, and
  `config_from_flags()` the dict of the parsed values: `flair_tf.train.train`
  takes such a dict, so it runs in-process without absl parsing.
* `write_flags_file()` writes the effective values as a flagfile
  (``<model_dir>/flags.txt``); ``--flagfile=<model_dir>/flags.txt`` reruns it.

absl's ``--flagfile`` needs no code here; flagfiles may include other flagfiles
(``--flagfile=configs/flair1_unet.flags`` inside ``configs/gpu_flair1_unet.flags``),
and later flags override earlier ones.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf
from absl import flags

# Group name -> flag names, filled by the define_* functions.
_GROUPS: dict[str, list[str]] = {}


def define_once(kind: Callable, name: str, *args, flag_values: flags.FlagValues, **kw) -> None:
    """``kind(name, *args, ...)`` (an absl ``DEFINE_*``) unless `flag_values` already has `name`.

    The entry points share flag names (``--model_dir``, ``--batch_size``...); defining
    each only once lets tests and tools load several of them in one process.
    """
    if name not in flag_values:
        kind(name, *args, flag_values=flag_values, **kw)


def _define(group: str, fv: flags.FlagValues, kind: Callable, name: str, *args, **kw) -> None:
    _GROUPS.setdefault(group, [])
    if name not in _GROUPS[group]:
        _GROUPS[group].append(name)
    define_once(kind, name, *args, flag_values=fv, **kw)


def define_data_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Records, bands, classes and preprocessing (the `PipelineConfig` fields)."""
    d = lambda *a, **k: _define("data", fv, *a, **k)  # noqa: E731
    d(flags.DEFINE_enum, "task", "flair1", ["flair1", "flair2"], "FLAIR #1 (aerial) or FLAIR #2 (aerial + Sentinel-2).")
    d(flags.DEFINE_string, "data_dir", None,
      "Folder (local or gs://) with the TFRecord shards and dataset_info.json written by "
      "tools/convert_to_tfrecords.py.")
    d(flags.DEFINE_string, "train_split", "train", "Record split used for training.")
    d(flags.DEFINE_string, "val_split", "val", "Record split used for validation ('' = no validation).")
    d(flags.DEFINE_integer, "num_classes", 13,
      "13 (challenge remap: codes >= 13 -> 'other') or 19 (full nomenclature, IGN's later library).")
    d(flags.DEFINE_list, "channels", ["R", "G", "B", "NIR", "E"],
      "Aerial channels fed to the model, in order, from R,G,B,NIR,E (E = elevation).")
    d(flags.DEFINE_boolean, "use_metadata", False, "Feed the 45-value aerial metadata vector (metadata MLP).")
    d(flags.DEFINE_boolean, "fix_month_quirk", False,
      "Encode the acquisition month correctly (the reference encodes a wrong month; False reproduces it).")
    d(flags.DEFINE_boolean, "augment", False, "Random flips and 90-degree rotations of aerial image and labels (train only).")
    d(flags.DEFINE_boolean, "augment_sentinel", False,
      "Apply the same flips/rotations to the Sentinel-2 patch (the reference does not).")
    d(flags.DEFINE_enum, "aerial_on", "auto", ["auto", "device", "host"],
      "Where the per-pixel aerial work of training batches runs (band interleave, class remap, "
      "--augment's flips and rotations): device = in the training step, on the accelerator (the "
      "input pipeline batches the records' bytes as they are: less host CPU per example); host = "
      "in the input pipeline; auto = device when a GPU or TPU is visible. The same batches either way.")
    d(flags.DEFINE_integer, "sentinel_size", 40, "Sentinel-2 super-patch size S in pixels (FLAIR #2 sat_patch_size).")
    d(flags.DEFINE_boolean, "filter_clouds", True, "FLAIR #2: drop cloudy/snowy Sentinel-2 dates.")
    d(flags.DEFINE_float, "cloud_area_threshold", 0.5, "FLAIR #2: max cloudy share of the patch for a date to be kept.")
    d(flags.DEFINE_integer, "cloud_proba_threshold", 60, "FLAIR #2: cloud/snow probability above which a pixel is cloudy.")
    d(flags.DEFINE_boolean, "average_month", True, "FLAIR #2: average the kept dates per month (12 steps).")
    d(flags.DEFINE_integer, "max_dates", 0,
      "FLAIR #2 without monthly averaging: pad/trim the series to this many dates (0 = the pipeline's default).")
    d(flags.DEFINE_enum, "sentinel_scaling", "reference", ["reference", "reflectance"],
      "Sentinel-2 value scaling: the reference's, or reflectance (/10000).")
    d(flags.DEFINE_enum, "norm_type", "scaling", ["scaling", "custom", "without"],
      "Aerial normalisation, applied by the model's first layer: scaling = x/255 (the reference), "
      "custom = (x - mean) / std, without = raw values.")
    d(flags.DEFINE_list, "norm_means", [],
      "With --norm_type=custom: one mean per --channels entry (empty = from --norm_stats_from).")
    d(flags.DEFINE_list, "norm_stds", [], "With --norm_type=custom: one standard deviation per channel.")
    d(flags.DEFINE_enum, "norm_stats_from", "reference", ["reference", "dataset"],
      "With --norm_type=custom and no explicit values: IGN's defaults, or the train split's "
      "per-band statistics in dataset_info.json.")
    d(flags.DEFINE_integer, "shuffle_buffer", 0, "Training shuffle buffer in examples (0 = the pipeline's default).")
    d(flags.DEFINE_string, "compression", None, "Record compression ('GZIP' or none); default: from dataset_info.json.")


def define_model_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The `build_model` config (written to `model_config.json`)."""
    d = lambda *a, **k: _define("model", fv, *a, **k)  # noqa: E731
    d(flags.DEFINE_enum, "arch", "unet", ["unet", "utt"], "Model: U-Net/ResNet34 (FLAIR #1) or U-T&T (FLAIR #2).")
    d(flags.DEFINE_string, "encoder_weights", "",
      "ImageNet ResNet34 weights for the U-Net encoder (.safetensors or .npz of a torchvision/timm "
      "state dict; the 3->5 channel rule of smp is applied), as the reference's initialisation. "
      "Empty = random initialisation. Ignored when resuming from --model_dir/backup.")
    d(flags.DEFINE_string, "init_checkpoint", "",
      "Initialise the whole model from a file before training: a Keras .weights.h5, or a PyTorch "
      "state dict (.safetensors, .npz, .pth/.ckpt with torch installed) such as an smp U-Net or an "
      "IGN FLAIR #1 / #2 Lightning checkpoint (names mapped by flair_tf.models.weights; strict). "
      "Applied after --encoder_weights. Ignored when resuming from --model_dir/backup.")
    d(flags.DEFINE_string, "model_overrides", "{}",
      'JSON object of extra builder arguments, e.g. \'{"drop_utae_modality": 0.1}\' (see flair_tf.models).')


def define_runtime_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Strategy, devices, precision and compilation."""
    d = lambda *a, **k: _define("runtime", fv, *a, **k)  # noqa: E731
    d(flags.DEFINE_enum, "strategy", "default", ["default", "one_device", "mirrored", "multi_worker", "tpu"],
      "tf.distribute strategy, created before the data and the model.")
    d(flags.DEFINE_string, "tpu", "local", "With --strategy=tpu: 'local' on a TPU VM, or a TPU name / grpc:// address.")
    d(flags.DEFINE_integer, "num_gpus", 0, "With --strategy=mirrored: use the first N GPUs (0 = all).")
    d(flags.DEFINE_integer, "num_logical_cpus", 0,
      "Split the CPU into N logical devices (tests and the demo: MirroredStrategy on a CPU). "
      "Also read from FLAIR_TF_NUM_LOGICAL_CPUS. 0 = do not split.")
    d(flags.DEFINE_enum, "precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
      "Compute dtype policy; logits and losses stay float32. mixed_bfloat16 for TPUs, mixed_float16 for GPUs.")
    d(flags.DEFINE_enum, "jit_compile", "auto", ["auto", "true", "false"],
      "XLA-compile the train step (auto: Keras' choice, off under tf.distribute on GPU/CPU).")
    d(flags.DEFINE_integer, "steps_per_execution", 1,
      "Train steps per tf.function call (TPU throughput). Must be 1 under mirrored/multi_worker (Keras 3 bug).")
    d(flags.DEFINE_boolean, "deterministic", False,
      "tf.config.experimental.enable_op_determinism(): bit-identical reruns, slower.")
    d(flags.DEFINE_integer, "seed", 2022, "Seed of Python, NumPy, TensorFlow, Keras and the input pipeline.")


def define_train_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Optimisation, schedule, checkpoints and logging."""
    d = lambda *a, **k: _define("train", fv, *a, **k)  # noqa: E731
    d(flags.DEFINE_string, "model_dir", None,
      "Output folder (local or gs://): flags.txt, model_config.json, data_config.json, checkpoints/, "
      "backup/, logs/. A rerun with the same folder resumes.")
    d(flags.DEFINE_integer, "epochs", 100, "Maximum number of epochs.")
    d(flags.DEFINE_integer, "batch_size", 10, "GLOBAL training batch size (split over the replicas).")
    d(flags.DEFINE_integer, "val_batch_size", 0, "GLOBAL validation batch size (0 = --batch_size).")
    d(flags.DEFINE_integer, "steps_per_epoch", 0,
      "Training steps per epoch (0 = one pass over the training records; with several hosts, "
      "num_examples // batch_size steps, each host repeating its share).")
    d(flags.DEFINE_integer, "validation_steps", 0, "Validation steps per epoch (0 = the whole validation split).")
    d(flags.DEFINE_enum, "optimizer", "sgd", ["sgd", "adam", "adamw"],
      "SGD as both references (FLAIR #1 lr 0.02, FLAIR #2 lr 1e-3, no momentum); Adam/AdamW as options.")
    d(flags.DEFINE_float, "learning_rate", 0.02, "Initial learning rate.")
    d(flags.DEFINE_float, "momentum", 0.0, "SGD momentum (reference: 0).")
    d(flags.DEFINE_float, "weight_decay", 0.0, "AdamW decoupled weight decay (0 = none).")
    d(flags.DEFINE_enum, "lr_schedule", "plateau", ["plateau", "none", "cosine"],
      "plateau: PyTorch ReduceLROnPlateau on val_loss (FLAIR #1); none: constant (FLAIR #2); "
      "cosine: cosine decay to 0 over --epochs (not in the references; short runs, the demo).")
    d(flags.DEFINE_float, "plateau_factor", 0.5, "ReduceLROnPlateau factor.")
    d(flags.DEFINE_integer, "plateau_patience", 10, "ReduceLROnPlateau patience (epochs).")
    d(flags.DEFINE_integer, "plateau_cooldown", 4, "ReduceLROnPlateau cooldown (epochs).")
    d(flags.DEFINE_float, "plateau_min_lr", 1e-7, "ReduceLROnPlateau minimum learning rate.")
    d(flags.DEFINE_float, "plateau_threshold", 1e-4, "ReduceLROnPlateau relative threshold (PyTorch 'rel' mode).")
    d(flags.DEFINE_integer, "early_stopping_patience", 30, "Stop after this many epochs without val_loss improvement (0 = never).")
    d(flags.DEFINE_enum, "loss_averaging", "auto", ["auto", "pixels", "weights"],
      "Weighted-CE average: pixels (FLAIR #1 challenge), weights (FLAIR #2 and 19 classes); auto = the task's.")
    d(flags.DEFINE_boolean, "use_class_weights", True, "Reference class weights (0 for 'other'; FLAIR #2 Sentinel also plowed land).")
    d(flags.DEFINE_float, "aerial_loss_weight", 1.0, "U-T&T: weight of the aerial (U-Net) loss (reference w_unet_utae[1]).")
    d(flags.DEFINE_float, "sentinel_loss_weight", 1.0, "U-T&T: weight of the auxiliary Sentinel loss (reference w_unet_utae[0]).")
    d(flags.DEFINE_integer, "tensorboard_images", 4, "Validation patches drawn in TensorBoard each epoch (0 = none).")
    d(flags.DEFINE_enum, "verbose", "auto", ["auto", "0", "1", "2"], "Keras fit verbosity (auto: bar on a terminal, a line per epoch otherwise).")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines every training flag on `fv` (safe to call twice)."""
    define_data_flags(fv)
    define_model_flags(fv)
    define_runtime_flags(fv)
    define_train_flags(fv)


def flag_names(groups=("data", "model", "runtime", "train")) -> list[str]:
    """Names of the flags of the given groups, in definition order."""
    if not _GROUPS:
        define_flags(flags.FlagValues())
    return [n for g in groups for n in _GROUPS.get(g, [])]


def default_config() -> dict[str, Any]:
    """Every flag's default value, as `config_from_flags` would return it."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv.mark_as_parsed()
    return {name: fv[name].value for name in flag_names()}


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The parsed values of every training flag."""
    return {name: fv[name].value for name in flag_names() if name in fv}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def flags_file_text(config: dict[str, Any]) -> str:
    """The config as flagfile lines (``--name=value``); None values are left out."""
    lines = ["# Effective flags of this run; rerun with --flagfile=<this file>."]
    for name in flag_names():
        if name in config and config[name] is not None:
            lines.append(f"--{name}={_format(config[name])}")
    return "\n".join(lines) + "\n"


def write_flags_file(config: dict[str, Any], path: str) -> None:
    """Writes `flags_file_text(config)` to `path` (local or gs://)."""
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(flags_file_text(config))
