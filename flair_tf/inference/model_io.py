"""Models for inference: rebuilding one from ``--model_dir`` and adapting it to plain tensors.

A training run (contract E) leaves ``model_config.json`` (the dict for
:func:`flair_tf.models.build_model`), ``data_config.json``
(:class:`flair_tf.data.pipeline.PipelineConfig`) and ``checkpoints/*.weights.h5``
in ``--model_dir``. Models take a dict of inputs (``aerial`` and, depending on
the architecture, ``metadata`` / ``sentinel*``) and return a dict of logits
(``aerial``, plus ``sentinel`` for U-T&T); the adapters here hide that for code
that only deals in aerial tensors (whole-raster inference, export).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from absl import logging

MODEL_CONFIG = "model_config.json"
DATA_CONFIG = "data_config.json"
BEST_WEIGHTS = os.path.join("checkpoints", "best.weights.h5")
LAST_WEIGHTS = os.path.join("checkpoints", "last.weights.h5")


@dataclasses.dataclass
class LoadedModel:
    """A rebuilt model with the configs it was trained with."""

    model: Any  # keras.Model
    model_config: dict
    data_config: dict
    weights: str
    model_dir: str = ""
    any_size: bool = False  # built with input_size=None (accepts any multiple of 32)

    @property
    def num_classes(self) -> int:
        return int(self.model_config.get("num_classes", self.data_config.get("num_classes", 13)))

    @property
    def arch(self) -> str:
        return str(self.model_config.get("arch", "unet"))


def _read_json(path: str) -> dict:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --model_dir must be a training run's folder "
            "(python -m flair_tf.train writes model_config.json and data_config.json there)"
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _local_copy(path: str) -> str:
    """Keras loads .h5 weights from local files only: copy gs:// files to a temp dir."""
    import tempfile

    import tensorflow as tf

    if "://" not in path:
        return path
    local = os.path.join(tempfile.mkdtemp(prefix="flair_tf_weights_"), os.path.basename(path))
    tf.io.gfile.copy(path, local, overwrite=True)
    return local


def run_dir_of(model_dir: str | None, weights: str | None) -> str:
    """The run folder: ``model_dir``, or derived from a weights file inside ``<run>/checkpoints/``."""
    if model_dir:
        return model_dir
    if not weights:
        raise ValueError("Give --model_dir (a training run folder) or --weights=<run>/checkpoints/<file>.weights.h5")
    parent = os.path.dirname(weights)
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def read_configs(model_dir: str) -> tuple[dict, dict]:
    """``(model_config, data_config)`` of a run folder, without building the model."""
    return _read_json(os.path.join(model_dir, MODEL_CONFIG)), _read_json(os.path.join(model_dir, DATA_CONFIG))


WINOGRAD_FLAG_VALUES = {"auto": None, "on": True, "off": False}
WINOGRAD_FLAG_HELP = ("Compute the wide 3x3 convolutions by Winograd F(4x4, 3x3) (models.winograd): same outputs up "
                      "to float rounding, U-Net inference about 25% faster on CPU. auto: when no GPU or TPU is "
                      "visible; off: direct convolutions everywhere.")


def winograd_by_default() -> bool:
    """`load_model`'s ``winograd=None``: True when this process sees no GPU or TPU."""
    from flair_tf.training import strategy

    return not strategy.accelerator_visible()


def winograd_setting(flag_value: str) -> bool | None:
    """The ``winograd`` argument of `load_model` for a ``--winograd`` flag value (auto, on, off)."""
    if flag_value not in WINOGRAD_FLAG_VALUES:
        raise ValueError(f"--winograd must be one of {sorted(WINOGRAD_FLAG_VALUES)}. Received: {flag_value!r}")
    return WINOGRAD_FLAG_VALUES[flag_value]


def inference_model(model, fold_batchnorm: bool = True, winograd: bool | None = None):
    """The inference copy of a trained model that `load_model` gives (and the benchmarks time).

    BatchNorm folded into the convolutions (`flair_tf.models.folding`), then,
    with `winograd` (None: when the process sees no GPU or TPU), the wide 3x3
    convolutions computed by Winograd F(4x4, 3x3) (`flair_tf.models.winograd`).
    Without `fold_batchnorm`, `model` itself (`winograd` is ignored).
    """
    if not fold_batchnorm:
        return model
    from flair_tf.models.folding import fold_batchnorm as fold

    model = fold(model)
    if winograd is None:
        winograd = winograd_by_default()
    if winograd:
        from flair_tf.models.winograd import winograd_model

        model = winograd_model(model)
    return model


