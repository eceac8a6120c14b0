"""Predicts with a trained model: ``python -m flair_tf.predict``.

Two modes:

* **patches** (``--data_dir``): every record of a split -> ``PRED_<id>.tif`` in
  the challenge format (uint8 class index, LZW, patch size, no georeferencing),
  or GeoTIFFs with the patch's CRS and transform with ``--georeferenced``.
  Score them with ``tools/compute_miou.py``.
* **raster** (``--input``): a whole georeferenced image of any size ->
  one tiled, LZW-compressed GeoTIFF (argmax or per-class probabilities),
  sliding window with blended overlaps (see :mod:`flair_tf.inference.raster`).

Examples:
  python -m flair_tf.predict --model_dir=runs/flair1_unet --data_dir=records --split=test
  python -m flair_tf.predict --model_dir=runs/flair1_unet --input=ortho.tif --output=landcover.tif \
      --bands=1,2,3,4,5 --margin=128 --tta
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags


def patch_predict_step(model, tta: bool = False):
    """A compiled ``features -> uint8 class maps [B, H, W]`` for contract-D models."""
    import tensorflow as tf

    from flair_tf.inference import model_io, raster

    names = model_io.input_names(model)
    if tta:
        if names != ["aerial"]:
            raise ValueError(f"--tta needs an aerial-only model; this one takes {names}")
        probs = raster.make_probability_fn(model_io.aerial_model_fn(model), tta=True)
        return lambda features: np.argmax(probs(features["aerial"]), axis=-1).astype(np.uint8)

    @tf.function
    def step(inputs):
        out = model(inputs, training=False)
        return tf.cast(tf.argmax(model_io.aerial_logits(model, out), axis=-1), tf.uint8)

    return lambda features: step({n: features[n] for n in names}).numpy()


def predict_patches(model_dir: str | None, data_dir: str, split: str = "test", output_dir: str | None = None,
                    batch_size: int = 8, georeferenced: bool = False, tta: bool = False,
                    weights: str | None = None, winograd: bool | None = None) -> dict[str, Any]:
    """Writes one ``PRED_<id>.tif`` per record of ``split`` (library entry point of patch mode).

    Args:
      model_dir: training run folder; None to take it from ``weights``.
      data_dir: TFRecords folder (with ``dataset_info.json``).
      split: record split to predict.
      output_dir: destination; default ``<model_dir>/predictions_<split>``.
      batch_size: patches per model call.
      georeferenced: write GeoTIFFs with each record's CRS and transform
        instead of the (non-georeferenced) challenge format.
      tta: average the probabilities over 4 flips (aerial-only models).
      weights: weights file; default the run's best checkpoint.
      winograd: `model_io.load_model`'s switch (None: on CPU-only machines).

    Returns:
      ``{"output_dir": ..., "num_files": n, "num_classes": k}``.
    """
    from flair_tf.inference import model_io, patches

    loaded = model_io.load_model(model_dir, weights, winograd=winograd)
    out_dir = output_dir or os.path.join(loaded.model_dir, f"predictions_{split}")
    keep = ("crs_wkt", "transform") if georeferenced else ()
    dataset = model_io.eval_dataset(data_dir, split, loaded.data_config, batch_size, keep_keys=keep)
    step = patch_predict_step(loaded.model, tta)
    georefs: dict[str, tuple[str, Any]] | None = {} if georeferenced else None

    def batches():
        for features, labels in dataset:
            if georefs is not None:
                for pid, wkt, tr in zip(features["patch_id"].numpy(), features["crs_wkt"].numpy(),
                                        features["transform"].numpy()):
                    georefs[pid.decode()] = (wkt.decode(), tuple(float(v) for v in tr))
            yield {k: v for k, v in features.items() if k not in keep}, labels

    paths = patches.predict_patches(batches(), step, out_dir, georefs, total=model_io.split_size(data_dir, split))
    return {"output_dir": out_dir, "num_files": len(paths), "num_classes": loaded.num_classes}


def predict_raster(model_dir: str | None, input_path: str, output_path: str | None = None,
                   config=None, weights: str | None = None, winograd: bool | None = None) -> dict[str, Any]:
    """Predicts a whole raster (library entry point of raster mode).

    Args:
      model_dir: training run folder (an aerial-only model: U-Net without metadata).
      input_path: georeferenced raster.
      output_path: output GeoTIFF; default ``<model_dir>/prediction/<name>_<output_type>.tif``.
      config: :class:`flair_tf.inference.raster.RasterConfig`.
      weights: weights file; default the run's best checkpoint.
      winograd: `model_io.load_model`'s switch (None: on CPU-only machines).
    """
    from flair_tf.inference import model_io, raster

    cfg = config or raster.RasterConfig()
    cfg.validate()
    run_dir = model_io.run_dir_of(model_dir, weights)
    model_config, data_config = model_io.read_configs(run_dir)  # checks first: building the model is slow
    channels = list(data_config.get("channels") or [])
    n_in = len(channels) or int(model_config.get("in_channels", 5))
    if len(cfg.bands) != n_in:
        raise ValueError(
            f"The model takes {n_in} channels ({','.join(channels)}) but --bands selects {len(cfg.bands)} "
            f"({','.join(map(str, cfg.bands))}); choose one input band per channel, in the model's order"
        )
    if cfg.tile_size % 32:
        raise ValueError(f"--tile_size must be a multiple of 32 for the U-Net. Received: {cfg.tile_size}")
    loaded = model_io.load_model(run_dir, weights, any_size=True, winograd=winograd)
    size = loaded.model_config.get("input_size")
    if not loaded.any_size and size and int(size) != cfg.tile_size:
        raise ValueError(f"This model was built for {size}x{size} inputs; use --tile_size={size}")
    if output_path is None:
        stem = os.path.splitext(os.path.basename(input_path))[0]
        output_path = os.path.join(loaded.model_dir, "prediction", f"{stem}_{cfg.output_type}.tif")
    fn = raster.make_probability_fn(model_io.aerial_model_fn(loaded.model), from_logits=True, tta=cfg.tta)
    return raster.predict_raster(fn, input_path, output_path, loaded.num_classes, cfg)


# ------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Flags of ``python -m flair_tf.predict`` (safe to call twice)."""
    from flair_tf.inference import define_flag, model_io

    f = flags
    define_flag(f.DEFINE_string, "model_dir", None,
                "Training run folder (model_config.json, data_config.json, checkpoints/).", fv)
    define_flag(f.DEFINE_string, "weights", None, "Weights file; default <model_dir>/checkpoints/best.weights.h5.", fv)
    define_flag(f.DEFINE_integer, "batch_size", 8, "Patches (patch mode) or tiles (raster mode) per model call.", fv)
    define_flag(f.DEFINE_boolean, "tta", False,
                "Test-time augmentation: average the probabilities over 4 flips (aerial-only models).", fv)
    define_flag(f.DEFINE_enum, "winograd", "auto", list(model_io.WINOGRAD_FLAG_VALUES), model_io.WINOGRAD_FLAG_HELP, fv)
    # Patch mode.
    define_flag(f.DEFINE_string, "data_dir", None, "Patch mode: TFRecords folder (with dataset_info.json).", fv)
    define_flag(f.DEFINE_string, "split", "test", "Patch mode: record split to predict.", fv)
    define_flag(f.DEFINE_string, "output_dir", None,
                "Patch mode: folder of PRED_<id>.tif; default <model_dir>/predictions_<split>.", fv)
    define_flag(f.DEFINE_boolean, "georeferenced", False,
                "Patch mode: write GeoTIFFs with the patch's CRS and transform (the challenge format has none).", fv)
    # Raster mode.
    define_flag(f.DEFINE_string, "input", None, "Raster mode: georeferenced image of any size (local or gs://).", fv)
    define_flag(f.DEFINE_string, "output", None,
                "Raster mode: output GeoTIFF; default <model_dir>/prediction/<input name>_<output_type>.tif.", fv)
    define_flag(f.DEFINE_list, "bands", ["1", "2", "3", "4", "5"],
                "Raster mode: 1-based input bands, in the model's channel order (R,G,B,NIR,E for the baseline).", fv)
    define_flag(f.DEFINE_integer, "tile_size", 512, "Raster mode: tile side in pixels (multiple of 32).", fv)
    define_flag(f.DEFINE_integer, "margin", 128,
                "Raster mode: tile overlap per side; step = tile_size - 2*margin (reference: 128).", fv)
    define_flag(f.DEFINE_enum, "output_type", "argmax", ["argmax", "probabilities"],
                "Raster mode: 1 band of class indices, or one uint8 band per class (round(p*255)).", fv)
    define_flag(f.DEFINE_enum, "blend", "smooth", ["smooth", "crop"],
                "Raster mode: smooth blending of overlapping tiles, or the reference's hard crop of the margins.", fv)
    define_flag(f.DEFINE_string, "nodata", None,
                "Raster mode: input nodata value (pixels where every band equals it); default: the file's own.", fv)
    define_flag(f.DEFINE_integer, "output_nodata", 255, "Raster mode, argmax output: value of nodata pixels.", fv)
    define_flag(f.DEFINE_boolean, "preview", True,
                "Raster mode, argmax output: also write <output>_preview.png, the class map in the FLAIR "
                "colours, at most 1024 px a side.", fv)


