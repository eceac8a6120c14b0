"""The 45-value aerial metadata encoding of the FLAIR baselines.

Order (spec flair1 §2.4): coordinates (32) + altitude (1) + camera (2) + date/time (10).

The reference computes the month terms as ``sin(2*pi*(month - 1/12))``: an
operator-precedence slip that makes them the same for every month (0.25 and
0.933013 after the [-1,1] -> [0,1] mapping). ``fix_month_quirk=True`` uses
``sin(2*pi*(month - 1)/12)`` instead; the default reproduces the reference, so
released checkpoints see the inputs they were trained on.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

METADATA_SIZE = 45
REQUIRED_KEYS = (
    "domain",
    "zone",
    "patch_centroid_x",
    "patch_centroid_y",
    "patch_centroid_z",
    "date",
    "time",
    "camera",
)
# Altitude normaliser: the dataset maximum used by the reference.
ALTITUDE_MAX = 3164.9099121094
YEARS = (2018, 2019, 2020, 2021)
_COORD_SCALE = 10e7  # = 1e8, as written in the reference


def encode_coordinates(x: float, y: float, size: int = 32) -> np.ndarray:
    """Sinusoidal encoding of Lambert-93 coordinates (the reference `coordenc_opt`)."""
    d = size // 2
    d_i = np.arange(0, d // 2)
    freq = 1.0 / (_COORD_SCALE ** (2 * d_i / d))
    xs, ys = x / _COORD_SCALE, y / _COORD_SCALE
    enc = np.zeros(size, dtype=np.float64)
    enc[0:d:2] = np.sin(xs * freq)
    enc[1:d:2] = np.cos(xs * freq)
    enc[d::2] = np.sin(ys * freq)
    enc[d + 1 :: 2] = np.cos(ys * freq)
    return enc


def _unit(v: float) -> float:
    return (v + 1.0) / 2.0


def parse_date(date: str) -> tuple[int, int, int]:
    """'YYYY-MM-DD' -> (year, month, day)."""
    try:
        year, month, day = (int(p) for p in date.split("-"))
    except ValueError as e:
        raise ValueError(f"date must look like 'YYYY-MM-DD'. Received: date={date!r}") from e
    return year, month, day


def parse_time(time: str) -> tuple[int, int]:
    """'HHhMM' -> (hours, minutes)."""
    try:
        hours, minutes = (int(p) for p in time.split("h"))
    except ValueError as e:
        raise ValueError(f"time must look like 'HHhMM'. Received: time={time!r}") from e
    return hours, minutes


def missing_keys(meta: Mapping[str, Any]) -> list[str]:
    """The `REQUIRED_KEYS` a metadata record lacks, in their order."""
    return [k for k in REQUIRED_KEYS if k not in meta]


def encode_metadata(meta: Mapping[str, Any], fix_month_quirk: bool = False) -> np.ndarray:
    """Encodes one patch's metadata record into the reference 45-value vector.

    Args:
      meta: a record of the metadata JSON (keys of `REQUIRED_KEYS`).
      fix_month_quirk: use the intended month encoding instead of the
        reference's constant one (changes values 39 and 40 only).

    Returns:
      float64 array of shape (45,).

    Raises:
      KeyError / ValueError: on a missing key or an unparsable value.
    """
    missing = missing_keys(meta)
    if missing:
        raise KeyError(f"metadata record lacks {missing}; expected keys {list(REQUIRED_KEYS)}")
    coords = encode_coordinates(float(meta["patch_centroid_x"]), float(meta["patch_centroid_y"]))
    altitude = max(float(meta["patch_centroid_z"]), 0.0) / ALTITUDE_MAX
    camera = [1.0, 0.0] if "UCE" in str(meta["camera"]) else [0.0, 1.0]
    year, month, day = parse_date(str(meta["date"]))
    if year not in YEARS:
        raise ValueError(
            f"metadata year {year} is outside the reference one-hot {list(YEARS)} "
            f"(date={meta['date']!r})"
        )
    year_onehot = [1.0 if year == y else 0.0 for y in YEARS]
    if fix_month_quirk:
        month_angle = 2 * math.pi * (month - 1) / 12
    else:
        month_angle = 2 * math.pi * (month - 1 / 12)  # the reference's precedence slip
    hours, minutes = parse_time(str(meta["time"]))
    seconds = hours * 3600 + minutes * 60
    cyclic = [
        math.sin(month_angle),
        math.cos(month_angle),
        math.sin(2 * math.pi * day / 31),
        math.cos(2 * math.pi * day / 31),
        math.sin(2 * math.pi * seconds / 86400),
        math.cos(2 * math.pi * seconds / 86400),
    ]
    vec = np.concatenate(
        [coords, [altitude], camera, year_onehot, [_unit(v) for v in cyclic]]
    ).astype(np.float64)
    assert vec.shape == (METADATA_SIZE,)
    return vec
