"""Sliding-window inference on a whole georeferenced raster of any size.

Same tiling as IGN's ``flair-detect`` (spec flair1 §6.2): tiles of
``tile_size`` pixels on a grid with ``step = tile_size - 2 * margin`` starting at
``-margin``, the last row/column snapped to end at ``size + margin``, boundless
reads (zeros outside the raster). Unlike the reference, which crops the margins
and lets the last writer win, overlapping tiles are **blended**: each tile's
probabilities are weighted by a separable window that is 1 in the tile centre
and falls smoothly (``sin^2``) to exactly 0 half-way through the margin (the
outer half, where the model lacks context, is discarded as in the reference),
and the weighted sum is normalised. Every pixel lies in the centre of some tile, so the weights
never vanish; ``blend="crop"`` gives the reference's hard crop instead.

Memory stays bounded whatever the raster size: tiles are read window by window
from the file (never the whole raster) by a reader thread that keeps
``prefetch`` batches ahead of the model; probabilities are accumulated in a
window of one tile that slides along the current tile row, plus a *carry* of
the rows shared with the next tile row (``tile - step`` rows x width); finished
pixels are written out a block row (512 lines) at a time. The GDAL block cache
is capped (``gdal_cache_mb``) so it does not grow with the output either.

Nodata: pixels where every selected band equals the input nodata value (the
file's own, or ``nodata``) are zeroed before the model sees them -- the same
value the boundless reads give outside the raster, so a nodata value such as
255 never looks like bright content to its neighbours -- tiles made only of
nodata are skipped, and those pixels get ``output_nodata`` (argmax) or 0 in
every band plus the dataset mask (probabilities).
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import tempfile
import threading
import time
from typing import Callable

import numpy as np
from absl import logging

from flair_tf.progress import Progress

OUTPUT_TYPES = ("argmax", "probabilities")
BLEND_MODES = ("smooth", "crop")


@dataclasses.dataclass
class RasterConfig:
    """Options of whole-raster inference.

    Attributes:
      bands: 1-based band indices of the input fed to the model, in model order.
      tile_size: side of the square tiles given to the model (pixels).
      margin: overlap on each side; the grid step is ``tile_size - 2 * margin``.
        The reference uses 512 / 128 (step 256).
      batch_size: tiles per model call.
      output_type: "argmax" (1 band of class indices) or "probabilities"
        (``num_classes`` bands, ``round(p * 255)``).
      blend: "smooth" (weighted blending) or "crop" (the reference's hard crop
        of the margins).
      tta: average the probabilities over flips (identity, horizontal,
        vertical, both): 4 model calls per tile.
      nodata: input nodata value; None uses the file's own (if it has one).
      output_nodata: value of nodata pixels in argmax output.
      block_size: output GeoTIFF block size.
      prefetch: batches read ahead of the model by the reader thread.
      gdal_cache_mb: cap of GDAL's block cache (bounds memory on big rasters).
      bigtiff: GDAL ``BIGTIFF`` creation option ("IF_SAFER", "YES", "NO").
    """

    bands: tuple[int, ...] = (1, 2, 3, 4, 5)
    tile_size: int = 512
    margin: int = 128
    batch_size: int = 4
    output_type: str = "argmax"
    blend: str = "smooth"
    tta: bool = False
    nodata: float | None = None
    output_nodata: int = 255
    block_size: int = 512
    prefetch: int = 2
    gdal_cache_mb: int = 64
    bigtiff: str = "IF_SAFER"

    def validate(self) -> None:
        if self.tile_size <= 0 or self.margin < 0 or 2 * self.margin >= self.tile_size:
            raise ValueError(
                "Need tile_size > 2 * margin >= 0 (the grid step is tile_size - 2 * margin). "
                f"Received: tile_size={self.tile_size}, margin={self.margin}"
            )
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}. Received: {self.output_type!r}")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}. Received: {self.blend!r}")
        if self.batch_size < 1 or not self.bands:
            raise ValueError(f"Need batch_size >= 1 and at least one band. Received: {self}")
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16 (GeoTIFF tiles). Received: {self.block_size}")


def tile_origins(length: int, tile: int, margin: int) -> list[int]:
    """Tile origins along one axis: from ``-margin`` by ``tile - 2*margin``, the last one ending at ``length + margin``.

    The tile centres (``[o + margin, o + tile - margin)``) then cover
    ``[0, length)`` without gaps.
    """
    step = tile - 2 * margin
    end = length + margin
    origins, o = [], -margin
    while o + tile < end:
        origins.append(o)
        o += step
    origins.append(max(end - tile, -margin))
    return origins


def blend_weights(tile: int, margin: int, mode: str = "smooth") -> np.ndarray:
    """Separable 2-D weights (tile, tile), float32: 1 in the centre, 0 at the border.

    ``smooth``: 0 on the outer half of the margin (the pixels with the least
    context, where zero padding distorts the prediction most, discarded as in
    the reference), then a ``sin^2`` ramp up to 1 across the inner half, so two
    overlapping tiles cross-fade over ``margin / 2`` pixels. ``crop``: 0 in the
    whole margin, 1 in the centre (the reference).
    """
    i = np.arange(tile, dtype=np.float64)
    d = np.minimum(i, tile - 1 - i)  # distance to the nearest border
    if margin == 0:
        w = np.ones(tile)
    elif mode == "smooth":
        dead = margin // 2
        ramp = np.sin(0.5 * np.pi * np.clip(d - dead, 0, None) / (margin - dead)) ** 2
        w = np.where(d < margin, ramp, 1.0)
    elif mode == "crop":
        w = (d >= margin).astype(np.float64)
    else:
        raise ValueError(f"blend must be one of {BLEND_MODES}. Received: {mode!r}")
    return np.outer(w, w).astype(np.float32)


def make_probability_fn(model: Callable, from_logits: bool = True, tta: bool = False) -> Callable:
    """Wraps ``model(NHWC) -> NHWC scores`` into a compiled numpy -> numpy probability function.

    Args:
      model: any callable mapping a uint8/float NHWC batch to per-class logits
        (or probabilities with ``from_logits=False``); a contract-D Keras model
        works through :func:`flair_tf.inference.model_io.aerial_model_fn`.
      from_logits: apply a softmax to the model output.
      tta: average over the 4 flips (identity, left-right, up-down, both).
    """
    import tensorflow as tf

    def probs(x):
        y = tf.cast(model(x), tf.float32)
        return tf.nn.softmax(y, axis=-1) if from_logits else y

    @tf.function(reduce_retracing=True)
    def fn(x):
        if not tta:
            return probs(x)
        total = probs(x)
        total += tf.reverse(probs(tf.reverse(x, [2])), [2])
        total += tf.reverse(probs(tf.reverse(x, [1])), [1])
        total += tf.reverse(probs(tf.reverse(x, [1, 2])), [1, 2])
        return total / 4.0

    return lambda batch: fn(tf.convert_to_tensor(batch)).numpy()


@dataclasses.dataclass
class _Job:
    row: int  # tile-row index
    col: int  # tile index in the row
    y: int  # tile origin (raster pixels, may be negative)
    x: int
    dy: int  # rows final after this tile row
    dx: int  # columns final after this tile
    nodata: np.ndarray | None  # (dy', dx') bool mask of the final region, clipped to the raster
    skip: bool = False  # only nodata / outside: no model call


class _Reader(threading.Thread):
    """Reads tiles window by window and hands out batches ``(jobs, array, n)`` in raster order."""

    def __init__(self, src, cfg: RasterConfig, ys: list[int], xs: list[int], nodata, dtype, out: queue.Queue):
        super().__init__(daemon=True, name="flair-raster-reader")
        self.src, self.cfg, self.ys, self.xs, self.nodata, self.dtype, self.out = src, cfg, ys, xs, nodata, dtype, out
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _read(self, y: int, x: int) -> np.ndarray:
        from rasterio.windows import Window

        t, (h, w) = self.cfg.tile_size, (self.src.height, self.src.width)
        tile = np.zeros((t, t, len(self.cfg.bands)), dtype=self.dtype)
        r0, r1, c0, c1 = max(y, 0), min(y + t, h), max(x, 0), min(x + t, w)
        if r1 > r0 and c1 > c0:
            data = self.src.read(list(self.cfg.bands), window=Window(c0, r0, c1 - c0, r1 - r0))
            tile[r0 - y : r1 - y, c0 - x : c1 - x] = np.moveaxis(data, 0, -1)
        return tile

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            cfg, t = self.cfg, self.cfg.tile_size
            h, w = self.src.height, self.src.width
            jobs: list[_Job] = []
            batch = np.zeros((cfg.batch_size, t, t, len(cfg.bands)), dtype=self.dtype)
            n = 0
            for r, y in enumerate(self.ys):
                dy = self.ys[r + 1] - y if r + 1 < len(self.ys) else t
                for k, x in enumerate(self.xs):
                    if self.stop.is_set():
                        return
                    dx = self.xs[k + 1] - x if k + 1 < len(self.xs) else t
                    tile = self._read(y, x)
                    inside = np.zeros((t, t), bool)
                    inside[max(-y, 0) : max(min(h - y, t), 0), max(-x, 0) : max(min(w - x, t), 0)] = True
                    mask = None
                    if self.nodata is not None:
                        nd = np.all(tile == self.nodata, axis=-1) & inside
                        tile[nd] = 0
                        mask = nd[max(-y, 0) : min(dy, h - y), max(-x, 0) : min(dx, w - x)]
                        skip = not (inside & ~nd).any()
                    else:
                        skip = not inside.any()
                    jobs.append(_Job(r, k, y, x, dy, dx, mask, skip))
                    if not skip:
                        batch[n] = tile
                        n += 1
                    if n == cfg.batch_size:
                        self._put((jobs, batch, n))
                        jobs, n = [], 0
                        batch = np.zeros_like(batch)
            if jobs:
                self._put((jobs, batch, n))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            self.error = e
        finally:
            self._put(None)


class _Blender:
    """Accumulates weighted tile probabilities along a tile row and emits finished pixels."""

    def __init__(self, height: int, width: int, num_classes: int, cfg: RasterConfig, weights: np.ndarray,
                 carry_rows: int, emit: Callable[..., None]):
        t = cfg.tile_size
        self.h, self.w, self.c, self.t = height, width, num_classes, t
        self.weights = weights
        # Only the part of the tile with non-zero weight is accumulated.
        nonzero = np.flatnonzero(weights.max(axis=0) > 0)
        self.lo, self.hi = int(nonzero[0]), int(nonzero[-1]) + 1
        self.emit = emit  # emit(row0, col0, weighted sums (h, w, C), weight sums (h, w), nodata mask (h, w))
        self.win = np.zeros((t, t, num_classes), np.float32)
        self.wwin = np.zeros((t, t), np.float32)
        self.carry = np.zeros((carry_rows, width, num_classes), np.float32)
        self.carry_w = np.zeros((carry_rows, width), np.float32)
        self.carry_in = 0  # rows of `carry` holding contributions to the current tile row

    def _load_columns(self, x: int, lo: int, hi: int) -> None:
        """Resets window columns [lo, hi) (raster columns x+lo..x+hi) and adds the carry."""
        self.win[:, lo:hi] = 0
        self.wwin[:, lo:hi] = 0
        c0, c1 = max(x + lo, 0), min(x + hi, self.w)
        if self.carry_in and c1 > c0:
            self.win[: self.carry_in, c0 - x : c1 - x] = self.carry[: self.carry_in, c0:c1]
            self.wwin[: self.carry_in, c0 - x : c1 - x] = self.carry_w[: self.carry_in, c0:c1]

    def add(self, job: _Job, probs: np.ndarray | None, last_in_row: bool) -> None:
        """Adds one tile's probabilities (t, t, C; scaled in place) in raster order."""
        t, lo, hi = self.t, self.lo, self.hi
        if job.col == 0:
            self._load_columns(job.x, 0, t)
        if probs is not None:
            part = probs[lo:hi, lo:hi]
            np.multiply(part, self.weights[lo:hi, lo:hi, None], out=part)
            self.win[lo:hi, lo:hi] += part
            self.wwin[lo:hi, lo:hi] += self.weights[lo:hi, lo:hi]
        dy, dx, y, x = job.dy, job.dx, job.y, job.x
        # Columns [x, x + dx) receive nothing more from this tile row.
        c0, c1 = max(x, 0), min(x + dx, self.w)
        if c1 > c0:
            r0, r1 = max(y, 0), min(y + dy, self.h)
            if r1 > r0:
                acc = self.win[r0 - y : r1 - y, c0 - x : c1 - x]
                wsum = self.wwin[r0 - y : r1 - y, c0 - x : c1 - x]
                nodata = wsum <= 0
                if job.nodata is not None:
                    nodata |= job.nodata
                self.emit(r0, c0, acc, wsum, nodata)
            rows = t - dy  # shared with the next tile row
            if rows > 0:
                self.carry[:rows, c0:c1] = self.win[dy:, c0 - x : c1 - x]
                self.carry_w[:rows, c0:c1] = self.wwin[dy:, c0 - x : c1 - x]
        if last_in_row:
            self.carry_in = t - dy
        else:
            # numpy buffers overlapping assignments itself.
            self.win[:, : t - dx] = self.win[:, dx:]
            self.wwin[:, : t - dx] = self.wwin[:, dx:]
            self._load_columns(x + dx, t - dx, t)


