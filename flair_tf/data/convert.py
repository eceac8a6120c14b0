"""The conversion job: a FLAIR tree -> sharded TFRecords + ``dataset_info.json``.

For each split: pair the files (`layout.discover`), attach each patch's metadata
record and Sentinel centroid, order the patches, cut them into shards, and let
`writer.write_shards` encode them in parallel with a `PatchEncoder`, which
lays out one patch's record at a time (`schema.serialize`), has GDAL decode
the rasters straight into it and copies the Sentinel-2 super-patch crop
(FLAIR #2) into it, taking the georeferencing from `geotiff`, and accumulates
exact statistics. The statistics of all shards are merged into ``dataset_info.json``.

Record order: patches are ordered by a seeded hash (of the patch for FLAIR #1,
of the zone for FLAIR #2, so that one worker crops all the patches of a zone
from the super-area it has open), then cut into contiguous shards; inside a
shard they are sorted by domain, zone and id. Each shard thus holds a random
sample of domains, while reading stays local. The order depends only on the
patch names and ``shard_seed``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import posixpath
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

import flair_tf
from flair_tf.data import geotiff, layout, readers, schema, writer
from flair_tf.data import metadata as metadata_lib
from flair_tf.data.readers import FlairDataError

NUM_AERIAL_STATS_BANDS = 5  # R, G, B, NIR, elevation
_DEFAULT_T = 50  # Sentinel dates assumed for the size estimate when products.txt is unreadable
# Version of the per-shard statistics kept in the sidecars; part of every shard's
# fingerprint, so shards written by code with other statistics are redone.
STATS_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion (the flags of ``tools/convert_to_tfrecords.py``).

    Attributes:
      task: "flair1" or "flair2".
      data_root: the FLAIR tree (released or toy layout).
      output_dir: where shards and ``dataset_info.json`` go (local or gs://).
      splits: splits to convert, among train, val, test.
      val_domains: domains forming "val" (None: the 8 official ones).
      csv_lists: split -> IGN CSV list replacing the folder scan.
      patch_size: expected aerial patch side.
      sentinel_size: side S of the Sentinel-2 crop (FLAIR #2).
      num_workers: writer processes.
      num_shards: shards per split (None: from `target_shard_mb`).
      target_shard_mb: wanted shard size (uncompressed), MB.
      min_shards: at least this many shards per split (never more than examples).
      compression: None or "GZIP".
      on_error: "fail" or "skip".
      shard_seed: seed of the record order.
      show_progress: progress bar on stderr.
      command_line: recorded in ``dataset_info.json``.
    """

    task: str
    data_root: str
    output_dir: str
    splits: tuple[str, ...] = ("train", "val", "test")
    val_domains: tuple[str, ...] | None = None
    csv_lists: dict[str, str] | None = None
    patch_size: int = 512
    sentinel_size: int = 40
    num_workers: int = 1
    num_shards: int | None = None
    target_shard_mb: float = 150.0
    min_shards: int = 16
    compression: str | None = None
    on_error: str = "fail"
    shard_seed: int = 0
    show_progress: bool = True
    command_line: str = ""

    def spec(self) -> schema.RecordSpec:
        return schema.RecordSpec(
            self.task, self.patch_size, self.sentinel_size if self.task == "flair2" else None,
            byte_layout="aligned64",  # what `schema.serialize` writes
        )


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One patch to convert, with what the main process looked up for it."""

    patch: layout.PatchFiles
    metadata: dict | None  # its metadata JSON record (None: absent)
    centroid: tuple[int, int] | None  # FLAIR #2 centroid (None: absent)
    labelled: bool  # the split has labels, so a missing mask is an error
    metadata_json: str = ""
    centroids_json: str = ""


# ------------------------------------------------------------------------- statistics


class Statistics:
    """Exact streaming statistics (integer sums), mergeable across shards and workers.

    Per band, the sum and sum of squares of the values are accumulated as
    integers (numpy uint64 within one patch, Python ints across patches), so
    the dataset mean and std are exact whatever the dataset size or the
    number of workers.
    """

    def __init__(self):
        self.num_examples = 0
        self.domains: collections.Counter = collections.Counter()
        self.classes = np.zeros(256, np.int64)  # raw code histogram
        self.aerial_sum = [0] * NUM_AERIAL_STATS_BANDS  # R, G, B, NIR, elevation
        self.aerial_sumsq = [0] * NUM_AERIAL_STATS_BANDS
        self.aerial_pixels = 0
        self.sen_sum = [0] * len(schema.SENTINEL_BANDS)
        self.sen_sumsq = [0] * len(schema.SENTINEL_BANDS)
        self.sen_pixels = 0
        self.lengths: collections.Counter = collections.Counter()

    @staticmethod
    def _band_sums(x: np.ndarray, square_dtype, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per-band sum and sum of squares, exact (uint64), without strided per-band copies.

        Channels-last input is viewed as rows of (W*C) values that are added
        element-wise first; the W groups of C bands are folded at the end.
        """
        if channels_last:
            c = x.shape[-1]
            rows = x.reshape(-1, x.shape[-2] * c)
            axis, fold = 0, lambda v: v.reshape(-1, c).sum(axis=0)  # noqa: E731
        else:
            rows, axis, fold = x.reshape(x.shape[0], -1), 1, lambda v: v  # noqa: E731
        # Sums accumulate in uint32 while they cannot overflow (about 2x faster than uint64).
        narrow = rows.shape[axis] <= (1 << 32) // (np.iinfo(x.dtype).max + 1)
        sums = fold(rows.sum(axis=axis, dtype=np.uint32 if narrow else np.uint64).astype(np.uint64))
        sq = np.square(rows, dtype=square_dtype)  # uint8**2 fits uint16, uint16**2 fits uint32
        return sums, fold(sq.sum(axis=axis, dtype=np.uint64))

    @staticmethod
    def _uint8_channels_last_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_band_sums` of uint8 (H, W, C) channels-last, about twice faster, still exact.

        Rows of W*C values are added element-wise in uint32 (squares as uint16),
        exact below 66,052 rows; the W groups of C bands are folded in uint64.
        """
        if x.shape[0] > (1 << 32) // (255 * 255):
            return Statistics._band_sums(x, np.uint16, channels_last=True)
        c = x.shape[-1]
        rows = x.reshape(x.shape[0], -1)
        sums = rows.sum(axis=0, dtype=np.uint32).reshape(-1, c).sum(axis=0, dtype=np.uint64)
        squares = np.square(rows, dtype=np.uint16).sum(axis=0, dtype=np.uint32)
        return sums, squares.reshape(-1, c).sum(axis=0, dtype=np.uint64)

    @staticmethod
    def code_histogram(label: np.ndarray) -> np.ndarray:
        """``np.bincount(label, minlength=256)`` of uint8 codes, counting byte pairs (1.7x faster)."""
        flat = label.reshape(-1)
        if flat.size % 2 or flat.dtype != np.uint8:
            return np.bincount(flat, minlength=256)
        pairs = np.bincount(flat.view(np.uint16), minlength=1 << 16).reshape(256, 256)
        return pairs.sum(axis=0) + pairs.sum(axis=1)  # low bytes + high bytes, either byte order

    def add(self, aerial: np.ndarray, elevation: np.ndarray, classes: np.ndarray | None, domain: str,
            sentinel: np.ndarray | None) -> None:
        """Counts one patch.

        Args:
          aerial: uint8 (P, P, 4) channels-last R, G, B, NIR.
          elevation: uint8 (P, P, 1).
          classes: the label's `code_histogram` (256 counts), or None.
          domain: the patch's domain.
          sentinel: uint16 (T, S, S, 10) channels-last crop, or None.
        """
        self.num_examples += 1
        self.domains[domain] += 1
        sums, sumsq = self._uint8_channels_last_sums(aerial)
        elevation_sums, elevation_sumsq = self._uint8_channels_last_sums(elevation)
        self.aerial_sum = [a + int(b) for a, b in zip(self.aerial_sum, [*sums, *elevation_sums])]
        self.aerial_sumsq = [a + int(b) for a, b in zip(self.aerial_sumsq, [*sumsq, *elevation_sumsq])]
        self.aerial_pixels += aerial.shape[0] * aerial.shape[1]
        if classes is not None:
            self.classes += classes
        if sentinel is not None:
            sums, sumsq = self._band_sums(sentinel, np.uint32, channels_last=True)
            self.sen_sum = [a + int(b) for a, b in zip(self.sen_sum, sums)]
            self.sen_sumsq = [a + int(b) for a, b in zip(self.sen_sumsq, sumsq)]
            self.sen_pixels += sentinel.size // sentinel.shape[-1]
            self.lengths[int(sentinel.shape[0])] += 1

    def to_json(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "domains": dict(self.domains),
            "classes": {str(c): int(n) for c, n in enumerate(self.classes) if n},
            "aerial_sum": self.aerial_sum,
            "aerial_sumsq": self.aerial_sumsq,
            "aerial_pixels": self.aerial_pixels,
            "sentinel_sum": self.sen_sum,
            "sentinel_sumsq": self.sen_sumsq,
            "sentinel_pixels": self.sen_pixels,
            "sentinel_lengths": {str(k): v for k, v in self.lengths.items()},
        }

    def merge_json(self, d: dict) -> None:
        self.num_examples += d["num_examples"]
        self.domains.update(d["domains"])
        for c, n in d["classes"].items():
            self.classes[int(c)] += n
        self.aerial_sum = [a + int(b) for a, b in zip(self.aerial_sum, d["aerial_sum"])]
        self.aerial_sumsq = [a + int(b) for a, b in zip(self.aerial_sumsq, d["aerial_sumsq"])]
        self.aerial_pixels += d["aerial_pixels"]
        self.sen_sum = [a + int(b) for a, b in zip(self.sen_sum, d["sentinel_sum"])]
        self.sen_sumsq = [a + int(b) for a, b in zip(self.sen_sumsq, d["sentinel_sumsq"])]
        self.sen_pixels += d["sentinel_pixels"]
        self.lengths.update({int(k): v for k, v in d["sentinel_lengths"].items()})

    @staticmethod
    def _mean_std(sums: list[int], sumsqs: list[int], n: int) -> tuple[list[float], list[float]]:
        if n == 0:
            return [], []
        mean = [s / n for s in sums]
        # n*sumsq - sum^2 in exact integers, then one division: no cancellation error.
        std = [math.sqrt((n * q - s * s) / (n * n)) for s, q in zip(sums, sumsqs)]
        return [round(m, 6) for m in mean], [round(x, 6) for x in std]

    def summary(self, task: str) -> dict:
        """The ``dataset_info.json`` view: counts, class histogram, per-band mean/std."""
        mean, std = self._mean_std(self.aerial_sum, self.aerial_sumsq, self.aerial_pixels)
        out = {
            "domains": dict(sorted(self.domains.items())),
            "class_histogram": {str(c): int(self.classes[c]) for c in range(1, 20)},
            "aerial_stats": {"bands": list(schema.AERIAL_BANDS), "mean": mean[:4], "std": std[:4]},
            "elevation_stats": {"bands": list(schema.ELEVATION_BANDS), "mean": mean[4:], "std": std[4:]},
        }
        if task == "flair2":
            s_mean, s_std = self._mean_std(self.sen_sum, self.sen_sumsq, self.sen_pixels)
            out["sentinel_stats"] = {"bands": list(schema.SENTINEL_BANDS), "mean": s_mean, "std": s_std,
                                     "num_pixels": self.sen_pixels}
            out["sentinel_length_histogram"] = {str(k): self.lengths[k] for k in sorted(self.lengths)}
        return out


# ------------------------------------------------------------------------------ encoder


class PatchEncoder:
    """`writer.Encoder` of FLAIR patches: read, validate, crop, serialize, count."""

    def __init__(self, task: str, patch_size: int, sentinel_size: int | None):
        self.task = task
        self.patch_size = patch_size
        self.sentinel_size = sentinel_size
        self._series: collections.OrderedDict = collections.OrderedDict()
        self._stats = Statistics()
        self._georef = geotiff.GeorefCache(readers.read_georef)
        self._in_session = 0

    @contextlib.contextmanager
    def session(self):
        """GDAL's environment for reading FLAIR GeoTIFFs, set once for many patches.

        Entering a `rasterio.Env` costs about 0.4 ms, per patch a few percent of
        the conversion; `encode` sets it itself when called outside a session.
        """
        with _no_sidecar_lookup():
            self._in_session += 1
            try:
                yield self
            finally:
                self._in_session -= 1

    def describe(self, item: WorkItem) -> str:
        return item.patch.image

    def collect(self) -> dict:
        out, self._stats = self._stats.to_json(), Statistics()
        return out

    def _sentinel(self, files: layout.SentinelFiles) -> readers.SentinelSeries:
        # One open (memory-mapped) super-area per zone; patches come grouped by zone.
        series = self._series.get(files.data)
        if series is None:
            series = readers.read_sentinel(files, mmap=True)
            self._series[files.data] = series
            while len(self._series) > 2:
                self._series.popitem(last=False)
        return series

    def encode(self, item: WorkItem) -> bytearray:
        p = item.patch
        image_name = os.path.basename(p.image)
        if p.mask is None and item.labelled:
            raise FlairDataError(
                f"{image_name}: no mask MSK_{p.patch_id}.tif found for this image; expected one per "
                f"image in the labels folder of {p.domain}/{p.zone} [{p.image}]"
            )
        if item.metadata is None:
            raise FlairDataError(
                f"{image_name}: no record {p.name!r} in the metadata JSON {item.metadata_json}; "
                f"expected one per patch [{p.image}]"
            )
        missing = metadata_lib.missing_keys(item.metadata)
        if missing:
            raise FlairDataError(
                f"{image_name}: its record in the metadata JSON {item.metadata_json} lacks {missing}; "
                f"expected keys {list(metadata_lib.REQUIRED_KEYS)} [{p.image}]"
            )
        size = self.patch_size
        with contextlib.ExitStack() as files:
            if not self._in_session:
                files.enter_context(_no_sidecar_lookup())
            # Pixels only (GDAL's georeferencing costs 0.7 ms per open): the georeferencing
            # comes from `self._georef`, which asks GDAL once per kind of file.
            image = files.enter_context(readers.open_pixels(p.image))
            readers.check_image_raster(image, p.image, size)
            mask = None
            if p.mask is not None:
                mask = files.enter_context(readers.open_pixels(p.mask))
                readers.check_mask_raster(mask, p.mask, size)
            # A remote image is opened with its georeferencing (one request, not two).
            crs_wkt, transform = (readers.georef_of(image) if readers.is_remote(p.image)
                                  else self._georef(p.image))
            # GDAL decodes the bands straight into the record: R, G, B, NIR interleaved
            # (channels-last), then the elevation band from its block cache.
            aerial = schema.InPlace((size, size, 4), np.uint8,
                                    lambda dst: image.read([1, 2, 3, 4], out=dst.transpose(2, 0, 1)))
            elevation = schema.InPlace((size, size, 1), np.uint8, lambda dst: image.read(5, out=dst[..., 0]))
            label = None if mask is None else schema.InPlace((size, size), np.uint8,
                                                             lambda dst: mask.read(1, out=dst))
            example = {
                "aerial": aerial,
                "elevation": elevation,
                "label": label,
                "metadata": item.metadata,
                "patch_id": p.patch_id,
                "domain": p.domain,
                "zone": p.zone,
                "crs_wkt": crs_wkt,
                "transform": transform,
            }
            sentinel = None
            if self.task == "flair2":
                if item.centroid is None:
                    raise FlairDataError(
                        f"{image_name}: no entry '{p.name}.tif' in the centroid JSON {item.centroids_json}; "
                        f"expected the patch's [row, col] in its Sentinel-2 super-area [{p.image}]"
                    )
                series = self._sentinel(p.sentinel)
                views = readers.crop_sentinel_views(series, item.centroid, self.sentinel_size, name=image_name)
                # Copied once, from the memory-mapped super-area into the record.
                sentinel, masks = (schema.InPlace(v.shape, v.dtype, lambda dst, v=v: np.copyto(dst, v))
                                   for v in views)
                example["sentinel_data"] = sentinel
                example["sentinel_masks"] = masks
                example["sentinel_dates"] = [d.year * 10000 + d.month * 100 + d.day for d in series.dates]
            try:
                record = schema.serialize(example)
            except ValueError as e:
                raise FlairDataError(f"{image_name}: {e} [{p.image}]") from e
        classes = None
        if label is not None:
            classes = Statistics.code_histogram(label.array)
            if classes[:readers.MIN_CODE].any() or classes[readers.MAX_CODE + 1:].any():
                readers.check_codes(label.array, p.mask)  # raises, listing the values
        self._stats.add(aerial.array, elevation.array, classes, p.domain,
                        None if sentinel is None else sentinel.array)
        return record


def _no_sidecar_lookup():
    """GDAL config for reading FLAIR GeoTIFFs: no directory listing on open.

    By default GDAL lists a file's folder at every open to look for sidecars
    (``.aux.xml``, ``.ovr``, world files). FLAIR patches carry their
    georeferencing inside, their folders hold many files, and on ``gs://``
    (``/vsigs/``) each listing is a request.
    """
    import rasterio  # pylint: disable=g-import-not-at-top

    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


@dataclasses.dataclass(frozen=True)
class EncoderFactory:
    """Picklable factory of `PatchEncoder` (sent to each worker process)."""

    task: str
    patch_size: int
    sentinel_size: int | None

    def __call__(self) -> PatchEncoder:
        return PatchEncoder(self.task, self.patch_size, self.sentinel_size)


# ---------------------------------------------------------------------------- planning


def _order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _count_products(files: layout.SentinelFiles) -> int:
    try:
        return len(readers.read_products(files.products))
    except (FlairDataError, OSError):
        return _DEFAULT_T


def _relative(path: str | None, root: str) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.relpath(path, root)


def plan_split(options: ConvertOptions, split: str, items: Sequence[WorkItem]) -> list[writer.ShardTask]:
    """Orders the items of one split and cuts them into `writer.ShardTask`s."""
    if not items:
        return []
    group = (lambda it: f"{it.patch.domain}/{it.patch.zone}") if options.task == "flair2" else (lambda it: it.patch.name)
    ordered = sorted(items, key=lambda it: (_order_key(options.shard_seed, group(it)), int(it.patch.patch_id)))
    per_item = options.patch_size**2 * 6 + 2048  # aerial 4 + elevation 1 + label 1 bytes/px, fields
    total = per_item * len(items)
    if options.task == "flair2":
        lengths = {}
        for it in items:
            if it.patch.sentinel is not None and it.patch.sentinel.products not in lengths:
                lengths[it.patch.sentinel.products] = _count_products(it.patch.sentinel)
        s2 = options.sentinel_size**2 * (2 * len(schema.SENTINEL_BANDS) + 2) + 4
        total += sum(s2 * lengths.get(getattr(it.patch.sentinel, "products", None), _DEFAULT_T) for it in items)
    n = writer.num_shards_for(len(items), total, options.num_shards, options.target_shard_mb, options.min_shards)
    spec = options.spec()
    common = [schema.SCHEMA_VERSION, STATS_VERSION, dataclasses.asdict(spec), options.compression]
    tasks = []
    for i, chunk in enumerate(writer.split_items(ordered, n)):
        chunk = tuple(sorted(chunk, key=lambda it: (it.patch.domain, it.patch.zone, int(it.patch.patch_id))))
        keys = [
            [it.patch.patch_id, it.patch.domain, it.patch.zone, _relative(it.patch.image, options.data_root),
             _relative(it.patch.mask, options.data_root), it.metadata, it.centroid, it.labelled]
            for it in chunk
        ]
        path = posixpath.join(options.output_dir, schema.shard_name(options.task, split, i, n))
        tasks.append(writer.ShardTask(path=path, items=chunk, fingerprint=writer.fingerprint(common, keys)))
    return tasks


def _work_items(tree: layout.FlairTree, split: str, cache: dict,
                strict_metadata: bool = True) -> tuple[list[WorkItem], bool]:
    # Lenient reading (--on_error=skip) leaves a bad metadata record to its patch's encoding,
    # which fails alone and is skipped; strict reading fails before any shard is written.
    if tree.metadata_json is None:
        raise FlairDataError(
            f"{tree.root}: no metadata JSON found; expected one of "
            f"{list(layout.METADATA_NAMES[tree.task])} in the data root"
        )
    if "metadata" not in cache:  # read once per conversion, shared by the splits
        cache["metadata"] = readers.read_metadata_json(tree.metadata_json, strict=strict_metadata)
    metadata = cache["metadata"]
    centroids = {}
    if tree.task == "flair2":
        if tree.centroids_json is None:
            raise FlairDataError(
                f"{tree.root}: no centroid JSON found; expected one of {list(layout.CENTROIDS_NAMES)}"
            )
        if "centroids" not in cache:
            cache["centroids"] = readers.read_centroids_json(tree.centroids_json)
        centroids = cache["centroids"]
    patches = tree.splits[split]
    # train/val always carry labels; test does when its labels folder exists.
    labelled = split != "test" or any(p.mask is not None for p in patches)
    items = [
        WorkItem(p, metadata.get(p.name), centroids.get(p.name), labelled,
                 tree.metadata_json or "", tree.centroids_json or "")
        for p in patches
    ]
    return items, labelled


# ---------------------------------------------------------------------------------- job


def _base_info(options: ConvertOptions) -> dict:
    spec = options.spec()
    bands = {"aerial": list(schema.AERIAL_BANDS), "elevation": list(schema.ELEVATION_BANDS)}
    if options.task == "flair2":
        bands["sentinel_data"] = list(schema.SENTINEL_BANDS)
        bands["sentinel_masks"] = list(schema.SENTINEL_MASK_BANDS)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "task": spec.task,
        "patch_size": spec.patch_size,
        "sentinel_size": spec.sentinel_size,
        "byte_layout": spec.byte_layout,
        "compression": options.compression,
        "features": spec.features(),
        "band_order": bands,
        "label": "raw FLAIR codes 1..19 (all 0 when has_label is false)",
        "flair_tf_version": flair_tf.__version__,
    }


def _load_existing_info(options: ConvertOptions, base: dict) -> dict:
    path = posixpath.join(options.output_dir, schema.DATASET_INFO_NAME)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "r") as f:
        old = json.load(f)
    for key in ("schema_version", "task", "patch_size", "sentinel_size", "compression"):
        if old.get(key) != base[key]:
            raise ValueError(
                f"{path} describes records with {key}={old.get(key)!r}, this conversion writes "
                f"{key}={base[key]!r}; use another --output_dir or delete the old records"
            )
    # One byte layout per dataset_info.json: splits kept from an older conversion must match.
    kept = sorted(set(old.get("splits", {})) - set(options.splits))
    if kept and old.get("byte_layout", "protobuf") != base["byte_layout"]:
        raise ValueError(
            f"{path}: split(s) {kept} were converted by an older version with byte_layout="
            f"{old.get('byte_layout', 'protobuf')!r}, this conversion writes {base['byte_layout']!r}; "
            f"convert those splits again too (--splits={','.join(sorted(set(kept) | set(options.splits)))})"
        )
    return old


def _split_info(results, labelled: bool, task: str) -> dict:
    stats = Statistics()
    skipped = []
    for r in results:
        stats.merge_json(r.stats)
        skipped.extend(r.skipped)
    return {
        "num_examples": sum(r.num_examples for r in results),
        "num_shards": len(results),
        "has_labels": labelled,
        "shards": [
            {"file": posixpath.basename(r.path), "num_examples": r.num_examples, "num_bytes": r.num_bytes}
            for r in results
        ],
        **stats.summary(task),
        "skipped": skipped,
    }


def convert(options: ConvertOptions) -> dict:
    """Runs the conversion; returns the written ``dataset_info.json`` content.

    Raises:
      FlairDataError / writer.ConversionError: bad input with ``on_error='fail'``
        (the message names the file; no partial shard is left).
    """
    spec = options.spec()  # validates task / sizes early
    tree = layout.discover(
        options.data_root, options.task, splits=options.splits, val_domains=options.val_domains,
        csv_lists=options.csv_lists, require_labels=False,
    )
    tf.io.gfile.makedirs(options.output_dir)
    base = _base_info(options)
    info = _load_existing_info(options, base)
    info.update(base)
    info["command_line"] = options.command_line
    info["source"] = {"data_root": options.data_root, "metadata_json": tree.metadata_json,
                      "centroids_json": tree.centroids_json}
    info.setdefault("splits", {})
    factory = EncoderFactory(spec.task, spec.patch_size, spec.sentinel_size)
    plans, cache = {}, {}
    for split in options.splits:
        items, labelled = _work_items(tree, split, cache, strict_metadata=options.on_error == "fail")
        plans[split] = (plan_split(options, split, items), labelled)
        logging.info("%s %s: %d patches -> %d shards", options.task, split, len(items), len(plans[split][0]))
    # One writer call for all splits: the worker processes start (and import TF) once.
    all_tasks = [t for tasks, _ in plans.values() for t in tasks]
    results = writer.write_shards(
        all_tasks, factory, num_workers=options.num_workers, compression=options.compression,
        on_error=options.on_error, desc=f"{options.task} {'+'.join(options.splits)}",
        show_progress=options.show_progress,
    )
    by_path = {r.path: r for r in results}
    for split, (tasks, labelled) in plans.items():
        writer.remove_stale(options.output_dir, f"{options.task}-{split}.tfrecord-", [t.path for t in tasks])
        info["splits"][split] = _split_info([by_path[t.path] for t in tasks], labelled, options.task)
        skipped = info["splits"][split]["skipped"]
        if skipped:
            logging.warning("%s: %d input(s) skipped, listed in dataset_info.json", split, len(skipped))
    info["options"] = {k: v for k, v in dataclasses.asdict(options).items() if k != "show_progress"}
    _write_info(options.output_dir, info)
    return info


def _write_info(output_dir: str, info: dict) -> None:
    path = posixpath.join(output_dir, schema.DATASET_INFO_NAME)
    tmp = path + writer.INCOMPLETE_SUFFIX
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=False)
        f.write("\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)
