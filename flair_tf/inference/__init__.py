"""Inference: scoring, reports, patch predictions, whole-raster prediction.

* `score_folders` -- challenge mIoU of a folder of ``PRED_*.tif`` against ``MSK_*.tif``.
* `report` -- ``metrics.json``, Markdown table, confusion-matrix PNG/``.npy``, TensorBoard.
* `patches` -- ``PRED_<id>.tif`` files in the challenge format (or georeferenced).
* `raster` -- sliding-window inference on georeferenced rasters of any size.
* `model_io` -- rebuilding a model from a training run folder; tensor adapters.

The entry points are `flair_tf.evaluate`, `flair_tf.predict`, `flair_tf.export`
and `tools/compute_miou.py`.
"""

from __future__ import annotations

from typing import Any, Callable


def define_flag(define: Callable, name: str, *args: Any) -> None:
    """``define_flag(flags.DEFINE_x, name, <DEFINE_x's other arguments>..., flag_values)``.

    `flair_tf.flags.define_once` with the ``FlagValues`` as last positional argument.
    """
    from flair_tf.flags import define_once  # pylint: disable=g-import-not-at-top

    *params, fv = args
    define_once(define, name, *params, flag_values=fv)
