"""Input-pipeline throughput: tf.data pipeline vs raw TFRecord read vs a per-file loader.

Writes synthetic FLAIR #1 and #2 trees at the real size (512 px; Sentinel-2
series of 20-40 dates), converts their train split to TFRecords, then measures
on the same data, from the page cache:

* ``pipeline_eps``: examples/s of the full training pipeline
  (`flair_tf.data.pipeline.make_dataset`, augmentation on, FLAIR #2 cloud
  filter + monthly means), batches consumed in Python, configured as
  ``flair_tf.train`` runs it on a GPU or TPU (``--aerial_on``, default device:
  the pipeline batches the records' aerial bytes with the drawn moves and the
  training step finishes them, `pipeline.finish_batch`);
* ``pipeline_host_eps`` (with ``--compare_host``): the pipeline finishing its
  batches itself (``aerial_on="host"``, as on a machine without accelerator),
  measured in the same rounds, and ``step_finishing_*``: the rate and CPU cost
  of `pipeline.finish_batch` on such batches in a step run by this CPU;
* ``raw_read_eps``: records/s of a bare ``TFRecordDataset`` over the same
  shards (the bound of any TFRecord pipeline);
* ``per_file_eps`` / ``per_file_parallel_eps``: examples/s of a loader that
  opens every IMG/MSK GeoTIFF with rasterio (and, FLAIR #2, ``np.load`` s the
  whole Sentinel super-area, crops it and parses the product names) and then
  applies the same preprocessing in numpy, the way the PyTorch reference's
  `Fit_Dataset` does; in one process, then in a process pool of
  ``--loader_workers`` (a DataLoader with workers), each worker loading for
  ``--seconds`` by itself. The pool's loaded arrays stay in its workers (a
  DataLoader would also send them to the training process), so its rate is
  an upper bound of such a loader's.

Raw read and pipeline alternate in ``--rounds`` rounds (3) of ``--seconds``
each, measured in steady state (after the first element and
``--warmup_seconds``); ``pipeline_over_raw`` is the median of the rounds'
ratios (``pipeline_over_raw_each``), the rates reported are the best rounds'.

Each method also reports ``*_cpu_ms_per_example``, the CPU time (all threads
and worker processes) it spent per example: on a shared machine the wall-clock
rates are the share of the CPU each method got, while the CPU cost is much less
sensitive to the load. Prints one JSON line, with the CPU count and the load
average before and after.

Example:
  python tools/benchmark_input.py --seconds=10
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import psutil
from absl import app, flags, logging

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where the synthetic data goes (default: a temp dir).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep --work_dir's data (reused by the next run).")
_TASKS = flags.DEFINE_list("tasks", ["flair1", "flair2"], "Datasets to measure.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 512, "Aerial patch side in pixels.")
_DOMAINS = flags.DEFINE_integer("num_domains", 4, "Synthetic train+val domains.")
_ZONES = flags.DEFINE_integer("zones_per_domain", 2, "Zones per domain.")
_PATCHES = flags.DEFINE_integer("patches_per_zone", 8, "Patches per zone.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size of the pipeline.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Measuring time of each method (per round).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of raw read then pipeline; the median ratio is reported.")
_WARMUP = flags.DEFINE_float(
    "warmup_seconds", 3.0, "Unmeasured seconds of each method after its first element (the pipeline "
    "reaches its steady rate within a second of it).")
_WORKERS = flags.DEFINE_integer("loader_workers", os.cpu_count() or 1,
                                "Processes of the parallel per-file loader.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", True, "PipelineConfig.deterministic.")
_AERIAL_ON = flags.DEFINE_enum(
    "aerial_on", "device", ["device", "host"],
    "PipelineConfig.aerial_on of the measured pipeline (flair_tf.train's on a GPU or TPU: device).")
_COMPARE_HOST = flags.DEFINE_bool(
    "compare_host", True, "With --aerial_on=device, also measure the host-finishing pipeline in "
    "each round, and what finishing the batches costs a training step on this CPU.")

_REF = datetime.date(2021, 5, 15)


# ------------------------------------------------------------------------------ data


def prepare(task: str, root: str) -> tuple[str, str]:
    """(tree root, records dir), made unless already there."""
    from flair_tf.data import convert, synthetic  # pylint: disable=g-import-not-at-top

    tree, records = os.path.join(root, task, "tree"), os.path.join(root, task, "records")
    if not os.path.exists(os.path.join(records, "dataset_info.json")):
        synthetic.make_tree(tree, task=task, num_domains=_DOMAINS.value,
                            zones_per_domain=_ZONES.value, patches_per_zone=_PATCHES.value,
                            patch_size=_PATCH_SIZE.value, seed=0, max_sentinel_crop=40,
                            overwrite=True)
        convert.convert(convert.ConvertOptions(
            task=task, data_root=tree, output_dir=records, splits=("train",),
            patch_size=_PATCH_SIZE.value, sentinel_size=40, num_workers=os.cpu_count() or 1,
            command_line="tools/benchmark_input.py"))
    return tree, records


def warm_page_cache(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# ------------------------------------------------------------------------------ per-file loader
# The reference's Fit_Dataset.__getitem__ re-stated with rasterio + numpy (spec flair2 §2).

_LUT = None


def _lut():
    global _LUT
    if _LUT is None:
        from flair_tf import nomenclature  # pylint: disable=g-import-not-at-top
        _LUT = nomenclature.code_to_index_lut(13)
    return _LUT


def _augment(img, msk, rng):
    if rng.random() < 0.5:
        img, msk = img[::-1], msk[::-1]
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if rng.random() < 0.5:
        k = int(rng.integers(0, 4))
        img, msk = np.rot90(img, k), np.rot90(msk, k)
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


def _sentinel(item):
    data_file, masks_file, products_file, (r, c) = item
    h = 20
    data = np.load(data_file)[:, :, r - h:r + h, c - h:c + h]  # the reference loads it whole
    masks = np.load(masks_file)[:, :, r - h:r + h, c - h:c + h].astype(int)
    with open(products_file) as f:
        products = f.read().splitlines()
    # year dropped as in the reference; 29 February (a crash there) read as 1 March
    dates = [datetime.date(2021, 3, 1) if p[15:19] == "0229" else
             datetime.date(2021, int(p[15:17]), int(p[17:19])) for p in products]
    keep = [t for t in range(masks.shape[0])
            if (np.count_nonzero(masks[t, 0] >= 60) + np.count_nonzero(masks[t, 1] >= 60))
            / (masks.shape[2] * masks.shape[3]) < 0.5]
    data, dates = data[keep], [dates[t] for t in keep]
    frames, offsets = [], []
    for m in range(dates[0].month, dates[-1].month + 1):
        idx = [i for i, d in enumerate(dates) if d.month == m]
        if idx:
            frames.append(np.mean(data[idx], axis=0))
            offsets.append((_REF - datetime.date(2021, m, 15)).days)
    return np.asarray(frames, np.float32), np.asarray(offsets, np.float32)


def load_one(item, seed=0):
    """One training example the reference way: read, remap, augment, scale."""
    import rasterio  # pylint: disable=g-import-not-at-top

    image, mask, sentinel = item
    rng = np.random.default_rng(seed)
    with rasterio.open(image) as src:
        img = src.read()
    with rasterio.open(mask) as src:
        msk = src.read()[0]
    msk = _lut()[msk]
    img, msk = _augment(img.transpose(1, 2, 0), msk, rng)
    img = (img.astype(np.float64) / 255.0).astype(np.float32).transpose(2, 0, 1)
    out = {"patch": img, "labels": msk.astype(np.float32)}
    if sentinel is not None:
        out["spatch"], out["dates"] = _sentinel(sentinel)
    return out


def per_file_items(task: str, tree: str):
    from flair_tf.data import layout, readers  # pylint: disable=g-import-not-at-top

    ft = layout.discover(tree, task, splits=("train",))
    centroids = readers.read_centroids_json(ft.centroids_json) if task == "flair2" else {}
    items = []
    for p in ft.splits["train"]:
        sen = None
        if task == "flair2":
            sen = (p.sentinel.data, p.sentinel.masks, p.sentinel.products, centroids[p.name])
        items.append((p.image, p.mask, sen))
    return items


def _load_for(args):
    """A pool worker's share: loads examples (from `first`, one stride apart) until `deadline`."""
    items, first, stride, deadline = args
    n = 0
    while time.time() < deadline:
        i = first + n * stride
        load_one(items[i % len(items)], seed=i)
        n += 1
    return n


