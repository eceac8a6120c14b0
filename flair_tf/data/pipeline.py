"""tf.data input pipelines of FLAIR #1 and FLAIR #2, from the TFRecords of `schema`.

One builder, `make_dataset`, yields ``(features, labels)`` batches with static
shapes, directly or through ``strategy.distribute_datasets_from_function``:

    files (sorted, seeded shuffle shared by all hosts) -> shard per input
    pipeline -> [shuffle files] -> interleave TFRecordDataset -> [shuffle
    examples] -> [repeat] -> decode (`schema.decode`) -> select bands -> augment
    -> remap classes -> Sentinel filter / monthly mean / pad -> batch -> prefetch

With ``aerial_on="device"``, training batches leave the aerial part
(band interleave, class remap, flips/rot90) to the training step, which calls
`finish_batch` on the accelerator.

Normalisation is not done here: ``features["aerial"]`` stays uint8 (4x less
host-to-device traffic than float32) and the model's first layer
(`flair_tf.models.layers.InputNormalization`) applies ``x / 255`` or
``(x - mean) / std`` with the values of `normalization_stats`.

Only the keys of the decoded dict (contract B) are used here; the record
feature keys are `schema`'s business. Every step is a TensorFlow op (no
``py_function``, no numpy in the graph). Options and their reference
counterparts: docs/pipeline.md.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import random
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from flair_tf import nomenclature
from flair_tf.data import augment as augment_lib
from flair_tf.data import schema
from flair_tf.data import sentinel as sentinel_lib

CHANNELS = ("R", "G", "B", "NIR", "E")  # the 5 bands of IMG_*.tif, reference order
NORM_TYPES = ("scaling", "custom", "without")
NORM_STATS_SOURCES = ("reference", "dataset")
AERIAL_PLACES = ("host", "device")
# Main-lib default config `norm_means` / `norm_stds` (spec flair1 §2.2), R,G,B,NIR,E.
REFERENCE_MEANS = (105.08, 110.87, 101.82, 106.38, 53.26)
REFERENCE_STDS = (52.17, 45.38, 44.0, 39.69, 79.3)
# Class index of codes outside 1..19 and of unlabelled records (as nomenclature's table).
INVALID_LABEL = int(nomenclature.code_to_index_lut(13)[0])
# Positions of the month terms in the 45-value metadata vector (spec flair1 §2.4).
MONTH_SIN_INDEX, MONTH_COS_INDEX = 39, 40
_TUPLE_FIELDS = ("channels", "norm_means", "norm_stds", "keep_keys")
# `_pack` relies on tf.bitcast's byte order; other hosts take the slower generic path.
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclasses.dataclass
class PipelineConfig:
    """Everything that shapes the examples a model sees (saved as data_config.json).

    Attributes:
      task: "flair1" (aerial only) or "flair2" (aerial + Sentinel-2).
      num_classes: 13 (challenge remap: codes >= 13 -> index 12) or 19 (code - 1).
      channels: aerial bands to feed, any order/subset of R, G, B, NIR, E.
      use_metadata: add ``features["metadata"]``, the 45-value vector.
      fix_month_quirk: replace the reference's constant month terms (values 39
        and 40) by ``sin/cos(2*pi*(month - 1)/12)`` mapped to [0, 1].
      augment: random flips / rot90 on training examples (reference
        `use_augmentation`); never on evaluation.
      augment_sentinel: with `augment`, also transform the Sentinel patch and
        ``labels["sentinel"]`` (the reference never does: off by default).
      aerial_on: where the per-pixel aerial work of training batches runs
        (band interleave and selection, class remap, flips and rotations).
        "host": in the pipeline, which yields finished batches. "device": the
        pipeline yields the record's bytes as they are (``aerial_rgbn``,
        ``aerial_elevation``, ``labels["aerial_codes"]``) with the drawn moves
        (``augment_move``), and `finish_batch`, called in the training step,
        does that work on the accelerator: less host CPU per example, the same
        values. Evaluation batches are always finished on the host.
      sentinel_size: Sentinel crop side S fed to the model; a centred crop of
        the stored one when smaller (reference `sat_patch_size`, 40).
      filter_clouds: drop cloudy/snowy dates (reference `filter_clouds`).
      cloud_area_threshold: keep a date iff cover fraction < this (0.5).
      cloud_proba_threshold: a mask pixel counts when its probability >= this (60).
      average_month: monthly means, time length 12 (reference `average_month`).
      max_dates: time length without monthly averaging (longer series keep
        their least cloudy dates, in time order).
      sentinel_scaling: "reference" (raw counts with monthly means, /65535
        without, as the reference's `img_as_float`) or "reflectance" (/10000).
      ref_date: "MM-DD" origin of the date encoding (reference `ref_date`).
      norm_type: "scaling" (x/255, reference), "custom" ((x - mean)/std) or
        "without" (raw values); applied by the model, see `normalization_stats`.
      norm_means, norm_stds: per selected channel, for "custom"; None takes
        them from `norm_stats_from`.
      norm_stats_from: "reference" (the main lib's defaults) or "dataset" (the
        train split's per-band stats in dataset_info.json).
      shuffle_buffer: examples in the training shuffle buffer.
      shuffle_files: shuffle the file list for training (seeded, the same on every host).
      cycle_length: files read in parallel by the interleave.
      block_length: consecutive records taken from each file by the interleave.
      seed: seed of every random choice (file order, shuffle, augmentation).
      deterministic: tf.data determinism; None keeps tf.data's default (True).
        False is faster but the order (and augmentation draws) varies.
      compression: None reads dataset_info.json's value; "" or "GZIP" force one.
      prefetch: batches prefetched; None = AUTOTUNE.
      private_threadpool_size: tf.data threads; None = shared pool (TPU hosts: e.g. 48).
      keep_keys: decoded keys passed through into ``features`` (e.g. "domain",
        "zone", "crs_wkt", "transform" for writing predictions).
      jit_compile: XLA-compile the aerial part of the parser on the host CPU
        (same results, about half the CPU); False where XLA:CPU is unavailable.
    """

    task: str = "flair1"
    num_classes: int = 13
    channels: tuple[str, ...] = CHANNELS
    use_metadata: bool = False
    fix_month_quirk: bool = False
    augment: bool = False
    augment_sentinel: bool = False
    aerial_on: str = "host"
    sentinel_size: int = 40
    filter_clouds: bool = True
    cloud_area_threshold: float = 0.5
    cloud_proba_threshold: int = 60
    average_month: bool = True
    max_dates: int = 64
    sentinel_scaling: str = "reference"
    ref_date: str = "05-15"
    norm_type: str = "scaling"
    norm_means: tuple[float, ...] | None = None
    norm_stds: tuple[float, ...] | None = None
    norm_stats_from: str = "reference"
    shuffle_buffer: int = 256
    shuffle_files: bool = True
    cycle_length: int = 16
    block_length: int = 1
    seed: int = 2022
    deterministic: bool | None = None
    compression: str | None = None
    prefetch: int | None = None
    private_threadpool_size: int | None = None
    keep_keys: tuple[str, ...] = ()
    jit_compile: bool = True

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                setattr(self, name, tuple(value))
        if self.task not in schema.TASKS:
            raise ValueError(f"task must be one of {schema.TASKS}. Received: task={self.task!r}")
        if self.num_classes not in nomenclature.SUPPORTED_NUM_CLASSES:
            raise ValueError(f"num_classes must be 13 or 19. Received: {self.num_classes}")
        bad = [c for c in self.channels if c not in CHANNELS]
        if bad or not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct names among {CHANNELS}. "
                             f"Received: channels={self.channels}")
        if self.sentinel_scaling not in sentinel_lib.SCALINGS:
            raise ValueError(f"sentinel_scaling must be one of {sentinel_lib.SCALINGS}. "
                             f"Received: {self.sentinel_scaling!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}. Received: {self.norm_type!r}")
        if self.aerial_on not in AERIAL_PLACES:
            raise ValueError(f"aerial_on must be one of {AERIAL_PLACES}. Received: {self.aerial_on!r}")
        if self.norm_stats_from not in NORM_STATS_SOURCES:
            raise ValueError(f"norm_stats_from must be one of {NORM_STATS_SOURCES}. "
                             f"Received: {self.norm_stats_from!r}")
        for name in ("norm_means", "norm_stds"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.channels):
                raise ValueError(f"{name} needs one value per channel {self.channels}. "
                                 f"Received: {name}={value}")
        if self.max_dates < 1 or self.sentinel_size < 1 or self.shuffle_buffer < 1:
            raise ValueError("max_dates, sentinel_size and shuffle_buffer must be >= 1. Received: "
                             f"{self.max_dates}, {self.sentinel_size}, {self.shuffle_buffer}")
        if not 0 <= self.cloud_proba_threshold <= 101:
            raise ValueError(f"cloud_proba_threshold is a probability in 0..100. "
                             f"Received: {self.cloud_proba_threshold}")
        self.ref_month_day()  # validates ref_date

    def ref_month_day(self) -> tuple[int, int]:
        """`ref_date` as (month, day)."""
        try:
            month, day = (int(p) for p in self.ref_date.split("-"))
        except ValueError:
            month = day = 0
        if not (1 <= month <= 12 and 1 <= day <= 31):
            raise ValueError(f"ref_date must look like 'MM-DD'. Received: {self.ref_date!r}")
        return month, day

    @property
    def num_dates(self) -> int:
        """The fixed Sentinel time length of the batches."""
        return sentinel_lib.NUM_MONTHS if self.average_month else self.max_dates

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineConfig":
        """Inverse of `to_dict`; unknown keys are an error (naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PipelineConfig keys {unknown} (data_config.json written by "
                             f"another version?); known keys: {sorted(known)}")
        return cls(**dict(d))


# ------------------------------------------------------------------------------ helpers


def channel_indices(channels: Sequence[str]) -> list[int]:
    """Indices of `channels` in the 5-band stack R, G, B, NIR, E."""
    return [CHANNELS.index(c) for c in channels]


def normalization_stats(config: PipelineConfig, dataset_info: Mapping[str, Any] | None = None
                        ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per-channel (mean, std) for the model's input layer (`norm_mean`, `norm_std`).

    Args:
      config: the pipeline config (`norm_type`, `channels`, `norm_means`,
        `norm_stds`, `norm_stats_from`).
      dataset_info: parsed dataset_info.json, needed for ``norm_stats_from="dataset"``.

    Returns:
      (None, None) for "scaling" (the model computes x / 255, the reference's
      `img_as_float`); zeros/ones for "without"; for "custom" the explicit
      values, else the train split's stats or the reference defaults, in
      `config.channels` order.
    """
    n = len(config.channels)
    if config.norm_type == "scaling":
        return None, None
    if config.norm_type == "without":
        return (0.0,) * n, (1.0,) * n
    if config.norm_means is not None and config.norm_stds is not None:
        return tuple(map(float, config.norm_means)), tuple(map(float, config.norm_stds))
    if config.norm_stats_from == "reference":
        means, stds = REFERENCE_MEANS, REFERENCE_STDS
    else:
        try:
            train = dataset_info["splits"]["train"]
            means = tuple(train["aerial_stats"]["mean"]) + tuple(train["elevation_stats"]["mean"])
            stds = tuple(train["aerial_stats"]["std"]) + tuple(train["elevation_stats"]["std"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                "norm_stats_from='dataset' needs dataset_info.json with a converted train split "
                f"(splits.train.aerial_stats / elevation_stats); missing {e}. Convert the train "
                "split or pass norm_means/norm_stds") from None
    idx = channel_indices(config.channels)
    mean = tuple(float(means[i]) for i in idx)
    std = tuple(float(stds[i]) for i in idx)
    if config.norm_means is not None:
        mean = tuple(map(float, config.norm_means))
    if config.norm_stds is not None:
        std = tuple(map(float, config.norm_stds))
    return mean, std


def _fixed_month_terms() -> np.ndarray:
    """[13, 2] corrected (sin, cos) month terms mapped to [0, 1]; row = month (row 0 unused)."""
    rows = [(0.0, 0.0)]
    for month in range(1, 13):
        # The same Python float arithmetic as `metadata.encode_metadata(fix_month_quirk=True)`.
        angle = 2 * math.pi * (month - 1) / 12
        rows.append(((math.sin(angle) + 1.0) / 2.0, (math.cos(angle) + 1.0) / 2.0))
    return np.asarray(rows, np.float32)


def fix_month_terms(vector: tf.Tensor, month: tf.Tensor) -> tf.Tensor:
    """Replaces values 39 and 40 of a metadata vector by the corrected month terms."""
    terms = tf.gather(tf.constant(_fixed_month_terms()), tf.clip_by_value(month, 1, 12))
    return tf.concat([vector[:MONTH_SIN_INDEX], terms, vector[MONTH_COS_INDEX + 1:]], axis=0)


def remap_codes(codes: tf.Tensor, num_classes: int, dtype: tf.DType = tf.uint8) -> tf.Tensor:
    """Raw codes 0..255 -> class indices, `nomenclature.code_to_index_lut` (invalid -> 255).

    Element-wise arithmetic in `dtype` rather than a 256-entry `tf.gather` (the
    same table, checked on all 256 codes by a test) at a fraction of the cost:
    in uint8, code 0 wraps to 255 in ``min(c, 13) - 1`` / ``c - 1``; in a wider
    integer dtype (int32: `finish_batch` on a GPU) it is set to 255 like the
    codes above 19.
    """
    codes = tf.cast(codes, dtype)
    one = tf.constant(1, dtype)
    if num_classes == 13:
        index = tf.minimum(codes, tf.constant(13, dtype)) - one  # challenge remap: 13..19 -> 12
    else:
        index = codes - one
    invalid = codes > tf.constant(nomenclature.NUM_CODES, dtype)
    if dtype != tf.uint8:
        invalid |= codes < one
    return tf.where(invalid, tf.constant(INVALID_LABEL, dtype), index)


def select_channels(image: tf.Tensor, indices: Sequence[int]) -> tf.Tensor:
    """image[..., indices], as a slice when the indices are a contiguous run (much faster)."""
    indices = list(indices)
    if indices == list(range(indices[0], indices[0] + len(indices))):
        if indices[0] == 0 and len(indices) == image.shape[-1]:
            return image
        return image[..., indices[0]:indices[0] + len(indices)]
    return tf.gather(image, indices, axis=-1)


def _pack(aerial: tf.Tensor, elevation: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """uint64 [P, P]: bytes 0-3 R,G,B,NIR, byte 4 elevation, byte 5 label (little-endian).

    One 8-byte word per pixel lets a flip or a rotation move whole pixels; on
    uint8 tensors with 5-6 channels the same ops cost about three times more.
    """
    # elevation | label << 8 on 16 bits first: fewer passes over the 8-byte words
    high = tf.cast(elevation[..., 0], tf.uint16) | tf.bitwise.left_shift(
        tf.cast(label, tf.uint16), tf.constant(8, tf.uint16))
    return tf.cast(tf.bitcast(aerial, tf.uint32), tf.uint64) | tf.bitwise.left_shift(
        tf.cast(high, tf.uint64), tf.constant(32, tf.uint64))


def _unpack(words: tf.Tensor, channels: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Inverse of `_pack`: (selected channels uint8 [P, P, C], label uint8 [P, P])."""
    image = select_channels(tf.bitcast(words, tf.uint8), channels)
    label = tf.cast(tf.bitwise.right_shift(words, tf.constant(40, tf.uint64)), tf.uint8)
    return image, label


def _bands(aerial: tf.Tensor, elevation: tf.Tensor, channels: Sequence[int],
           for_xla: bool = False) -> tf.Tensor:
    """The selected channels of R,G,B,NIR + E, concatenating elevation only when selected.

    With `for_xla`, a run of aerial bands followed or preceded by E is built as
    the OR of the two parts zero-padded to the output's channels: XLA:CPU fuses
    that into the pixel move's loop, where it runs a `concatenate` on its own
    (a separate, slower pass when no flip follows: 0.50-0.55 against 0.41-0.43 ms
    per 512 px example for the identity, 1.04-1.16 against 0.89-0.94 ms for the
    bare transpose; the same bytes).
    """
    channels = list(channels)
    if max(channels) < 4:
        return select_channels(aerial, channels)
    if channels == [4]:
        return elevation
    rest = [c for c in channels if c != 4]
    at, n = channels.index(4), len(rest)  # E's output channel; the aerial bands around it
    if for_xla and at in (0, n) and rest == list(range(rest[0], rest[0] + n)):
        bands = tf.pad(select_channels(aerial, rest), [[0, 0], [0, 0], [int(at == 0), int(at == n)]])
        return bands | tf.pad(elevation, [[0, 0], [0, 0], [at, n - at]])
    return select_channels(tf.concat([aerial, elevation], axis=-1), channels)


def make_aerial_fn(channels: Sequence[int], num_classes: int, augment: bool, jit_compile: bool,
                   with_unaugmented: bool = True):
    """The aerial half of the parser, ``fn(aerial, elevation, codes, move)``.

    `move` is the example's drawn symmetry (`augment.move_index` of its
    transform, an int32 scalar; ignored without `augment`). Returns ``(image
    uint8 [P,P,C], label uint8 [P,P], unaugmented label uint8 or None)``: no
    un-augmented label without `with_unaugmented`
    (FLAIR #1 has no use for it). Labels stay uint8, like the image: the losses
    and metrics cast them, and int32 would write, batch and send to the device
    4x the bytes.

    With `jit_compile` the band interleave, class remap and pixel move run as
    one XLA program (about 2x less CPU at 512 px than a dozen kernels);
    otherwise, on little-endian hosts, image and label are packed into one
    64-bit word per pixel before the flips and rotation. The three variants give
    identical results (tested).
    """
    channels = list(channels)

    def direct(aerial, elevation, codes, move):
        label = remap_codes(codes, num_classes)
        image = _bands(aerial, elevation, channels, for_xla=jit_compile)
        extra = (label,) if with_unaugmented else ()
        if not augment:
            return (image, label, *extra)
        return (augment_lib.apply_move(image, move), augment_lib.apply_move(label, move), *extra)

    def packed(aerial, elevation, codes, move):
        label = remap_codes(codes, num_classes)
        words = augment_lib.apply_move(_pack(aerial, elevation, label), move)
        image, augmented = _unpack(words, channels)
        return (image, augmented, label) if with_unaugmented else (image, augmented)

    if jit_compile:
        def specialised(aerial, elevation, codes, move):
            # Indexing a constant with the move makes it a compile-time constant of the
            # program (a strided slice's bounds must be): XLA compiles one straight-line
            # program per move, 8 of about 0.2 s each at 512 px (16 when the three drawn
            # values entered), and runs them 5-10% faster than one with a conditional.
            move = tf.constant(np.arange(len(augment_lib.MOVES), dtype=np.int32))[move]
            return direct(aerial, elevation, codes, move)

        fn = tf.function(specialised, jit_compile=True)
    elif augment and _LITTLE_ENDIAN:
        fn = packed
    else:
        fn = direct

    def aerial_fn(aerial, elevation, codes, move):
        out = fn(aerial, elevation, codes, move if augment else tf.constant(0))
        return out[0], out[1], out[2] if with_unaugmented else None

    return aerial_fn


def augmentation_draws(seed: int, stream_id: int, stream_stride: int,
                       chunk: int = 1024, per_batch: int = 0) -> tf.data.Dataset:
    """The drawn move of every example of input pipeline `stream_id` (of `stream_stride`), in order.

    Example *n* draws its transform from the seed ``(seed, n * stream_stride +
    stream_id)`` (`augment.sample_transform`) and the dataset yields the move
    it amounts to (`augment.move_index`, int32 in 0..7). The hash runs on
    chunks of `chunk` counters (about 30 integer kernels per chunk instead of
    per example), then the moves are unbatched; with `per_batch` > 0 they come
    instead as int32 [per_batch] vectors, the moves of consecutive batches.
    """
    def draw(n):
        seeds = tf.stack([tf.fill(tf.shape(n), tf.constant(seed, tf.int64)),
                          n * stream_stride + stream_id], axis=1)
        return augment_lib.move_index(augment_lib.sample_transform(seeds))

    if per_batch:
        return tf.data.Dataset.counter().batch(per_batch, drop_remainder=True).map(draw)
    return tf.data.Dataset.counter().batch(chunk).map(draw).unbatch()


def finish_batch(features: Mapping[str, tf.Tensor], labels: Mapping[str, tf.Tensor],
                 config: PipelineConfig, wide: bool | None = None
                 ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """The training step's half of ``aerial_on="device"``: finishes a batch on the accelerator.

    Interleaves and selects the bands (`config.channels`), remaps the label
    codes (`config.num_classes`) and applies the drawn flips and rotations
    (`augment.apply_moves`), making of the batch, value for value, the one the
    pipeline yields with ``aerial_on="host"`` and the same seed. Call it on
    each replica's batch inside the training step (``flair_tf.train`` does).
    A batch that is already finished (no ``labels["aerial_codes"]``) is
    returned as it is.

    Args:
      features: a batch of `make_dataset` with ``aerial_on="device"``:
        ``aerial_rgbn`` uint8 [B, P, P, 4] and/or ``aerial_elevation`` uint8
        [B, P, P, 1] (as `config.channels` need them), ``augment_move`` int32
        [B] with augmentation; other keys pass through, except ``sentinel``
        [B, T, S, S, 10], which moves with `config.augment_sentinel`.
      labels: its labels: ``aerial_codes`` uint8 [B, P, P], the stored codes.
      config: the `PipelineConfig` of the pipeline.
      wide: compute in int32 rather than uint8 (exact either way): TensorFlow
        has no GPU kernel of `Select` for uint8 and would run the selects on
        the host. None: when a GPU is visible.

    Returns:
      (features, labels) with ``aerial`` uint8 [B, P, P, C] and ``labels["aerial"]``
      uint8 [B, P, P]; for FLAIR #2 ``labels["sentinel"]``, the un-augmented labels
      (the reference's quirk), or the augmented ones with `config.augment_sentinel`.
    """
    if "aerial_codes" not in labels:
        return dict(features), dict(labels)
    features, labels = dict(features), dict(labels)
    if wide is None:
        wide = bool(tf.config.list_logical_devices("GPU"))
    work = (lambda x: tf.cast(x, tf.int32)) if wide else (lambda x: x)  # noqa: E731
    channels = channel_indices(config.channels)
    rgbn = features.pop("aerial_rgbn", None)
    elevation = features.pop("aerial_elevation", None)
    if rgbn is not None and elevation is not None:
        bands = tf.concat([work(rgbn), work(elevation)], axis=-1)
    else:  # only the bands the channels use were batched
        bands = work(rgbn if rgbn is not None else elevation)
        channels = [c if rgbn is not None else 0 for c in channels]
    image = select_channels(bands, channels)
    codes = labels.pop("aerial_codes")
    label = remap_codes(codes, config.num_classes, tf.int32 if wide else tf.uint8)
    unaugmented = label
    moves = features.pop("augment_move", None)
    if moves is not None:
        image = augment_lib.apply_moves(image, moves)
        label = augment_lib.apply_moves(label, moves)
        if config.augment_sentinel and "sentinel" in features:
            features["sentinel"] = augment_lib.apply_moves(features["sentinel"], moves, (2, 3))
    features["aerial"] = tf.cast(image, tf.uint8)
    labels["aerial"] = tf.cast(label, tf.uint8)
    if config.task == "flair2":
        if moves is not None and not config.augment_sentinel:
            labels["sentinel"] = tf.cast(unaugmented, tf.uint8)  # the reference's quirk
        else:
            labels["sentinel"] = labels["aerial"]
    return features, labels


def resolve_files(file_pattern: str | Sequence[str], task: str, split: str) -> list[str]:
    """Sorted shard paths: globs, comma-separated globs, or records directories."""
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    patterns = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    files = []
    for pattern in patterns:
        if tf.io.gfile.isdir(pattern):
            pattern = schema.shard_pattern(pattern, task, split)
        matched = tf.io.gfile.glob(pattern)
        if not matched:
            raise ValueError(f"{pattern} does not match any files; convert the data with "
                             "tools/convert_to_tfrecords.py or fix the pattern")
        files.extend(matched)
    return sorted(set(files))


def read_buffer_size(path: str) -> int:
    """TFRecordDataset read buffer for files like `path`: none for local files, 8 MB remote.

    From a local file (page cache), an unbuffered reader reads each record
    straight into its string: one copy less, about 12% less CPU per 512 px
    record than a buffered read. On gs:// (or any remote file system) every
    unbuffered read would be a request, so records are read in 8 MB blocks.
    """
    return 8 * 1024 * 1024 if "://" in path else 0


def _shard_counts(info: Mapping[str, Any], files: Sequence[str]) -> list[int] | None:
    """Records per file from dataset_info.json, or None if any file is not listed."""
    counts = {}
    for split in info.get("splits", {}).values():
        for shard in split.get("shards", []):
            counts[shard["file"]] = int(shard["num_examples"])
    names = [posixpath.basename(f) for f in files]
    if not all(n in counts for n in names):
        return None
    return [counts[n] for n in names]


def _zeros_like_spec(spec) -> Any:
    return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)


# ------------------------------------------------------------------------------ parsing


class _Parser:
    """decoded record -> (features, labels), one example, pure TF."""

    def __init__(self, config: PipelineConfig, spec: schema.RecordSpec, training: bool,
                 with_eval_keys: bool):
        self.config = config
        self.spec = spec
        self.augment = training and config.augment
        # aerial_on="device": the training step finishes the aerial part (`finish_batch`).
        self.raw_aerial = training and config.aerial_on == "device"
        self.augment_here = self.augment and not self.raw_aerial
        self.with_eval_keys = with_eval_keys
        self.channels = channel_indices(config.channels)
        # Only the record features used are parsed.
        keys = ["aerial", "elevation", "label"]
        if config.use_metadata:
            keys += ["metadata", "metadata_month"] if config.fix_month_quirk else ["metadata"]
        if spec.task == "flair2":
            keys += ["sentinel_data", "sentinel_masks", "sentinel_dates"]
        if with_eval_keys:
            keys.append("patch_id")
        available = schema.decoded_keys(spec)
        for key in config.keep_keys:
            if key not in available:
                raise ValueError(f"keep_keys: {key!r} is not a decoded key; choose from {sorted(available)}")
        self.keys = list(dict.fromkeys(keys + list(config.keep_keys)))
        self.aerial_fn = make_aerial_fn(
            self.channels, config.num_classes, self.augment_here, config.jit_compile,
            with_unaugmented=spec.task == "flair2" and self.augment_here)
        if spec.task == "flair2":
            if config.sentinel_size > spec.sentinel_size:
                raise ValueError(
                    f"sentinel_size={config.sentinel_size} is larger than the stored crop "
                    f"({spec.sentinel_size}); convert again with a larger sentinel size")
            if (spec.sentinel_size - config.sentinel_size) % 2:
                raise ValueError(
                    f"sentinel_size={config.sentinel_size} and the stored crop "
                    f"{spec.sentinel_size} must have the same parity to crop around the centroid")

    def __call__(self, serialized: tf.Tensor, move=None):
        """One record, and with augmentation its move (`augmentation_draws`)."""
        cfg = self.config
        ex = schema.decode(serialized, self.spec, keys=self.keys)
        host_move = move if self.augment_here else None
        if self.raw_aerial:
            # Slices of the decoded record, batched as they are; `finish_batch` does the rest
            # (make_dataset adds the batch's moves).
            features, labels = {}, {"aerial_codes": ex["label"]}
            if any(c < 4 for c in self.channels):
                features["aerial_rgbn"] = ex["aerial"]
            if 4 in self.channels:
                features["aerial_elevation"] = ex["elevation"]
        else:
            image, label, unaugmented = self.aerial_fn(ex["aerial"], ex["elevation"], ex["label"], host_move)
            features = {"aerial": image}
            labels = {"aerial": label}
        if cfg.use_metadata:
            vector = ex["metadata"]
            if cfg.fix_month_quirk:
                vector = fix_month_terms(vector, ex["metadata_month"])
            features["metadata"] = vector
        if self.spec.task == "flair2":
            features.update(self._sentinel(ex, host_move))
            if host_move is not None and not cfg.augment_sentinel:
                # Reference quirk: the auxiliary loss sees the un-augmented labels.
                labels["sentinel"] = unaugmented
            elif not self.raw_aerial:
                labels["sentinel"] = labels["aerial"]
        if self.with_eval_keys:
            features["valid"] = tf.constant(True)
            features["patch_id"] = ex["patch_id"]
        for key in cfg.keep_keys:
            features[key] = ex[key]
        return features, labels

    def _sentinel(self, ex, move) -> dict[str, tf.Tensor]:
        cfg = self.config
        data, masks = ex["sentinel_data"], ex["sentinel_masks"]
        offset = (self.spec.sentinel_size - cfg.sentinel_size) // 2
        if offset:
            size = cfg.sentinel_size
            data = data[:, offset:offset + size, offset:offset + size]
            masks = masks[:, offset:offset + size, offset:offset + size]
        ref_month, ref_day = cfg.ref_month_day()
        frames, dates, pad = sentinel_lib.preprocess_sentinel(
            data, masks, ex["sentinel_dates"], filter_clouds=cfg.filter_clouds,
            cloud_area_threshold=cfg.cloud_area_threshold,
            cloud_proba_threshold=cfg.cloud_proba_threshold, average_month=cfg.average_month,
            max_dates=cfg.max_dates, scaling=cfg.sentinel_scaling, ref_month=ref_month,
            ref_day=ref_day)
        if move is not None and cfg.augment_sentinel:
            frames = augment_lib.apply_move(frames, move, spatial_axes=(1, 2))
        s, t = cfg.sentinel_size, cfg.num_dates
        return {
            "sentinel": tf.ensure_shape(frames, [t, s, s, sentinel_lib.SENTINEL_BANDS]),
            "sentinel_dates": tf.ensure_shape(dates, [t]),
            "sentinel_pad_mask": tf.ensure_shape(pad, [t]),
        }


# ------------------------------------------------------------------------------ builder


def make_dataset(file_pattern: str | Sequence[str], split: str, config: PipelineConfig,
                 batch_size: int, input_context: tf.distribute.InputContext | None = None,
                 training: bool | None = None, pad_final_batch: bool = False,
                 repeat: bool | None = None) -> tf.data.Dataset:
    """Builds the batched input pipeline of one split.

    Args:
      file_pattern: shard glob(s) (comma-separated or a list) or a records
        directory (then ``<dir>/<task>-<split>.tfrecord-*``); local or gs://.
        dataset_info.json must sit beside the shards.
      split: "train", "val", "test" (default of `training`; directory lookup).
      config: the `PipelineConfig`.
      batch_size: the GLOBAL batch size; each input pipeline batches
        ``input_context.get_per_replica_batch_size(batch_size)`` examples.
      input_context: from ``strategy.distribute_datasets_from_function``.
      training: shuffle, augment (if `config.augment`), drop the remainder;
        default ``split == "train"``.
      pad_final_batch: evaluation: pad the last batch(es) with examples whose
        ``features["valid"]`` is False, adding ``features["patch_id"]``, so
        every example is seen once with static shapes. Needs a finite dataset.
      repeat: repeat forever; default `training`.

    Returns:
      A `tf.data.Dataset` of ``(features, labels)`` (see docs/pipeline.md).
    """
    training = (split == "train") if training is None else training
    repeat = training if repeat is None else repeat
    if pad_final_batch and repeat:
        raise ValueError("pad_final_batch=True needs a finite dataset; pass repeat=False")
    files = resolve_files(file_pattern, config.task, split)
    info = schema.load_dataset_info(posixpath.dirname(files[0]))
    spec = schema.RecordSpec.from_info(info)
    if spec.task != config.task:
        raise ValueError(f"{posixpath.dirname(files[0])} holds {spec.task} records but "
                         f"config.task={config.task!r}; point to the {config.task} records")
    compression = info.get("compression") if config.compression is None else config.compression
    compression = compression or ""

    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    replicas_per_pipeline = (input_context.num_replicas_in_sync // num_pipelines
                             if input_context else 1)
    local_batch = (input_context.get_per_replica_batch_size(batch_size)
                   if input_context else batch_size)
    if local_batch < 1:
        raise ValueError(f"batch_size={batch_size} gives {local_batch} examples per replica")

    if training and config.shuffle_files:
        random.Random(config.seed).shuffle(files)  # same order on every host
    counts = _shard_counts(info, files)
    file_level = num_pipelines == 1 or len(files) >= num_pipelines
    if not file_level:
        logging.warning(
            "%d file(s) for %d input pipelines: sharding by example, every host reads every "
            "file. Convert with more shards (>= 8 per host) for speed.", len(files), num_pipelines)
    my_files = files[pipeline_id::num_pipelines] if file_level else files
    logging.info("%s %s: %d of %d files for input pipeline %d/%d, %d examples per replica batch",
                 config.task, split, len(my_files), len(files), pipeline_id, num_pipelines,
                 local_batch)

    deterministic = config.deterministic
    ds = tf.data.Dataset.from_tensor_slices(my_files)
    if training and config.shuffle_files:
        ds = ds.shuffle(len(my_files), seed=config.seed + pipeline_id, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression,
                                          buffer_size=read_buffer_size(my_files[0])),
        cycle_length=max(1, min(config.cycle_length, len(my_files))),
        block_length=config.block_length,
        num_parallel_calls=tf.data.AUTOTUNE,
        # example-level sharding needs the same order on every host
        deterministic=True if not file_level else deterministic)
    if not file_level:
        ds = ds.shard(num_pipelines, pipeline_id)
    if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=config.seed + pipeline_id,
                        reshuffle_each_iteration=True)
    if repeat:
        # Shuffle, then repeat: each epoch is seen whole before the next starts, and
        # every epoch draws a new file order and a new example order.
        ds = ds.repeat()
    parser = _Parser(config, spec, training, with_eval_keys=pad_final_batch)
    draws = lambda per_batch=0: augmentation_draws(  # noqa: E731
        config.seed, pipeline_id, num_pipelines, per_batch=per_batch)
    if parser.augment_here:
        # Each example's draw is seeded by its position in the stream: same seed, same draws.
        ds = tf.data.Dataset.zip((ds, draws()))
    ds = ds.map(parser, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

    if pad_final_batch:
        ds = _pad_and_batch(ds, local_batch, replicas_per_pipeline, counts, num_pipelines,
                            file_level, len(files))
    else:
        # A plain batch after the parallel map: tf.data fuses the two (map_and_batch_fusion),
        # so each example is written into its batch as soon as it is made (still hot in
        # cache) by the map's own threads: 4-7% less CPU per example than a parallel batch.
        ds = ds.batch(local_batch, drop_remainder=training)
    if parser.augment and parser.raw_aerial:
        # The same draws as above, a batch of them at a time, for `finish_batch`.
        ds = tf.data.Dataset.zip((ds, draws(local_batch))).map(
            lambda batch, moves: ({**batch[0], "augment_move": moves}, batch[1]))

    options = tf.data.Options()
    if deterministic is not None:
        options.deterministic = deterministic
    options.autotune.enabled = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    if config.private_threadpool_size:
        options.threading.private_threadpool_size = config.private_threadpool_size
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE if config.prefetch is None else config.prefetch)


def _pipeline_batches(counts: Sequence[int], num_pipelines: int, file_level: bool, local_batch: int,
                      replicas_per_pipeline: int) -> int:
    """Batches every evaluation pipeline yields: enough for the one that reads the most examples.

    Every example once, in batches of `local_batch`, the count rounded up to a
    multiple of the replicas the pipeline feeds (all-padding batches fill the
    last group).
    """
    if file_level:
        per_pipeline = [sum(counts[p::num_pipelines]) for p in range(num_pipelines)]
    else:
        total = sum(counts)
        per_pipeline = [len(range(p, total, num_pipelines)) for p in range(num_pipelines)]
    if not per_pipeline:
        return 0
    batches = math.ceil(max(per_pipeline) / local_batch)
    return math.ceil(batches / replicas_per_pipeline) * replicas_per_pipeline


def evaluation_steps(file_pattern: str | Sequence[str], split: str, config: PipelineConfig,
                     batch_size: int, num_input_pipelines: int = 1,
                     num_replicas_in_sync: int = 1) -> int | None:
    """Distributed steps of one evaluation pass (``make_dataset(..., pad_final_batch=True)``).

    A step takes one batch per replica, so this is the number of batches each
    input pipeline yields over the replicas it feeds; it is the same on every
    host (the pipeline that reads the most examples sets it, the others pad).
    Counting it up front lets a caller stop after exactly one pass, rather than
    find the end of a distributed dataset, which Keras does at the cost of
    empty steps in its averages.

    Args:
      file_pattern, split, config: as for `make_dataset` (only `config.task` matters).
      batch_size: the GLOBAL batch size.
      num_input_pipelines: input pipelines (hosts) the strategy runs.
      num_replicas_in_sync: replicas over all of them.

    Returns:
      The step count, or None when dataset_info.json lacks per-shard counts
      for these files (the pipelines then stop at their first all-padding
      group of batches, and may not agree).
    """
    if num_input_pipelines < 1 or num_replicas_in_sync % num_input_pipelines:
        raise ValueError(f"{num_replicas_in_sync} replicas do not divide among {num_input_pipelines} "
                         "input pipelines")
    files = resolve_files(file_pattern, config.task, split)
    counts = _shard_counts(schema.load_dataset_info(posixpath.dirname(files[0])), files)
    if counts is None:
        return None
    # As make_dataset: InputContext's per-replica batch, and its file- or example-level sharding.
    context = tf.distribute.InputContext(num_input_pipelines, 0, num_replicas_in_sync)
    replicas_per_pipeline = num_replicas_in_sync // num_input_pipelines
    local_batch = context.get_per_replica_batch_size(batch_size)
    file_level = num_input_pipelines == 1 or len(files) >= num_input_pipelines
    batches = _pipeline_batches(counts, num_input_pipelines, file_level, local_batch, replicas_per_pipeline)
    return batches // replicas_per_pipeline


def _pad_and_batch(ds: tf.data.Dataset, local_batch: int, replicas_per_pipeline: int,
                   counts: list[int] | None, num_pipelines: int, file_level: bool,
                   num_files: int) -> tf.data.Dataset:
    """Batches a finite dataset with padding examples (valid=False) after the last one.

    Every input pipeline yields the same number of batches, a multiple of its
    replicas, so a distributed evaluation step never waits for a missing
    batch; the count comes from dataset_info.json's per-shard counts.
    """
    padding = tf.data.Dataset.from_tensors(_zeros_like_spec(ds.element_spec))
    ds = ds.concatenate(padding.repeat())  # filler examples have valid == False
    ds = ds.batch(local_batch, drop_remainder=True)
    if counts is not None:
        steps = _pipeline_batches(counts, num_pipelines, file_level, local_batch, replicas_per_pipeline)
        logging.info("evaluation: %d batches per input pipeline (%d files)", steps, num_files)
        return ds.take(steps)
    logging.warning("dataset_info.json lists no counts for these files: the number of evaluation "
                    "batches may differ between hosts")
    # Stop at the first all-padding batch that starts a new group of replicas.
    ds = ds.enumerate().take_while(
        lambda i, batch: tf.reduce_any(batch[0]["valid"]) | (i % replicas_per_pipeline != 0))
    return ds.map(lambda i, batch: batch)