class _Consumer(threading.Thread):
    """Feeds model outputs to the blender in raster order and flushes finished block rows."""

    def __init__(self, blender: _Blender, writer: "_BlockWriter", num_cols: int, height: int, inbox: queue.Queue):
        super().__init__(daemon=True, name="flair-raster-blender")
        self.blender, self.writer, self.num_cols, self.height, self.inbox = blender, writer, num_cols, height, inbox
        self.error: BaseException | None = None

    def run(self) -> None:
        for jobs, probs in iter(self.inbox.get, None):
            if self.error is not None:
                continue  # keep draining so that the model loop never blocks
            try:
                i = 0
                for job in jobs:
                    p = None
                    if not job.skip:
                        p, i = probs[i], i + 1
                    last = job.col == self.num_cols - 1
                    self.blender.add(job, p, last_in_row=last)
                    if last:
                        self.writer.flush(min(job.y + job.dy, self.height))
            except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
                self.error = e


class _BlockWriter:
    """Collects finished pixels and writes whole block rows, so each GeoTIFF block is compressed once."""

    def __init__(self, dst, cfg: RasterConfig, num_bands: int, mask: bool):
        self.dst, self.cfg, self.bands, self.use_mask = dst, cfg, num_bands, mask
        self.h, self.w = dst.height, dst.width
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _buffer(self, b: int):
        if b not in self.buffers:
            rows = min(self.cfg.block_size, self.h - b * self.cfg.block_size)
            self.buffers[b] = (np.zeros((self.bands, rows, self.w), np.uint8), np.zeros((rows, self.w), bool))
        return self.buffers[b]

    def put(self, row0: int, col0: int, acc: np.ndarray, wsum: np.ndarray, nodata: np.ndarray) -> None:
        """Stores finished pixels: weighted sums ``acc`` (h, w, C) and their weight sums ``wsum`` (h, w)."""
        if self.cfg.output_type == "argmax":
            values = np.argmax(acc, axis=-1).astype(np.uint8)[None]  # normalising would not change it
            values[0][nodata] = self.cfg.output_nodata
        else:
            probs = acc / np.maximum(wsum, 1e-12)[:, :, None]
            values = np.moveaxis(np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8), -1, 0)
            values[:, nodata] = 0
        bs, h, w = self.cfg.block_size, acc.shape[0], acc.shape[1]
        r = row0
        while r < row0 + h:
            b = r // bs
            end = min((b + 1) * bs, row0 + h)
            data, mask = self._buffer(b)
            data[:, r - b * bs : end - b * bs, col0 : col0 + w] = values[:, r - row0 : end - row0]
            mask[r - b * bs : end - b * bs, col0 : col0 + w] = nodata[r - row0 : end - row0]
            r = end

    def flush(self, done_rows: int) -> None:
        """Writes the block rows that lie entirely above ``done_rows``."""
        from rasterio.windows import Window

        bs = self.cfg.block_size
        for b in sorted(self.buffers):
            data, mask = self.buffers[b]
            if b * bs + data.shape[1] > done_rows:
                continue
            window = Window(0, b * bs, self.w, data.shape[1])
            self.dst.write(data, window=window)
            if self.use_mask:
                self.dst.write_mask(np.where(mask, 0, 255).astype(np.uint8), window=window)
            del self.buffers[b]


