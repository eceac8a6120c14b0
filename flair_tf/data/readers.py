"""Validating readers for the FLAIR #1 / #2 files.

Every reader checks what it reads against the released format (spec flair1 §1,
flair2 §1) and raises `FlairDataError` naming the file, what was found and what
was expected, so a corrupt or foreign file fails at conversion time with a
message a person can act on rather than deep inside a training step.

* Aerial patch ``IMG_<id>.tif``: 5 bands (R, G, B, NIR, elevation), uint8,
  512 x 512 (or the size declared by the caller).
* Mask ``MSK_<id>.tif``: 1 band, uint8, codes 1..19.
* Metadata JSON: ``{"IMG_<id>": {8 keys}}``.
* Centroid JSON (FLAIR #2): ``{"IMG_<id>.tif": [row, col]}``.
* Sentinel-2 super-area (FLAIR #2): ``*_data.npy`` (T, 10, H, W) uint16,
  ``*_masks.npy`` (T, 2, H, W) uint8 in 0..100 (channel 0 snow, 1 cloud),
  ``*_products.txt`` with T product names carrying the acquisition dates.

Local paths are read directly; ``gs://`` paths are opened by rasterio through
GDAL's ``/vsigs/`` driver (rasters) and through ``tf.io.gfile`` (JSON, text,
.npy, which are then read into memory instead of memory-mapped).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import re
from typing import Any

import numpy as np
from absl import logging

from flair_tf.data import metadata as metadata_lib

NUM_AERIAL_BANDS = 5
AERIAL_BANDS = ("R", "G", "B", "NIR", "elevation")
NUM_SENTINEL_BANDS = 10
SENTINEL_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
SENTINEL_MASK_CHANNELS = ("snow", "cloud")
DEFAULT_PATCH_SIZE = 512
MIN_CODE, MAX_CODE = 1, 19

# ESA L2A product name, e.g. S2A_MSIL2A_20210415T105021_N0300_R051_T31UDP_20210415T135921.
# The acquisition date is characters 11:19 (the reference reads MMDD from 15:19).
_PRODUCT_RE = re.compile(r"^S2[A-D]_MSI(L1C|L2A)_(\d{8})T\d{6}_")
_IMG_KEY_RE = re.compile(r"^IMG_\d+$")


class FlairDataError(ValueError):
    """A FLAIR file does not match the released format.

    The message names the file, what was found and what was expected.
    """


@dataclasses.dataclass(frozen=True)
class GeoRef:
    """Georeferencing of a patch, enough to write predictions as GeoTIFFs.

    Attributes:
      crs_wkt: the CRS as WKT (Lambert-93, EPSG:2154, for FLAIR).
      transform: the rasterio affine ``(a, b, c, d, e, f)``: x = a*col + b*row + c,
        y = d*col + e*row + f, in CRS units, for the pixel's top-left corner.
    """

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]


@dataclasses.dataclass
class SentinelSeries:
    """One Sentinel-2 super-area time series.

    Attributes:
      data: (T, 10, H, W) reflectance x 10,000, uint16 (memory-mapped when read
        with ``mmap=True``).
      masks: (T, 2, H, W) uint8 snow (0) and cloud (1) probabilities, 0..100.
      dates: the T acquisition dates parsed from the product names.
      products: the T product names, in the order of the T axis.
      name: the data file, for error messages.
    """

    data: np.ndarray
    masks: np.ndarray
    dates: list[datetime.date]
    products: list[str]
    name: str = ""


def is_remote(path: str) -> bool:
    """True for paths GDAL and TensorFlow reach through a network file system (gs://...)."""
    return "://" in str(path)


def _read_bytes(path: str) -> bytes:
    if is_remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _base(path: str) -> str:
    return os.path.basename(str(path))


def _open_raster(path: str):
    import rasterio  # pylint: disable=g-import-not-at-top

    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise FlairDataError(f"{path}: cannot be opened as a GeoTIFF ({e})") from e


def _check_raster(src, path: str, bands: int, size: int | None, what: str) -> None:
    if src.count != bands:
        raise FlairDataError(
            f"{_base(path)} has {src.count} band(s), expected {bands} ({what}) [{path}]"
        )
    dtypes = set(src.dtypes)
    if dtypes != {"uint8"}:
        raise FlairDataError(
            f"{_base(path)} has dtype {'/'.join(sorted(dtypes))}, expected uint8 [{path}]"
        )
    if size is not None and (src.height, src.width) != (size, size):
        raise FlairDataError(
            f"{_base(path)} is {src.height}x{src.width} px, expected {size}x{size} "
            f"(pass the declared patch size if the tree is not 512 px) [{path}]"
        )


def read_image(
    path: str, size: int | None = DEFAULT_PATCH_SIZE, channels_last: bool = True
) -> tuple[np.ndarray, GeoRef]:
    """Reads an aerial patch ``IMG_<id>.tif``.

    Args:
      path: the GeoTIFF (local, or ``gs://`` through GDAL's /vsigs/).
      size: the expected height and width; None accepts any size.
      channels_last: False returns the array as read, (5, H, W), saving a
        transposing copy for callers that split the bands anyway.

    Returns:
      ``(image, georef)``: uint8 (H, W, 5) channels-last R, G, B, NIR, elevation
      (or (5, H, W) when ``channels_last=False``), and the patch's `GeoRef`.

    Raises:
      FlairDataError: wrong band count, dtype or size, or an unreadable file.
    """
    with _open_raster(path) as src:
        check_image_raster(src, path, size)
        image = src.read()
        georef = GeoRef(*georef_of(src))
    if not channels_last:
        return image, georef
    return np.ascontiguousarray(np.transpose(image, (1, 2, 0))), georef


def open_pixels(path: str):
    """Opens a GeoTIFF for its pixels only: GDAL skips the georeferencing (a local path).

    Reading a patch's CRS costs GDAL about 0.7 ms per open (a PROJ database
    lookup); `read_georef` and `geotiff.GeorefCache` give it once per file
    type. Remote paths are opened as usual.
    """
    if is_remote(path):
        return _open_raster(path)
    import warnings  # pylint: disable=g-import-not-at-top

    import rasterio  # pylint: disable=g-import-not-at-top

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path, GEOREF_SOURCES="NONE")
    except rasterio.errors.RasterioIOError as e:
        raise FlairDataError(f"{path}: cannot be opened as a GeoTIFF ({e})") from e