def load_model(model_dir: str | None, weights: str | None = None, any_size: bool = False,
               fold_batchnorm: bool = True, winograd: bool | None = None) -> LoadedModel:
    """Rebuilds the model of a training run and loads its weights, for inference.

    Args:
      model_dir: the run's folder (local or ``gs://``); None takes the folder
        of ``weights`` (or its parent when the file lies in ``checkpoints/``).
      weights: a ``.weights.h5`` file; default ``<model_dir>/checkpoints/best.weights.h5``,
        then ``last.weights.h5``.
      any_size: rebuild a U-Net without metadata with ``input_size=None`` so it
        takes tiles of any size (multiple of 32); the weights do not depend on
        the size. Other models keep their training size.
      fold_batchnorm: return the inference copy of the model with its
        BatchNorm layers folded into the preceding convolutions
        (`flair_tf.models.folding`): the same outputs up to float rounding,
        and faster (U-Net/ResNet34 about 4% on CPU). False keeps the model as
        trained (e.g. to train on from it).
      winograd: after folding, compute the wide 3x3 convolutions by Winograd
        F(4x4, 3x3) (`flair_tf.models.winograd`): the same outputs up to float
        rounding, U-Net/ResNet34 inference about 25% faster on CPU. None (the
        default) does so when the process sees no GPU or TPU (their libraries
        choose their own convolution algorithms); ignored without folding.

    Raises:
      FileNotFoundError: naming the missing file and how to produce it.
    """
    import tensorflow as tf

    from flair_tf.models import build_model

    model_dir = run_dir_of(model_dir, weights)
    model_config, data_config = read_configs(model_dir)
    if weights is None:
        for candidate in (BEST_WEIGHTS, LAST_WEIGHTS):
            if tf.io.gfile.exists(os.path.join(model_dir, candidate)):
                weights = os.path.join(model_dir, candidate)
                break
        else:
            raise FileNotFoundError(
                f"No weights in {model_dir}/checkpoints (expected best.weights.h5 or last.weights.h5); "
                "train first or pass --weights=<file.weights.h5>"
            )
    elif not tf.io.gfile.exists(weights):
        raise FileNotFoundError(f"--weights={weights} does not exist")
    build_config = dict(model_config)
    any_size = any_size and build_config.get("arch") == "unet" and not build_config.get("use_metadata")
    if any_size:
        build_config["input_size"] = None
    model = build_model(build_config)
    model.load_weights(_local_copy(weights))
    model = inference_model(model, fold_batchnorm, winograd)
    logging.info("Loaded %s (%s, %s classes) from %s", model_config.get("arch"), model.name,
                 model_config.get("num_classes"), weights)
    return LoadedModel(model, model_config, data_config, weights, model_dir, any_size)


def input_names(model) -> list[str]:
    """Names of a Keras model's inputs (the dict keys of contract D)."""
    struct = getattr(model, "input", None)
    if isinstance(struct, Mapping):
        return list(struct.keys())
    return [t.name for t in getattr(model, "inputs", [])]


def model_inputs(model, features: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of pipeline ``features`` the model takes (drops ``valid``, ``patch_id``...)."""
    names = input_names(model)
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(
            f"The model needs inputs {missing} that the data does not provide (it has {sorted(features)}); "
            "evaluate with the data_config the model was trained with"
        )
    return {n: features[n] for n in names}


def aerial_logits(model, outputs: Any):
    """The aerial output of a contract-D model (a dict), or the output itself."""
    if isinstance(outputs, Mapping):
        if "aerial" in outputs:
            return outputs["aerial"]
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise KeyError(f"Model outputs {sorted(outputs)} have no 'aerial' entry")
    return outputs


def aerial_model_fn(model) -> Callable:
    """Adapts a model to ``fn(aerial NHWC) -> aerial logits NHWC``.

    Keras models with dict inputs get ``{"aerial": x}``; such models must take
    only ``aerial`` (a U-Net without metadata): whole rasters have no metadata
    vector or Sentinel series. Plain callables are used as they are.
    """
    names = input_names(model) if hasattr(model, "inputs") else []
    extra = [n for n in names if n != "aerial"]
    if extra:
        raise ValueError(
            f"This model also takes {extra}; whole-raster inference and export support aerial-only "
            "models (a U-Net trained without metadata). Received: inputs "
            f"{names}"
        )
    dict_input = isinstance(getattr(model, "input", None), Mapping)

    def fn(x):
        out = model({"aerial": x} if dict_input else x, training=False) if hasattr(model, "inputs") else model(x)
        return aerial_logits(model, out)

    return fn


def pipeline_config(data_config: Mapping[str, Any], keep_keys: tuple[str, ...] = ()):
    """The training run's `PipelineConfig` set up for evaluation (no augmentation, extra keys kept)."""
    from flair_tf.data import pipeline

    cfg = dict(data_config)
    cfg["augment"] = False
    cfg["augment_sentinel"] = False
    cfg["keep_keys"] = tuple(dict.fromkeys(tuple(cfg.get("keep_keys") or ()) + tuple(keep_keys)))
    return pipeline.PipelineConfig.from_dict(cfg)


def eval_dataset(data_dir: str, split: str, data_config: Mapping[str, Any], batch_size: int,
                 keep_keys: tuple[str, ...] = ()):
    """Every record of a split exactly once, in padded batches with ``valid`` and ``patch_id``."""
    from flair_tf.data import pipeline

    cfg = pipeline_config(data_config, keep_keys)
    return pipeline.make_dataset(data_dir, split, cfg, batch_size, training=False, pad_final_batch=True,
                                 repeat=False)


def split_size(data_dir: str, split: str) -> int | None:
    """Number of records of a split from ``dataset_info.json`` (None if unknown)."""
    from flair_tf.data import schema

    try:
        info = schema.load_dataset_info(data_dir)
    except (FileNotFoundError, ValueError):
        return None
    n = info.get("splits", {}).get(split, {}).get("num_examples")
    return int(n) if n is not None else None
