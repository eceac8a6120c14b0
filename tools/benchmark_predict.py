#!/usr/bin/env python
"""Whole-raster prediction speed and memory: prints one JSON line.

Figures (the model runs on this machine's CPU unless a GPU is visible):

* ``raster_mp_per_s``: megapixels of a ``--size`` x ``--size`` synthetic
  5-band GeoTIFF predicted per second by :func:`flair_tf.inference.raster.predict_raster`
  (tiles of ``--tile_size`` with ``--margin``, read from disk window by window,
  blended, written as a tiled LZW GeoTIFF), wall clock of the whole call.
* ``patch_mp_per_s`` -- the bound: the same model and probability function on
  in-memory uint8 batches of ``--tile_size`` tiles, counted as *useful*
  megapixels at the same overlap: ``tiles/s * (tile_size - 2*margin)^2``.
  Each tile of the raster grid contributes exactly that many new pixels (a
  4096 raster at 512/128 is 16 x 16 tiles = 4096^2 / 256^2), so the ratio
  measures the engine's own overhead (I/O, blending, writing) and nothing
  else.
* ``ratio`` = raster / patch (target >= 0.8 at the reference overlap 512/128).
  On a shared machine the load drifts between the two measurements, so the
  bound is measured before and after the raster run and averaged, and
  ``model_busy_fraction`` (share of the raster run's wall time spent inside
  the model call) gives the same figure from within the run.
* ``peak_rss_mb`` for each of ``--rss_sizes``: peak resident memory of a fresh
  process (model + TensorFlow + engine) predicting a raster of that size
  (target: within 10% between 4096 and 8192, i.e. memory does not grow with
  the raster).

Every measurement runs in its own subprocess (``--worker``) so that peak RSS
is per raster size. ``--model=unet`` is the real U-Net/ResNet34 (random
weights: speed does not depend on them; BatchNorm folded and, where no GPU or TPU
is visible, the wide convolutions by Winograd, as ``flair_tf.predict`` loads it); ``--model=small`` is a 3-layer
convolutional stand-in for quick runs (``--rss_model=small`` measures the
memory bound on big rasters without waiting for the U-Net).

Examples:
  python tools/benchmark_predict.py                       # U-Net, 4096 speed + 4096/8192 memory
  python tools/benchmark_predict.py --model=small --size=1024 --rss_sizes=1024,2048
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 4096, "Side of the square raster of the speed measurement (pixels).")
flags.DEFINE_list("rss_sizes", ["4096", "8192"], "Raster sides whose peak RSS is measured (one process each).")
flags.DEFINE_enum("model", "unet", ["unet", "small"], "Model of the speed measurement.")
flags.DEFINE_enum("rss_model", "unet", ["unet", "small"], "Model of the memory measurements.")
flags.DEFINE_integer("tile_size", 512, "Tile side.")
flags.DEFINE_integer("margin", 128, "Tile margin (reference: 128, step 256).")
flags.DEFINE_integer("batch_size", 4, "Tiles per model call.")
flags.DEFINE_integer("patch_batches", 8, "Timed in-memory batches for the patch throughput.")
flags.DEFINE_string("work_dir", None, "Where the synthetic rasters go (default: a temporary folder).")
# Internal: one measurement in a fresh process.
flags.DEFINE_boolean("worker", False, "Internal: run one measurement and print its JSON.")
flags.DEFINE_boolean("measure_patches", True, "Internal: also measure the in-memory patch throughput.")


def _model(kind: str):
    import keras

    from flair_tf.inference import model_io
    from flair_tf.models import build_model

    keras.utils.set_random_seed(0)
    if kind == "unet":
        # As model_io.load_model gives it to flair_tf.predict: BatchNorm folded, size-free, and on a
        # machine without GPU or TPU the wide convolutions by Winograd.
        model = model_io.inference_model(build_model({"arch": "unet", "num_classes": 13, "in_channels": 5}))
        return model_io.aerial_model_fn(model)
    inp = keras.Input((None, None, 5))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    return keras.Model(inp, keras.layers.Conv2D(13, 1)(x))


def write_synthetic_raster(path: str, size: int, block: int = 512) -> None:
    """A georeferenced 5-band uint8 GeoTIFF with smooth content, written block row by block row."""
    import rasterio
    from affine import Affine

    profile = dict(driver="GTiff", width=size, height=size, count=5, dtype="uint8", crs="EPSG:2154",
                   transform=Affine(0.2, 0, 800000.0, 0, -0.2, 6500000.0), tiled=True, blockxsize=block,
                   blockysize=block, BIGTIFF="IF_SAFER")
    rng = np.random.default_rng(0)
    xs = np.arange(size, dtype=np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, block):
            rows = min(block, size - r0)
            y = np.arange(r0, r0 + rows, dtype=np.float32)[:, None]
            base = 128 + 60 * np.sin(xs[None, :] / 97.0) * np.cos(y / 61.0)
            data = np.stack([base + 20 * b + rng.normal(0, 8, (rows, size)) for b in range(5)])
            dst.write(np.clip(data, 0, 255).astype(np.uint8), window=rasterio.windows.Window(0, r0, size, rows))


def worker() -> dict:
    from flair_tf.inference import raster

    kind = FLAGS.model
    fn = raster.make_probability_fn(_model(kind))
    t, m, b = FLAGS.tile_size, FLAGS.margin, FLAGS.batch_size
    batch = np.random.default_rng(1).integers(0, 256, (b, t, t, 5), dtype=np.uint8)
    fn(batch)  # trace + warm up
    import tensorflow as tf

    result = {"size": FLAGS.size, "model": kind, "loadavg_start": os.getloadavg()[0],
              "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu"}

    def patch_tiles_per_s() -> float:
        start = time.perf_counter()
        for _ in range(FLAGS.patch_batches):
            fn(batch)
        return FLAGS.patch_batches * b / (time.perf_counter() - start)

    # The bound is measured before and after the raster run and averaged: on a
    # shared machine the load drifts during a run of several minutes.
    before = patch_tiles_per_s() if FLAGS.measure_patches else None
    path = os.path.join(FLAGS.work_dir, f"synthetic_{FLAGS.size}.tif")
    cfg = raster.RasterConfig(tile_size=t, margin=m, batch_size=b)
    summary = raster.predict_raster(fn, path, os.path.join(FLAGS.work_dir, f"pred_{FLAGS.size}_{kind}.tif"), 13, cfg)
    result.update(raster_seconds=summary["seconds"], tiles=summary["tiles"], model_seconds=summary["model_seconds"],
                  raster_mp_per_s=summary["megapixels_per_second"],
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if FLAGS.measure_patches:
        after = patch_tiles_per_s()
        tiles_per_s = (before + after) / 2
        result.update(patch_tiles_per_s_before=before, patch_tiles_per_s_after=after, patch_tiles_per_s=tiles_per_s,
                      patch_mp_per_s=tiles_per_s * (t - 2 * m) ** 2 / 1e6)
    result["loadavg_end"] = os.getloadavg()[0]
    return result


def _run_worker(size: int, model: str, measure_patches: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--size={size}", f"--model={model}",
           f"--tile_size={FLAGS.tile_size}", f"--margin={FLAGS.margin}", f"--batch_size={FLAGS.batch_size}",
           f"--patch_batches={FLAGS.patch_batches}", f"--work_dir={FLAGS.work_dir}",
           f"--measure_patches={str(measure_patches).lower()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {size} {model} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(worker()))
        return
    FLAGS.work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="flair_tf_bench_")
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    sizes = sorted({FLAGS.size, *(int(s) for s in FLAGS.rss_sizes)})
    for s in sizes:
        path = os.path.join(FLAGS.work_dir, f"synthetic_{s}.tif")
        if not os.path.exists(path):
            write_synthetic_raster(path, s)
    speed = _run_worker(FLAGS.size, FLAGS.model, True)
    rss = {}
    for s in (int(v) for v in FLAGS.rss_sizes):
        if s == FLAGS.size and FLAGS.rss_model == FLAGS.model:
            rss[s] = speed
        else:
            rss[s] = _run_worker(s, FLAGS.rss_model, False)
    out = {
        "model": FLAGS.model,
        "device": speed["device"],
        "cpu_count": os.cpu_count(),
        "size": FLAGS.size,
        "tile_size": FLAGS.tile_size,
        "margin": FLAGS.margin,
        "batch_size": FLAGS.batch_size,
        "tiles": speed["tiles"],
        "raster_mp_per_s": round(speed["raster_mp_per_s"], 4),
        "patch_mp_per_s": round(speed["patch_mp_per_s"], 4),
        "ratio": round(speed["raster_mp_per_s"] / speed["patch_mp_per_s"], 3),
        "patch_tiles_per_s_before_after": [round(speed["patch_tiles_per_s_before"], 3),
                                           round(speed["patch_tiles_per_s_after"], 3)],
        "raster_seconds": round(speed["raster_seconds"], 1),
        # Share of the raster run spent inside the model call: an in-run view of the ratio that
        # does not depend on the load drifting between the two measurements.
        "model_busy_fraction": round(speed["model_seconds"] / speed["raster_seconds"], 3),
        "loadavg_1min_start_end": [round(speed["loadavg_start"], 2), round(speed["loadavg_end"], 2)],
        "rss_model": FLAGS.rss_model,
        "peak_rss_mb": {str(s): round(r["peak_rss_mb"], 1) for s, r in rss.items()},
    }
    if len(rss) >= 2:
        values = [r["peak_rss_mb"] for r in rss.values()]
        out["rss_growth"] = round(max(values) / min(values) - 1, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