def check_image_raster(src, path: str, size: int | None = DEFAULT_PATCH_SIZE) -> None:
    """Raises `FlairDataError` unless the open raster `src` is an aerial patch (`read_image`)."""
    _check_raster(src, path, NUM_AERIAL_BANDS, size, "R,G,B,NIR,elevation")


def check_mask_raster(src, path: str, size: int | None = DEFAULT_PATCH_SIZE) -> None:
    """Raises `FlairDataError` unless the open raster `src` is a label mask (`read_mask`)."""
    _check_raster(src, path, 1, size, "class codes")


def read_georef(path: str) -> tuple[str, tuple[float, ...]]:
    """``(crs_wkt, transform)`` of a GeoTIFF as GDAL reads them (a full open)."""
    with _open_raster(path) as src:
        return georef_of(src)


def georef_of(src) -> tuple[str, tuple[float, ...]]:
    """``(crs_wkt, transform)`` of a raster opened with its georeferencing."""
    t = src.transform
    return (src.crs.to_wkt() if src.crs is not None else ""), (t.a, t.b, t.c, t.d, t.e, t.f)


def check_codes(mask: np.ndarray, name: str) -> None:
    """Raises `FlairDataError` unless every value of `mask` is a code 1..19."""
    bad = (mask < MIN_CODE) | (mask > MAX_CODE)
    if bad.any():
        values, counts = np.unique(mask[bad], return_counts=True)
        found = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in zip(values[:10], counts[:10]))
        raise FlairDataError(
            f"{_base(name)} holds value(s) outside the FLAIR codes: {found}; "
            f"expected codes {MIN_CODE}..{MAX_CODE} (masks are 1-based; a 0-based mask "
            f"needs +1) [{name}]"
        )