class Meter:
    """Examples/s (wall clock) and CPU ms per example (this process and its children).

    On a shared machine the wall-clock rate is the share of the CPU a method
    got; the CPU time per example is its cost, much less sensitive to the load.
    """

    def __init__(self):
        self.proc = psutil.Process()
        self.n = 0
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    def _cpu(self) -> float:
        total = sum(self.proc.cpu_times()[:2])
        for child in self.proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def result(self) -> dict[str, float]:
        wall, cpu = self.elapsed(), self._cpu() - self.cpu
        return {"eps": self.n / wall, "cpu_ms": 1e3 * cpu / max(self.n, 1)}


def rate_per_file(items, seconds: float, workers: int) -> dict[str, float]:
    if workers <= 1:
        meter = Meter()
        while meter.elapsed() < seconds:
            load_one(items[meter.n % len(items)], seed=meter.n)
            meter.n += 1
        return meter.result()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        # Start-up (imports, a second of loading) excluded. Each worker then loads for
        # `seconds` by itself and reports its count: no endless task stream to stop (a pool
        # terminated while its feeder thread still pushed tasks once hung this benchmark).
        warm = time.time() + 1.0
        pool.map(_load_for, [(items, i, workers, warm) for i in range(workers)])
        meter = Meter()
        deadline = time.time() + seconds
        meter.n = sum(pool.map(_load_for, [(items, i, workers, deadline) for i in range(workers)]))
        result = meter.result()
    return result