def main(argv) -> None:
    del argv
    from flair_tf.inference import model_io, raster

    if not (FLAGS.model_dir or FLAGS.weights):
        raise app.UsageError("--model_dir (or --weights) is required")
    if bool(FLAGS.input) == bool(FLAGS.data_dir):
        raise app.UsageError("Give either --data_dir (patch mode) or --input (raster mode)")
    winograd = model_io.winograd_setting(FLAGS.winograd)
    if FLAGS.data_dir:
        result = predict_patches(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, FLAGS.output_dir,
                                 FLAGS.batch_size, FLAGS.georeferenced, FLAGS.tta, FLAGS.weights, winograd)
        print(f"Wrote {result['num_files']} PRED_<id>.tif files ({result['num_classes']}-class indices) to "
              f"{result['output_dir']}\n  score them: python tools/compute_miou.py --pred_dir={result['output_dir']} "
              "--mask_dir=<folder of MSK_*.tif>", file=sys.stdout)
        return
    cfg = raster.RasterConfig(
        bands=tuple(int(b) for b in FLAGS.bands), tile_size=FLAGS.tile_size, margin=FLAGS.margin,
        batch_size=FLAGS.batch_size, output_type=FLAGS.output_type, blend=FLAGS.blend, tta=FLAGS.tta,
        nodata=float(FLAGS.nodata) if FLAGS.nodata not in (None, "") else None, output_nodata=FLAGS.output_nodata)
    summary = predict_raster(FLAGS.model_dir, FLAGS.input, FLAGS.output, cfg, FLAGS.weights, winograd)
    lines = [f"Wrote {summary['output']} ({summary['width']}x{summary['height']} px, {cfg.output_type}, "
             f"{summary['tiles']} tiles, {summary['seconds']:.1f} s, {summary['megapixels_per_second']:.2f} MP/s)"]
    if FLAGS.preview and cfg.output_type == "argmax":
        from flair_tf.inference import report

        num_classes = int(model_io.read_configs(model_io.run_dir_of(FLAGS.model_dir, FLAGS.weights))[0]
                          .get("num_classes", 13))
        png = os.path.splitext(summary["output"])[0] + "_preview.png"
        report.class_map_preview(summary["output"], png, num_classes)
        lines.append(f"  colour preview: {png}")
    print("\n".join(lines), file=sys.stdout)


def run() -> None:
    """Console script ``flair-tf-predict``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
