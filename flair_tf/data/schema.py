"""The TFRecord format of flair_tf: the one module that knows feature keys.

Every example is stored as raw little-endian tensor bytes with fixed shapes
(image codecs cannot hold 5-band uint8 or uint16 stacks), so decoding is a
`tf.io.decode_raw` and a reshape: pure TensorFlow, usable in `tf.data.map`, in
a `tf.function` and on a TPU host.

Stored features (P = patch size, S = Sentinel crop size, T = number of dates):

==========================  =======  ===========  ==================================
key                         kind     dtype/shape  content
==========================  =======  ===========  ==================================
``aerial``                  bytes    u8 [P,P,4]   R, G, B, NIR
``elevation``               bytes    u8 [P,P,1]   the 5th band of IMG_*.tif
``label``                   bytes    u8 [P,P]     raw codes 1..19; empty if unlabelled
``has_label``               int64    []           1 if ``label`` holds a mask
``metadata/vector``         float    [45]         `metadata.encode_metadata` (quirk kept)
``metadata/month``          int64    []           month of the aerial acquisition
``metadata/date|time|camera`` bytes  []           the raw JSON strings
``metadata/centroid``       bytes    f64 [3]      patch_centroid_x, _y, _z
``patch_id|domain|zone``    bytes    []           "000717", "D004_2021", "Z8_NF"
``crs_wkt``                 bytes    []           CRS of the GeoTIFF as WKT
``transform``               bytes    f64 [6]      rasterio affine (a, b, c, d, e, f)
``sentinel/data``           bytes    u16 [T,S,S,10]  FLAIR #2: B2..B12, channels last
``sentinel/masks``          bytes    u8 [T,S,S,2]    FLAIR #2: snow, cloud (0..100)
``sentinel/dates``          bytes    i32 [T]      FLAIR #2: YYYYMMDD of each product
``sentinel/length``         int64    []           FLAIR #2: T
==========================  =======  ===========  ==================================

Byte layout (``byte_layout`` in dataset_info.json). Every record is a valid
``tf.train.Example``, readable by any protobuf parser. `serialize` writes the
"aligned64" layout: the five large arrays come first, in the order aerial,
elevation, label, sentinel/data, sentinel/masks, each payload starting at a
multiple of 64 bytes from the record's first byte (bytes features ``_pad0``..
``_pad4``, which decoding ignores, fill the gaps), then the other features
sorted by key. `decode` of such records copies the record once
(``decode_raw``) and takes every array as an aligned slice of that copy,
without copying it again: half the memory traffic of parsing each array out
first; the feature header before each payload read is checked. A record holds
at most `MAX_SENTINEL_DATES` dates. Records of the "protobuf" layout (any other
writer, e.g. ``tf.train.Example.SerializeToString``) are parsed feature by
feature.

Bump `SCHEMA_VERSION` on any change of keys or shapes; a new byte layout gets a
new name in `BYTE_LAYOUTS` (readers of older records keep working).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from flair_tf.data import metadata as metadata_lib

SCHEMA_VERSION = 1
TASKS = ("flair1", "flair2")
AERIAL_BANDS = ("R", "G", "B", "NIR")
ELEVATION_BANDS = ("E",)
SENTINEL_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
SENTINEL_MASK_BANDS = ("snow", "cloud")
DATASET_INFO_NAME = "dataset_info.json"
# Byte layouts of the records (module docstring): "protobuf" (features in any
# order, decoded by parsing) and "aligned64" (written by `serialize`).
BYTE_LAYOUTS = ("protobuf", "aligned64")
MAX_SENTINEL_DATES = 2047  # T of one record (the "aligned64" reader tabulates its headers)
ALIGNMENT = 64  # bytes: TensorFlow's tensor alignment, under which a slice shares its buffer
# The record features laid out first in "aligned64", in this order.
_SLOTS = ("aerial", "elevation", "label", "sentinel/data", "sentinel/masks")
# The aligned fast path views the raw bytes as little-endian numbers.
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """The fixed shapes of a set of records.

    Attributes:
      task: "flair1" or "flair2".
      patch_size: P, the aerial patch side (512 for the released data).
      sentinel_size: S, the Sentinel-2 crop side (FLAIR #2), None for FLAIR #1.
      byte_layout: "aligned64" for records written by `serialize` (the
        converter's), "protobuf" for any `tf.train.Example` with these
        features (always safe; slower to decode).
    """

    task: str
    patch_size: int
    sentinel_size: int | None = None
    byte_layout: str = "protobuf"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}. Received: task={self.task!r}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive. Received: {self.patch_size}")
        if self.task == "flair2" and not self.sentinel_size:
            raise ValueError("flair2 records need a sentinel_size (e.g. 40). Received: None")
        if self.task == "flair1" and self.sentinel_size is not None:
            raise ValueError(
                f"flair1 records have no Sentinel crop; sentinel_size must be None. "
                f"Received: {self.sentinel_size}"
            )
        if self.byte_layout not in BYTE_LAYOUTS:
            raise ValueError(f"byte_layout must be one of {BYTE_LAYOUTS}. Received: {self.byte_layout!r}")

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "RecordSpec":
        """Builds the spec from a parsed ``dataset_info.json``."""
        version = info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"records were written with schema version {version}, this code reads "
                f"version {SCHEMA_VERSION}; convert the data again with tools/convert_to_tfrecords.py"
            )
        return cls(
            task=info["task"],
            patch_size=int(info["patch_size"]),
            sentinel_size=None if info.get("sentinel_size") is None else int(info["sentinel_size"]),
            # Records converted before the aligned layout existed carry no byte_layout.
            byte_layout=info.get("byte_layout", "protobuf"),
        )

    def features(self) -> dict[str, dict[str, Any]]:
        """Shapes (None = variable T) and dtypes of what `decode` returns."""
        p, s = self.patch_size, self.sentinel_size
        out: dict[str, dict[str, Any]] = {
            "aerial": {"shape": [p, p, 4], "dtype": "uint8"},
            "elevation": {"shape": [p, p, 1], "dtype": "uint8"},
            "label": {"shape": [p, p], "dtype": "uint8"},
            "has_label": {"shape": [], "dtype": "bool"},
            "metadata": {"shape": [metadata_lib.METADATA_SIZE], "dtype": "float32"},
            "metadata_month": {"shape": [], "dtype": "int32"},
            "patch_id": {"shape": [], "dtype": "string"},
            "domain": {"shape": [], "dtype": "string"},
            "zone": {"shape": [], "dtype": "string"},
            "crs_wkt": {"shape": [], "dtype": "string"},
            "transform": {"shape": [6], "dtype": "float64"},
        }
        if self.task == "flair2":
            out.update(
                {
                    "sentinel_data": {"shape": [None, s, s, len(SENTINEL_BANDS)], "dtype": "uint16"},
                    "sentinel_masks": {"shape": [None, s, s, 2], "dtype": "uint8"},
                    "sentinel_dates": {"shape": [None], "dtype": "int32"},
                    "sentinel_length": {"shape": [], "dtype": "int32"},
                }
            )
        return out


# --------------------------------------------------------------------------- encode
#
# Records are serialized by hand in the protobuf wire format of `tf.train.Example`
# (in the "aligned64" order of the module docstring): building a
# `tf.train.Example` from Python copies every megabyte-sized feature several times,
# which cost more than reading the GeoTIFF. `encode` parses these bytes back into a
# `tf.train.Example`; a test checks both agree with protobuf's own serializer.

_BYTES, _FLOAT, _INT = 0x0A, 0x12, 0x1A  # Feature.bytes_list / float_list / int64_list tags


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf writes negative values
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class InPlace:
    """An array that `serialize` lets its producer write straight into the record.

    Instead of an array, an example may give ``InPlace(shape, dtype, fill)``
    for a large feature: `serialize` lays the record out, then calls
    ``fill(view)`` with the feature's place in the record as a writable array
    of that shape and dtype, and keeps that view in ``.array``. The converter
    has GDAL decode the aerial bands there, saving a copy of the record's
    largest arrays.

    Attributes:
      shape, dtype: of the array the feature holds.
      fill: writes the array into its argument (the record's view).
      array: that view, once `serialize` has called ``fill``.
    """

    def __init__(self, shape: Sequence[int], dtype, fill: Callable[[np.ndarray], Any]):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.fill = fill
        self.array: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _array(value: Any, dtype: str | np.dtype, shape: tuple, what: str, name: str) -> np.ndarray | InPlace:
    """``value`` checked and in the stored dtype; any strides (`serialize` copies it once)."""
    if isinstance(value, InPlace):
        value.dtype = _checked_dtype(value, dtype, shape, what, name)
        return value
    arr = np.asarray(value)
    return arr.astype(_checked_dtype(arr, dtype, shape, what, name), copy=False)


def _checked_dtype(arr, dtype, shape: tuple, what: str, name: str) -> np.dtype:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} has shape {arr.shape}, expected {tuple(shape)}")
    want = np.dtype(dtype)
    if arr.dtype.kind != want.kind or arr.dtype.itemsize != want.itemsize:
        raise ValueError(f"{name}: {what} has dtype {arr.dtype}, expected {want.name}")
    # The explicit little-endian dtype: a no-op on x86/ARM, a byte swap on big-endian hosts.
    return want


def _fields(example: Mapping[str, Any]) -> dict[str, tuple[int, Any]]:
    """Feature key -> (kind, value): bytes-like for _BYTES, float32 array for _FLOAT, int for _INT."""
    name = f"IMG_{example.get('patch_id', '?')}"
    aerial, elevation = (v if isinstance(v, InPlace) else np.asarray(v)
                         for v in (example["aerial"], example["elevation"]))
    if aerial.ndim != 3 or aerial.shape[0] != aerial.shape[1]:
        raise ValueError(f"{name}: aerial has shape {aerial.shape}, expected (P, P, 4)")
    p = aerial.shape[0]
    if elevation.ndim == 2 and not isinstance(elevation, InPlace):
        elevation = elevation[..., None]
    meta = example["metadata"]
    try:
        vector = metadata_lib.encode_metadata(meta)
        _, month, _ = metadata_lib.parse_date(str(meta["date"]))
        centroid = [float(meta[k]) for k in ("patch_centroid_x", "patch_centroid_y", "patch_centroid_z")]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{name}: bad metadata record: {e}") from e
    label = example.get("label")
    text = lambda v: (_BYTES, str(v).encode("utf-8"))  # noqa: E731
    fields = {
        "aerial": (_BYTES, _array(aerial, np.uint8, (p, p, 4), "aerial", name)),
        "elevation": (_BYTES, _array(elevation, np.uint8, (p, p, 1), "elevation", name)),
        "label": (_BYTES, b"" if label is None else _array(label, np.uint8, (p, p), "label", name)),
        "has_label": (_INT, int(label is not None)),
        "metadata/vector": (_FLOAT, vector.astype("<f4")),
        "metadata/month": (_INT, month),
        "metadata/date": text(meta["date"]),
        "metadata/time": text(meta["time"]),
        "metadata/camera": text(meta["camera"]),
        "metadata/centroid": (_BYTES, _array(centroid, "<f8", (3,), "centroid", name)),
        "patch_id": text(example["patch_id"]),
        "domain": text(example["domain"]),
        "zone": text(example["zone"]),
        "crs_wkt": text(example.get("crs_wkt") or ""),
        "transform": (_BYTES, _array(np.asarray(example["transform"], np.float64), "<f8", (6,), "transform", name)),
    }
    if "sentinel_data" in example:
        data = example["sentinel_data"]
        data = data if isinstance(data, InPlace) else np.asarray(data)
        if data.ndim != 4 or data.shape[1] != data.shape[2]:
            raise ValueError(f"{name}: sentinel_data has shape {data.shape}, expected (T, S, S, 10)")
        t, s = data.shape[0], data.shape[1]
        if t > MAX_SENTINEL_DATES:
            raise ValueError(f"{name}: {t} Sentinel-2 dates; a record holds at most {MAX_SENTINEL_DATES} "
                             "(a year of every Sentinel-2 product of one place is about 150)")
        dates = np.asarray(example["sentinel_dates"]).astype(np.int64)
        fields.update(
            {
                "sentinel/data": (_BYTES, _array(data, "<u2", (t, s, s, len(SENTINEL_BANDS)), "sentinel_data", name)),
                "sentinel/masks": (_BYTES, _array(example["sentinel_masks"], np.uint8, (t, s, s, 2), "sentinel_masks", name)),
                "sentinel/dates": (_BYTES, _array(dates.astype("<i4"), "<i4", (t,), "sentinel_dates", name)),
                "sentinel/length": (_INT, t),
            }
        )
    return fields


@functools.lru_cache(maxsize=256)
def _entry_head(key: str, kind: int, n: int) -> bytes:
    """Wire bytes of one ``Features.feature`` map entry up to its payload of `n` bytes."""
    inner = b"\x0a" + _varint(n)  # BytesList.value / packed FloatList or Int64List.value
    feature = bytes([kind]) + _varint(len(inner) + n)
    k = key.encode()
    entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(feature) + len(inner) + n)
    return b"\x0a" + _varint(len(entry) + len(feature) + len(inner) + n) + entry + feature + inner


@functools.lru_cache(maxsize=256)
def _padding(index: int, size: int) -> bytes:
    """A whole map entry ``_pad<index>`` (bytes feature of zeros) of exactly `size` wire bytes."""
    key = f"_pad{index}"
    for n in range(max(0, size - 32), size):
        head = _entry_head(key, _BYTES, n)
        if len(head) + n == size:
            return head + bytes(n)
    # The gaps filled are about 30..127 bytes; an entry needs at least 15.
    raise AssertionError(f"no padding entry of {size} bytes")


def _round_up(n, multiple: int = ALIGNMENT):
    """`n` rounded up to a multiple (Python ints or integer tensors)."""
    return (n + multiple - 1) // multiple * multiple


def _slot_starts(sizes: Sequence) -> list:
    """Payload offsets of the slotted arrays of "aligned64", given their sizes in slot order.

    The first starts at `ALIGNMENT`; each next one `ALIGNMENT` bytes after the
    previous one's end rounded up to a multiple of `ALIGNMENT`, which leaves 64
    to 127 bytes for a padding entry and the next feature's header.
    """
    starts, at = [], ALIGNMENT
    for size in sizes:
        starts.append(at)
        at = _round_up(at + size) + ALIGNMENT
    return starts


def serialize(example: Mapping[str, Any]) -> bytearray:
    """Serializes one patch into `tf.train.Example` bytes (the record written to shards).

    Deterministic: the same example always gives the same bytes. The layout is
    "aligned64" (module docstring): the large arrays first, each payload at a
    multiple of `ALIGNMENT` bytes, then the other features sorted by key. The
    record is laid out in one buffer whose size is computed first, and every
    array is copied into it exactly once (the aerial bands are transposed to
    channels-last by that copy). Args and errors as `encode`.

    Returns:
      The record, a `bytearray` (``tf.io.TFRecordWriter.write`` takes it as is).
    """
    fields = _fields(example)
    slots = [key for key in _SLOTS if key in fields]
    others = sorted(key for key in fields if key not in _SLOTS)
    plan: list[tuple[bytes, Any, int]] = []  # (wire bytes before the payload, payload, payload size)
    for key in slots + others:
        kind, value = fields[key]
        if kind == _BYTES:
            payload = value  # BytesList.value
        elif kind == _FLOAT:
            payload = value.tobytes()  # packed FloatList.value
        else:
            payload = _varint(value)  # packed Int64List.value
        n = payload.nbytes if isinstance(payload, (np.ndarray, InPlace)) else len(payload)
        plan.append((_entry_head(key, kind, n), payload, n))
    # Slot i's payload starts at starts[i]; a `_pad<i>` entry fills the bytes before its
    # header. The positions from the first payload on do not depend on the length of the
    # record's own size varint, which only changes the first padding.
    starts = _slot_starts([n for _, _, n in plan[:len(slots)]])
    end = starts[-1] + plan[len(slots) - 1][2] + sum(len(h) + n for h, _, n in plan[len(slots):])
    size_length = next(v for v in range(1, 11) if len(_varint(end - 1 - v)) == v)
    buf = bytearray(end)
    at = 0

    def put(data: bytes) -> None:
        nonlocal at
        buf[at:at + len(data)] = data
        at += len(data)

    put(b"\x0a" + _varint(end - 1 - size_length))  # Example.features
    for i, (head, payload, n) in enumerate(plan):
        if i < len(slots):
            put(_padding(i, starts[i] - len(head) - at))
        put(head)
        if isinstance(payload, InPlace):
            payload.array = np.frombuffer(buf, payload.dtype, n // payload.dtype.itemsize, at).reshape(payload.shape)
            payload.fill(payload.array)
            at += n
        elif isinstance(payload, np.ndarray):
            dst = np.frombuffer(buf, dtype=payload.dtype, count=payload.size, offset=at).reshape(payload.shape)
            if payload.ndim == 3 and payload.shape[-1] <= 8 and not payload.flags.c_contiguous:
                # A bands-first image viewed channels-last: one copy per band into the
                # interleaved record is 3x faster than numpy's generic transposing copy.
                for band in range(payload.shape[-1]):
                    dst[..., band] = payload[..., band]
            else:
                np.copyto(dst, payload)
            at += n
        else:
            put(payload)
    assert at == end, (at, end)
    return buf


def encode(example: Mapping[str, Any]) -> tf.train.Example:
    """Encodes one patch (numpy side) into a `tf.train.Example`.

    Args:
      example: a dict with
        ``aerial`` uint8 [P,P,4]; ``elevation`` uint8 [P,P,1] (or [P,P]);
        ``label`` uint8 [P,P] raw codes or None; ``metadata`` the patch's record
        of the metadata JSON (keys of `metadata.REQUIRED_KEYS`); ``patch_id``,
        ``domain``, ``zone``, ``crs_wkt`` str; ``transform`` 6 floats; and for
        FLAIR #2 ``sentinel_data`` uint16 [T,S,S,10], ``sentinel_masks`` uint8
        [T,S,S,2], ``sentinel_dates`` [T] YYYYMMDD integers.

    Returns:
      The `tf.train.Example`; `decode` gives back exactly these values. Use
      `serialize` for the record bytes (faster, same bytes).

    Raises:
      ValueError: on a wrong shape, dtype or metadata value; the message names the patch.
    """
    return tf.train.Example.FromString(bytes(serialize(example)))


# --------------------------------------------------------------------------- decode


# Record features each decoded key reads (the Sentinel arrays need their length too).
_SOURCES = {
    "aerial": ("aerial",),
    "elevation": ("elevation",),
    "label": ("label",),
    "has_label": ("has_label",),
    "metadata": ("metadata/vector",),
    "metadata_month": ("metadata/month",),
    "patch_id": ("patch_id",),
    "domain": ("domain",),
    "zone": ("zone",),
    "crs_wkt": ("crs_wkt",),
    "transform": ("transform",),
}
_RAW_METADATA_SOURCES = {
    "metadata_date": ("metadata/date",),
    "metadata_time": ("metadata/time",),
    "metadata_camera": ("metadata/camera",),
    "metadata_centroid": ("metadata/centroid",),
}
_SENTINEL_SOURCES = {
    "sentinel_data": ("sentinel/data", "sentinel/length"),
    "sentinel_masks": ("sentinel/masks", "sentinel/length"),
    "sentinel_dates": ("sentinel/dates", "sentinel/length"),
    "sentinel_length": ("sentinel/length",),
}
_INT64_FEATURES = ("has_label", "metadata/month", "sentinel/length")
# Decoded key -> its record feature, for the keys "aligned64" gives as slices.
_SLOTTED_KEYS = {key: names[0] for key, names in {**_SOURCES, **_SENTINEL_SOURCES}.items() if names[0] in _SLOTS}
SLICED_KEYS = tuple(_SLOTTED_KEYS)  # the decoded keys read as slices of "aligned64" records


def decoded_keys(spec: RecordSpec, with_raw_metadata: bool = False) -> tuple[str, ...]:
    """Every key `decode` can return for records of `spec`."""
    keys = list(_SOURCES)
    if with_raw_metadata:
        keys += list(_RAW_METADATA_SOURCES)
    if spec.task == "flair2":
        keys += list(_SENTINEL_SOURCES)
    return tuple(keys)


def _parse_spec(features: Sequence[str]) -> dict[str, Any]:
    out = {}
    for name in features:
        if name == "metadata/vector":
            out[name] = tf.io.FixedLenFeature([metadata_lib.METADATA_SIZE], tf.float32)
        elif name in _INT64_FEATURES:
            out[name] = tf.io.FixedLenFeature([], tf.int64)
        else:
            out[name] = tf.io.FixedLenFeature([], tf.string)
    return out


def _raw(value: tf.Tensor, dtype: tf.DType, shape) -> tf.Tensor:
    return tf.reshape(tf.io.decode_raw(value, dtype, little_endian=True), shape)


def decode(
    serialized: tf.Tensor, spec: RecordSpec, with_raw_metadata: bool = False,
    keys: Sequence[str] | None = None,
) -> dict[str, tf.Tensor]:
    """Decodes one serialized record (pure TF; graph- and `tf.data`-safe).

    Args:
      serialized: a scalar string tensor (one record).
      spec: the `RecordSpec` of the records (`RecordSpec.from_info`).
      with_raw_metadata: also return ``metadata_date``, ``metadata_time``,
        ``metadata_camera`` (strings) and ``metadata_centroid`` (float64 [3]).
      keys: the decoded keys wanted (default: all of `decoded_keys`); the
        other features of the record are not even parsed (a training
        pipeline needs 3 of FLAIR #1's 11).

    Returns:
      ``aerial`` uint8 [P,P,4], ``elevation`` uint8 [P,P,1], ``label`` uint8
      [P,P] (zeros when ``has_label`` is False), ``has_label`` bool,
      ``metadata`` float32 [45], ``metadata_month`` int32, ``patch_id``,
      ``domain``, ``zone``, ``crs_wkt`` strings, ``transform`` float64 [6]; and
      for FLAIR #2 ``sentinel_data`` uint16 [T,S,S,10], ``sentinel_masks`` uint8
      [T,S,S,2], ``sentinel_dates`` int32 [T] (YYYYMMDD), ``sentinel_length``
      int32 (= T). Only `keys` when given.

    Raises:
      ValueError: a key of `keys` that these records cannot give.
    """
    available = decoded_keys(spec, with_raw_metadata)
    keys = available if keys is None else tuple(keys)
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ValueError(f"cannot decode {unknown} from {spec.task} records"
                         f"{'' if with_raw_metadata else ' (without with_raw_metadata)'}; "
                         f"choose from {list(available)}")
    sources = {**_SOURCES, **_RAW_METADATA_SOURCES, **_SENTINEL_SOURCES}
    p = spec.patch_size
    s, nb = spec.sentinel_size, len(SENTINEL_BANDS)
    sliced = [k for k in keys if k in _SLOTTED_KEYS] if spec.byte_layout == "aligned64" and _LITTLE_ENDIAN else []
    features = [name for k in keys if k not in sliced for name in sources[k]]
    if sliced:
        # Slot sizes: the label's depends on has_label, the Sentinel arrays' on T.
        last = max(_SLOTS.index(_SLOTTED_KEYS[k]) for k in sliced)
        features += ["has_label"] if last >= _SLOTS.index("label") else []
        features += ["sentinel/length"] if last >= _SLOTS.index("sentinel/data") else []
    features = list(dict.fromkeys(features))
    f = tf.io.parse_single_example(serialized, _parse_spec(features)) if features else {}
    t = tf.cast(f["sentinel/length"], tf.int32) if "sentinel/length" in f else None

    def label_from(codes):
        # Unlabelled records store no label bytes: pad to P*P zeros (no tf.cond needed).
        return tf.reshape(tf.pad(codes, [[0, p * p - tf.size(codes)]]), [p, p])

    build = {
        "aerial": lambda: _raw(f["aerial"], tf.uint8, [p, p, 4]),
        "elevation": lambda: _raw(f["elevation"], tf.uint8, [p, p, 1]),
        "label": lambda: label_from(tf.io.decode_raw(f["label"], tf.uint8)),
        "has_label": lambda: tf.cast(f["has_label"], tf.bool),
        "metadata": lambda: f["metadata/vector"],
        "metadata_month": lambda: tf.cast(f["metadata/month"], tf.int32),
        "transform": lambda: _raw(f["transform"], tf.float64, [6]),
        "metadata_centroid": lambda: _raw(f["metadata/centroid"], tf.float64, [3]),
        "sentinel_data": lambda: _raw(f["sentinel/data"], tf.uint16, [t, s, s, nb]),
        "sentinel_masks": lambda: _raw(f["sentinel/masks"], tf.uint8, [t, s, s, 2]),
        "sentinel_dates": lambda: tf.ensure_shape(_raw(f["sentinel/dates"], tf.int32, [t]), [None]),
        "sentinel_length": lambda: t,
    }
    if sliced:
        arrays = _sliced_arrays(serialized, spec, f, sliced)
        if "label" in arrays:
            arrays["label"] = label_from(arrays["label"])
        build.update({k: (lambda v=v: v) for k, v in arrays.items()})
    out = {k: build[k]() if k in build else f[sources[k][0]] for k in keys}
    for key in ("sentinel_data", "sentinel_masks"):
        if key in out:
            out[key] = tf.ensure_shape(out[key], [None, s, s, nb if key == "sentinel_data" else 2])
    return out


_HEAD_WIDTH = 48  # bytes: more than any entry header of a slotted feature (at most 40)


@functools.lru_cache(maxsize=64)
def _head_table(key: str, unit: int, rows: int) -> np.ndarray:
    """`_entry_head` of `key` for payloads of ``unit * r`` bytes, r < rows.

    int16 [rows, _HEAD_WIDTH]: each header right-aligned, -1 before it.
    """
    table = np.full((rows, _HEAD_WIDTH), -1, np.int16)
    for r in range(rows):
        head = np.frombuffer(_entry_head(key, _BYTES, unit * r), np.uint8)
        table[r, _HEAD_WIDTH - len(head):] = head
    return table


def _sliced_arrays(serialized: tf.Tensor, spec: RecordSpec, parsed: Mapping[str, tf.Tensor],
                   keys: Sequence[str]) -> dict[str, tf.Tensor]:
    """The slotted arrays `keys` of an "aligned64" record: slices of one copy of it.

    ``tf.io.decode_raw`` copies the record once into an aligned uint8 tensor;
    a slice of it that starts and ends at multiples of `ALIGNMENT` bytes shares
    its buffer (TensorFlow's aligned dim-0 slice), and reshape and bitcast do
    too. The wire bytes just before each slot's payload must be its feature's
    map entry header (key and size), so a record in another layout fails with
    an error instead of giving garbage, even a re-serialized record whose
    first features happen to keep their places.
    """
    p, s, nb = spec.patch_size, spec.sentinel_size, len(SENTINEL_BANDS)
    raw = tf.io.decode_raw(serialized, tf.uint8)
    # Slot i holds counts[i] units of units[i] bytes: the label has_label images, a Sentinel-2
    # array T dates (the slots after the last one read are left out).
    units = [p * p * 4, p * p]
    counts = [None, None]
    if "has_label" in parsed:
        units.append(p * p)
        counts.append(parsed["has_label"])
    if "sentinel/length" in parsed:
        units += [s * s * nb * 2, s * s * 2]
        counts += [parsed["sentinel/length"]] * 2
    sizes = [u if c is None else c * u for u, c in zip(units, counts)]
    starts = _slot_starts(sizes)

    slots = sorted(_SLOTS.index(_SLOTTED_KEYS[k]) for k in keys)
    # The record's bytes just before each payload read must be that slot's entry header. Every
    # header a slot can have is tabulated (computing them in the graph cost 5% of the FLAIR #2
    # pipeline): has_label 0 or 1, T up to MAX_SENTINEL_DATES.
    headers = []
    for i in slots:
        if counts[i] is None:
            headers.append(tf.constant(_head_table(_SLOTS[i], units[i], 2)[1]))
        else:
            table = _head_table(_SLOTS[i], units[i], 2 if _SLOTS[i] == "label" else MAX_SENTINEL_DATES + 1)
            headers.append(tf.gather(tf.constant(table), tf.minimum(counts[i], len(table) - 1)))
    at = tf.cast(tf.stack([starts[i] for i in slots]), tf.int64)[:, None] + tf.range(-_HEAD_WIDTH, 0, dtype=tf.int64)
    window = tf.cast(tf.gather(raw, tf.minimum(at, tf.size(raw, out_type=tf.int64) - 1)), tf.int16)
    header = tf.stack(headers)
    check = tf.debugging.Assert(
        tf.reduce_all(tf.logical_or(header < 0, tf.equal(window, header))),
        ["record is not in the aligned64 byte layout that dataset_info.json declares "
         "(byte_layout); convert the data again with tools/convert_to_tfrecords.py"])

    def piece(i):
        with tf.control_dependencies([check]):
            return tf.slice(raw, tf.cast(tf.reshape(starts[i], [1]), tf.int64),
                            tf.cast(tf.reshape(sizes[i], [1]), tf.int64))

    def uint16(x):
        return tf.reshape(tf.bitcast(tf.reshape(x, [-1, 2]), tf.uint16), [-1])

    build = {
        "aerial": lambda: tf.reshape(piece(0), [p, p, 4]),
        "elevation": lambda: tf.reshape(piece(1), [p, p, 1]),
        "label": lambda: piece(2),  # the codes; unpadded (empty when unlabelled)
        "sentinel_data": lambda: tf.reshape(uint16(piece(3)), tf.stack([parsed["sentinel/length"], s, s, nb])),
        "sentinel_masks": lambda: tf.reshape(piece(4), tf.stack([parsed["sentinel/length"], s, s, 2])),
    }
    return {k: build[k]() for k in keys}


# --------------------------------------------------------------------------- files


def shard_name(task: str, split: str, index: int, num_shards: int) -> str:
    """``flair1-train.tfrecord-00003-of-00064``."""
    return f"{task}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def shard_pattern(directory: str, task: str, split: str) -> str:
    """Glob of the finished shards of one split (matches no ``.incomplete`` file)."""
    return posixpath.join(directory, f"{task}-{split}.tfrecord-?????-of-?????")


def load_dataset_info(dir_or_file: str) -> dict:
    """Reads ``dataset_info.json`` given its path or the records directory."""
    path = dir_or_file
    if not path.endswith(".json"):
        path = posixpath.join(path, DATASET_INFO_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; convert the data first with tools/convert_to_tfrecords.py"
        )
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)

