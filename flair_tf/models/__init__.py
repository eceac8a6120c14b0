"""Keras models of the FLAIR baselines (contract D).

* `build_unet`: smp U-Net/ResNet34 (FLAIR #1), optionally with the metadata MLP.
* `build_utae`: U-TAE with FLAIR #2's configuration.
* `build_utt`: U-T&T (FLAIR #2): U-Net + U-TAE + fusion, aerial and auxiliary logits.
* `build_model(config)`: one of them from a JSON-serialisable dict
  ``{"arch": "unet" | "utt" | "utae", **builder_kwargs}``.

Weight import/export lives in `flair_tf.models.weights`.
"""

from __future__ import annotations

import keras

from flair_tf.models.unet import build_unet
from flair_tf.models.utae import build_utae
from flair_tf.models.utt import build_utt

BUILDERS = {"unet": build_unet, "utt": build_utt, "utae": build_utae}

__all__ = ["BUILDERS", "build_model", "build_unet", "build_utae", "build_utt"]


def build_model(config: dict) -> keras.Model:
    """Builds a model from ``{"arch": ..., **kwargs}``.

    Args:
      config: ``arch`` is ``"unet"``, ``"utt"`` or ``"utae"``; the other keys are
        keyword arguments of the matching builder (e.g. ``num_classes``,
        ``input_size``, ``use_metadata``, quirk switches). Lists are accepted
        where tuples are expected, so the dict survives a JSON round trip.

    Returns:
      the `keras.Model`.

    Example:
      >>> model = build_model({"arch": "unet", "num_classes": 13, "input_size": 64})
      >>> sorted(model.output)
      ['aerial']
    """
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(f"config must be a dict with an 'arch' key. Received: config={config!r}")
    kwargs = dict(config)
    arch = kwargs.pop("arch")
    if arch not in BUILDERS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {sorted(BUILDERS)}. Received: config={config!r}")
    try:
        return BUILDERS[arch](**kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid model_config for arch {arch!r}: {e}. Received: config={config!r}") from e