def read_mask(path: str, size: int | None = DEFAULT_PATCH_SIZE) -> np.ndarray:
    """Reads a label mask ``MSK_<id>.tif``.

    Args:
      path: the GeoTIFF.
      size: the expected height and width; None accepts any size.

    Returns:
      uint8 (H, W) raw FLAIR codes, all in 1..19.

    Raises:
      FlairDataError: wrong band count, dtype, size, or a code outside 1..19
        (the message lists the offending values).
    """
    with _open_raster(path) as src:
        check_mask_raster(src, path, size)
        mask = src.read(1)
    check_codes(mask, path)
    return mask


def _load_json(path: str) -> Any:
    try:
        return json.loads(_read_bytes(path))
    except FileNotFoundError as e:
        raise FlairDataError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlairDataError(f"{_base(path)} is not valid JSON ({e}) [{path}]") from e


def read_metadata_json(path: str, strict: bool = True) -> dict[str, dict]:
    """Reads the aerial metadata JSON (``flair-1_metadata_aerial.json`` ...).

    Args:
      path: the JSON file.
      strict: raise on the first bad record. With False (conversion with
        ``--on_error=skip``), a record lacking a required key is kept as it is,
        so that encoding its patch fails and the patch alone is skipped with
        the key named; an entry that is not ``"IMG_<id>": {...}`` is left out
        with a warning (no patch could use it).

    Returns:
      ``{"IMG_000717": {"domain": ..., "zone": ..., "patch_centroid_x": ..., ...}}``.

    Raises:
      FlairDataError: not a JSON object keyed ``IMG_<id>``, or (`strict`) a
        record without one of `metadata.REQUIRED_KEYS`.
    """
    content = _load_json(path)
    if not isinstance(content, dict):
        raise FlairDataError(
            f"{_base(path)} holds a JSON {type(content).__name__}, expected an object "
            f'keyed "IMG_<id>" [{path}]'
        )
    out = {}
    for key, record in content.items():
        name = key[:-4] if key.endswith(".tif") else key
        if not _IMG_KEY_RE.match(name) or not isinstance(record, dict):
            message = f'{_base(path)}: entry {key!r} is not "IMG_<id>": {{...}} [{path}]'
            if strict:
                raise FlairDataError(message)
            logging.warning("%s; ignored", message)
            continue
        missing = metadata_lib.missing_keys(record)
        if missing and strict:
            raise FlairDataError(
                f"{_base(path)}: record {key} lacks {missing}; expected keys "
                f"{list(metadata_lib.REQUIRED_KEYS)} [{path}]"
            )
        out[name] = record
    return out


def read_centroids_json(path: str) -> dict[str, tuple[int, int]]:
    """Reads ``flair-2_centroids_sp_to_patch.json``.

    Returns:
      ``{"IMG_000001": (row, col)}``: the patch centre's pixel in its zone's
      Sentinel super-area (the file's ``.tif`` suffix stripped from the keys).

    Raises:
      FlairDataError: a key that is not an image name or a value that is not two
        integers.
    """
    content = _load_json(path)
    if not isinstance(content, dict):
        raise FlairDataError(
            f"{_base(path)} holds a JSON {type(content).__name__}, expected an object "
            f'{{"IMG_<id>.tif": [row, col]}} [{path}]'
        )
    out = {}
    for key, value in content.items():
        name = key[:-4] if key.endswith(".tif") else key
        ok = (
            _IMG_KEY_RE.match(name)
            and isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and float(v).is_integer() for v in value)
        )
        if not ok:
            raise FlairDataError(
                f"{_base(path)}: entry {key!r}: {value!r} is not "
                f'"IMG_<id>.tif": [row, col] with integer row and col [{path}]'
            )
        out[name] = (int(value[0]), int(value[1]))
    return out