# ------------------------------------------------------------------------------ tf.data


def rate_pipeline(task: str, records: str, seconds: float, aerial_on: str) -> dict[str, float]:
    from flair_tf.data import pipeline, schema  # pylint: disable=g-import-not-at-top

    cfg = pipeline.PipelineConfig(task=task, augment=True, deterministic=_DETERMINISTIC.value,
                                  aerial_on=aerial_on)
    ds = pipeline.make_dataset(schema.shard_pattern(records, task, "train"), "train", cfg,
                               batch_size=_BATCH.value)
    it = iter(ds)
    _warm_up(lambda: next(it))
    meter = Meter()
    while meter.elapsed() < seconds:
        next(it)
        meter.n += _BATCH.value
    return meter.result()


def rate_step_finishing(task: str, records: str, seconds: float) -> dict[str, float]:
    """``pipeline.finish_batch`` on batches already made, in a tf.function on this CPU.

    What ``aerial_on="device"`` adds to a training step when the device is this CPU
    (an accelerator does the same memory traffic in microseconds); examples/s of it alone.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from flair_tf.data import pipeline, schema  # pylint: disable=g-import-not-at-top

    cfg = pipeline.PipelineConfig(task=task, augment=True, aerial_on="device")
    ds = pipeline.make_dataset(schema.shard_pattern(records, task, "train"), "train", cfg,
                               batch_size=_BATCH.value)
    batches = list(ds.take(8))
    step = tf.function(lambda f, l: pipeline.finish_batch(f, l, cfg))
    n = [0]

    def run():
        features, labels = step(*batches[n[0] % len(batches)])
        features["aerial"].numpy()  # wait for the result
        n[0] += 1

    _warm_up(run)
    meter = Meter()
    while meter.elapsed() < seconds:
        run()
        meter.n += _BATCH.value
    return meter.result()


def rate_raw(files, seconds: float) -> dict[str, float]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from flair_tf.data import pipeline  # pylint: disable=g-import-not-at-top

    # The pipeline's own reader settings, without any processing.
    ds = tf.data.TFRecordDataset(files, buffer_size=pipeline.read_buffer_size(files[0]),
                                 num_parallel_reads=tf.data.AUTOTUNE).repeat().batch(64)
    it = iter(ds)
    _warm_up(lambda: next(it))
    meter = Meter()
    while meter.elapsed() < seconds:
        meter.n += int(next(it).shape[0])
    return meter.result()


def _warm_up(step) -> None:
    """Unmeasured start: the first element, then `--warmup_seconds` more.

    The first element pays for tracing and the shuffle-buffer fill; XLA then
    compiles the aerial program for each of the 8 moves the augmentation draws
    (about 0.2 s each at 512 px), during which the pipeline runs slowly (FLAIR
    #2 in 0.25 s windows: 63, then 409, 351, 345 examples/s). A 10 s round
    started one second after building the pipeline counted that start-up.
    Training runs for hours at the steady rate, which is the one measured.
    """
    step()
    seconds = _WARMUP.value
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()


def _best(results) -> dict[str, float]:
    """The highest rate and the least CPU per example of several measurements."""
    results = list(results)
    return {"eps": max(m["eps"] for m in results), "cpu_ms": min(m["cpu_ms"] for m in results)}


def main(argv):
    del argv
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    root = _WORK_DIR.value or tempfile.mkdtemp(prefix="flair_bench_")
    result = {"benchmark": "input", "patch_size": _PATCH_SIZE.value, "batch_size": _BATCH.value,
              "seconds_per_method": _SECONDS.value, "warmup_seconds": _WARMUP.value, "cpus": os.cpu_count(),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()],
              "deterministic": _DETERMINISTIC.value}
    try:
        for task in _TASKS.value:
            tree, records = prepare(task, root)
            files = sorted(tf.io.gfile.glob(os.path.join(records, f"{task}-train.tfrecord-*")))
            items = per_file_items(task, tree)
            warm_page_cache(files)
            warm_page_cache([x for it in items for x in (it[0], it[1]) + (it[2][:3] if it[2] else ())])
            logging.info("%s: %d examples, %d shards", task, len(items), len(files))
            r = {"examples": len(items), "shards": len(files), "loader_workers": _WORKERS.value,
                 "rounds": _ROUNDS.value}
            # Raw read and pipeline alternate in rounds of --seconds each (each built anew, one
            # alive at a time): the ratio of a round compares two measurements seconds apart on
            # a machine whose speed drifts with the other tenants' load; the median over the
            # rounds is reported, and the best rates.
            host = _COMPARE_HOST.value and _AERIAL_ON.value == "device"
            rounds = []
            for _ in range(_ROUNDS.value):
                rounds.append((rate_raw(files, _SECONDS.value),
                               rate_pipeline(task, records, _SECONDS.value, _AERIAL_ON.value),
                               rate_pipeline(task, records, _SECONDS.value, "host") if host else None))
            each = [p["eps"] / w["eps"] for w, p, _ in rounds]
            r["aerial_on"] = _AERIAL_ON.value
            methods = [("raw_read", _best(w for w, _, _ in rounds)),
                       ("pipeline", _best(p for _, p, _ in rounds))]
            if host:
                each_host = [h["eps"] / w["eps"] for w, _, h in rounds]
                methods += [("pipeline_host", _best(h for _, _, h in rounds)),
                            ("step_finishing", rate_step_finishing(task, records, _SECONDS.value))]
            for name, m in (*methods,
                            ("per_file", rate_per_file(items, _SECONDS.value, 1)),
                            ("per_file_parallel",
                             rate_per_file(items, _SECONDS.value, _WORKERS.value))):
                r[f"{name}_eps"], r[f"{name}_cpu_ms_per_example"] = m["eps"], m["cpu_ms"]
            r["pipeline_over_raw"] = statistics.median(each)
            r["pipeline_over_raw_each"] = [round(v, 3) for v in each]
            r["pipeline_over_raw_best_to_best"] = r["pipeline_eps"] / r["raw_read_eps"]
            if host:
                r["pipeline_host_over_raw"] = statistics.median(each_host)
                r["pipeline_host_over_raw_each"] = [round(v, 3) for v in each_host]
            r["pipeline_over_per_file"] = r["pipeline_eps"] / r["per_file_eps"]
            r["pipeline_over_per_file_parallel"] = r["pipeline_eps"] / r["per_file_parallel_eps"]
            r["cpu_cost_per_file_over_pipeline"] = (r["per_file_cpu_ms_per_example"]
                                                    / r["pipeline_cpu_ms_per_example"])
            r["targets_met"] = {"pipeline >= 0.5 raw": r["pipeline_over_raw"] >= 0.5,
                                "pipeline >= 3x per-file": r["pipeline_over_per_file"] >= 3.0}
            result[task] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    finally:
        if not _KEEP.value and not _WORK_DIR.value:
            shutil.rmtree(root, ignore_errors=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