def _output_profile(src, cfg: RasterConfig, num_classes: int) -> dict:
    count = 1 if cfg.output_type == "argmax" else num_classes
    profile = {
        "driver": "GTiff",
        "width": src.width,
        "height": src.height,
        "count": count,
        "dtype": "uint8",
        "crs": src.crs,
        "transform": src.transform,
        "tiled": True,
        "blockxsize": cfg.block_size,
        "blockysize": cfg.block_size,
        "compress": "lzw",
        "BIGTIFF": cfg.bigtiff,
    }
    if cfg.output_type == "argmax":
        profile["nodata"] = cfg.output_nodata
    return profile


def predict_raster(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    input_path: str,
    output_path: str,
    num_classes: int,
    config: RasterConfig | None = None,
    progress: bool = True,
) -> dict:
    """Predicts a whole georeferenced raster tile by tile and writes a tiled, LZW-compressed GeoTIFF.

    Args:
      predict_fn: uint8/float NHWC batch (``batch_size`` tiles) -> probabilities
        NHWC float (see :func:`make_probability_fn`).
      input_path: any raster GDAL reads (local path or ``gs://``).
      output_path: GeoTIFF to write (local or ``gs://``; remote outputs are
        written to a temporary file first, then copied).
      num_classes: classes of the model output.
      config: tiling/blending/output options.
      progress: show a progress bar over the tiles.

    Returns:
      A summary: output path, size, tiles predicted and skipped, seconds,
      megapixels per second.
    """
    import rasterio

    cfg = config or RasterConfig()
    cfg.validate()
    if cfg.output_type == "argmax" and cfg.output_nodata < num_classes:
        raise ValueError(
            f"output_nodata={cfg.output_nodata} is a class index of a {num_classes}-class model; "
            f"choose a value >= {num_classes}"
        )
    remote = "://" in output_path
    local_out = output_path
    if remote:
        local_out = os.path.join(tempfile.mkdtemp(prefix="flair_tf_raster_"), os.path.basename(output_path))
    start = time.monotonic()
    with rasterio.Env(GDAL_CACHEMAX=cfg.gdal_cache_mb), rasterio.open(input_path) as src:
        bad = [b for b in cfg.bands if not 1 <= b <= src.count]
        if bad:
            raise ValueError(
                f"{input_path} has {src.count} band(s); bands {bad} do not exist. Choose 1-based bands with --bands"
            )
        if src.crs is None:
            logging.warning("%s has no CRS: the output will not be georeferenced either", input_path)
        dtypes = {src.dtypes[b - 1] for b in cfg.bands}
        dtype = np.uint8 if dtypes == {"uint8"} else np.float32
        nodata = cfg.nodata if cfg.nodata is not None else src.nodata
        if nodata is not None and math.isnan(nodata):
            raise ValueError(f"{input_path}: a NaN nodata value is not supported; pass --nodata with a number")
        t = cfg.tile_size
        ys, xs = tile_origins(src.height, t, cfg.margin), tile_origins(src.width, t, cfg.margin)
        dys = [b - a for a, b in zip(ys, ys[1:])] or [t]
        weights = blend_weights(t, cfg.margin, cfg.blend)
        total = len(ys) * len(xs)
        logging.info("%s: %dx%d px, %d bands -> %d tiles of %d px (margin %d, step %d)%s", input_path,
                     src.width, src.height, len(cfg.bands), total, t, cfg.margin, t - 2 * cfg.margin,
                     ", TTA x4" if cfg.tta else "")
        if os.path.dirname(local_out):
            os.makedirs(os.path.dirname(local_out), exist_ok=True)
        with rasterio.open(local_out, "w", **_output_profile(src, cfg, num_classes)) as dst:
            if cfg.output_type == "argmax" and num_classes in (13, 19):
                from flair_tf import nomenclature

                dst.write_colormap(1, nomenclature.gdal_colormap(num_classes))
            writer = _BlockWriter(dst, cfg, dst.count, mask=cfg.output_type == "probabilities" and nodata is not None)
            blender = _Blender(src.height, src.width, num_classes, cfg, weights,
                               carry_rows=max(t - min(dys), 1), emit=writer.put)
            batches: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch))
            reader = _Reader(src, cfg, ys, xs, nodata, dtype, batches)
            # Blending and writing run beside the model (they overlap with it on a GPU/TPU).
            results: queue.Queue = queue.Queue(maxsize=2)
            consumer = _Consumer(blender, writer, len(xs), src.height, results)
            reader.start()
            consumer.start()
            predicted = skipped = 0
            model_seconds = 0.0
            try:
                with Progress(total, desc="raster", unit="tile", enabled=progress) as bar:
                    for jobs, batch, n in iter(batches.get, None):
                        if consumer.error is not None:
                            break
                        probs = None
                        if n:
                            tick = time.monotonic()
                            probs = np.asarray(predict_fn(batch), dtype=np.float32)[:n]
                            model_seconds += time.monotonic() - tick
                            if not probs.flags.writeable:  # the blender scales tiles in place
                                probs = probs.copy()
                            if probs.shape[-1] != num_classes or probs.shape[1:3] != (t, t):
                                raise ValueError(
                                    f"The model returned shape {probs.shape} for tiles of {t}x{t}; expected "
                                    f"[B, {t}, {t}, {num_classes}]"
                                )
                        results.put((jobs, probs))
                        predicted += n
                        skipped += len(jobs) - n
                        bar.update(len(jobs))
            finally:
                results.put(None)
                consumer.join()
                reader.stop.set()
                reader.join()
            for worker in (reader, consumer):
                if worker.error is not None:
                    raise worker.error
            writer.flush(src.height)
    if remote:
        import tensorflow as tf

        tf.io.gfile.copy(local_out, output_path, overwrite=True)
        os.remove(local_out)
    seconds = time.monotonic() - start
    summary = {
        "output": output_path,
        "width": src.width,
        "height": src.height,
        "tiles": total,
        "tiles_predicted": predicted,
        "tiles_skipped": skipped,
        "seconds": round(seconds, 3),
        "model_seconds": round(model_seconds, 3),  # inside predict_fn: the rest is the engine's overhead
        "megapixels_per_second": src.width * src.height / 1e6 / seconds if seconds > 0 else float("nan"),
    }
    logging.info("Wrote %s (%d tiles, %d skipped, %.1f s)", output_path, total, skipped, seconds)
    return summary