def lookup_centroid(centroids: dict[str, tuple[int, int]], name: str,
                    json_path: str = "the centroid JSON") -> tuple[int, int]:
    """The ``(row, col)`` of patch `name` ("IMG_000717") in `centroids`.

    Raises:
      FlairDataError: the patch has no entry (the message names the JSON).
    """
    key = name[:-4] if name.endswith(".tif") else name
    try:
        return centroids[key]
    except KeyError:
        raise FlairDataError(
            f"{_base(json_path)} has no entry for {key}.tif; expected one [row, col] per aerial "
            f"patch of the FLAIR #2 tree [{json_path}]"
        ) from None


def parse_product_date(product: str) -> datetime.date:
    """The acquisition date of a Sentinel-2 product name (characters 11:19).

    Raises:
      ValueError: if the name is not an ESA ``S2x_MSIxxx_YYYYMMDDTHHMMSS_...`` name.
    """
    m = _PRODUCT_RE.match(product)
    if not m:
        raise ValueError(f"{product!r} is not a Sentinel-2 product name")
    return datetime.datetime.strptime(m.group(2), "%Y%m%d").date()


def read_products(path: str, expected_length: int | None = None) -> list[datetime.date]:
    """Reads a ``*_products.txt`` file and parses the acquisition dates.

    Args:
      path: the text file, one product name a line (blank lines ignored).
      expected_length: T of the matching ``*_data.npy``; None skips the check.

    Returns:
      The dates, in file order.

    Raises:
      FlairDataError: a line is not a product name (the message gives the line
        number) or the number of products differs from `expected_length`.
    """
    return _parse_products(path, expected_length)[0]


def _parse_products(path: str, expected_length: int | None) -> tuple[list[datetime.date], list[str]]:
    try:
        text = _read_bytes(path).decode("utf-8")
    except FileNotFoundError as e:
        raise FlairDataError(f"{path}: file not found") from e
    dates, names = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            dates.append(parse_product_date(line))
        except ValueError as e:
            raise FlairDataError(
                f"{_base(path)} line {lineno}: cannot parse {line!r}; expected a product name "
                f"like S2A_MSIL2A_20210415T105021_N0300_R051_T31UDP_20210415T135921 [{path}]"
            ) from e
        names.append(line)
    if expected_length is not None and len(dates) != expected_length:
        raise FlairDataError(
            f"{_base(path)} lists {len(dates)} product(s), expected {expected_length} "
            f"(one per date of the data array) [{path}]"
        )
    return dates, names


def _load_npy(path: str, mmap: bool) -> np.ndarray:
    try:
        if is_remote(path):
            return np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as e:
        raise FlairDataError(f"{path}: file not found") from e
    except (ValueError, OSError, EOFError) as e:
        raise FlairDataError(
            f"{_base(path)} is not a readable .npy array (truncated or corrupt?): {e} [{path}]"
        ) from e


def read_sentinel(files, mmap: bool = True) -> SentinelSeries:
    """Reads and validates one zone's Sentinel-2 super-area.

    Args:
      files: a `layout.SentinelFiles` (data, masks, products paths).
      mmap: memory-map the .npy arrays (local files only), so cropping a
        40 x 40 window does not read the whole super-area.

    Returns:
      A `SentinelSeries`.

    Raises:
      FlairDataError: truncated/corrupt arrays, wrong rank, band count or dtype,
        data and masks that disagree on T or H x W, or a products file whose
        length differs from T.
    """
    data = _load_npy(files.data, mmap)
    masks = _load_npy(files.masks, mmap)
    if data.ndim != 4 or data.shape[1] != NUM_SENTINEL_BANDS:
        raise FlairDataError(
            f"{_base(files.data)} has shape {data.shape}, expected (T, 10, H, W) "
            f"(bands {','.join(SENTINEL_BANDS)}) [{files.data}]"
        )
    if data.dtype not in (np.uint16, np.int16):
        raise FlairDataError(
            f"{_base(files.data)} has dtype {data.dtype}, expected uint16 (reflectance x 10,000) "
            f"[{files.data}]"
        )
    if masks.ndim != 4 or masks.shape[1] != len(SENTINEL_MASK_CHANNELS):
        raise FlairDataError(
            f"{_base(files.masks)} has shape {masks.shape}, expected (T, 2, H, W) "
            f"(snow, cloud probabilities) [{files.masks}]"
        )
    if masks.dtype != np.uint8:
        raise FlairDataError(
            f"{_base(files.masks)} has dtype {masks.dtype}, expected uint8 (0..100) [{files.masks}]"
        )
    if masks.shape[0] != data.shape[0]:
        raise FlairDataError(
            f"{_base(files.masks)} has {masks.shape[0]} dates, expected T={data.shape[0]} "
            f"as in {_base(files.data)} [{files.masks}]"
        )
    if masks.shape[2:] != data.shape[2:]:
        raise FlairDataError(
            f"{_base(files.masks)} covers {masks.shape[2]}x{masks.shape[3]} px, expected "
            f"{data.shape[2]}x{data.shape[3]} as in {_base(files.data)} [{files.masks}]"
        )
    dates, products = _parse_products(files.products, expected_length=data.shape[0])
    if dates != sorted(dates) or len({d.year for d in dates}) > 1:
        logging.warning(
            "%s: dates are not sorted within one year; the reference monthly averaging "
            "assumes they are.", files.products)
    return SentinelSeries(data=data, masks=masks, dates=dates, products=products, name=files.data)


def crop_sentinel(
    series: SentinelSeries, centroid: tuple[int, int], size: int = 40, name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Crops the super-patch of one aerial patch, as the reference does.

    Rows ``r - size/2 : r + size/2`` and columns ``c - size/2 : c + size/2``
    around the centroid ``(r, c)`` of the centroid JSON.

    Args:
      series: the zone's `SentinelSeries`.
      centroid: ``(row, col)`` of the patch centre in the super-area.
      size: the crop's side S (even; the reference uses 40, 8..112 allowed).
      name: the patch name, for error messages.

    Returns:
      ``(data, masks)``: uint16 (T, S, S, 10) and uint8 (T, S, S, 2), channels-last.

    Raises:
      FlairDataError: the crop leaves the super-area, or a mask value exceeds 100.
    """
    data, masks = crop_sentinel_views(series, centroid, size, name)
    return np.ascontiguousarray(data), np.ascontiguousarray(masks)


def crop_sentinel_views(
    series: SentinelSeries, centroid: tuple[int, int], size: int = 40, name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """`crop_sentinel` as channels-last views of the (memory-mapped) series, not copies.

    The converter copies them once, straight into the record.
    """
    if size <= 0 or size % 2:
        raise ValueError(f"size must be a positive even number. Received: size={size}")
    r, c = centroid
    half = size // 2
    h, w = series.data.shape[2:]
    r0, r1, c0, c1 = r - half, r + half, c - half, c + half
    if r0 < 0 or c0 < 0 or r1 > h or c1 > w:
        raise FlairDataError(
            f"{name or 'patch'}: a {size}x{size} Sentinel crop around centroid ({r}, {c}) "
            f"spans rows {r0}:{r1}, cols {c0}:{c1}, outside the {h}x{w} super-area "
            f"{_base(series.name)}; expected the crop inside it (check the centroid JSON, or "
            f"use a smaller sentinel size)"
        )
    data = np.asarray(series.data[:, :, r0:r1, c0:c1])
    if data.dtype != np.uint16:
        data = np.clip(data, 0, None).astype(np.uint16)
    masks = np.asarray(series.masks[:, :, r0:r1, c0:c1])
    if masks.size and masks.max() > 100:
        raise FlairDataError(
            f"{_base(series.name)}: mask values up to {int(masks.max())} near {name or 'patch'}, "
            f"expected probabilities 0..100"
        )
    return np.transpose(data, (0, 2, 3, 1)), np.transpose(masks, (0, 2, 3, 1))
