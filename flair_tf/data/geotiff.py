"""The georeferencing of a GeoTIFF patch without GDAL building its CRS at every open.

Opening a FLAIR patch with georeferencing makes GDAL turn the file's GeoKeys
into a spatial reference through PROJ's database: about 0.7 ms per open, more
than a tenth of the conversion's time per patch, spent to find the same
Lambert-93 CRS in every file. The converter opens its rasters with GDAL's
``GEOREF_SOURCES=NONE`` (0.1 ms) and gets the georeferencing here instead:

* the affine transform is computed from the TIFF tags ModelPixelScale and
  ModelTiepoint as GDAL computes it (one tie point, north-up, "pixel is
  area");
* the CRS WKT is GDAL's own, asked once per distinct set of GeoKeys (the
  GeoKeyDirectory, GeoDoubleParams and GeoAsciiParams tags) and cached.

The first file of each GeoKey set is also opened with GDAL's georeferencing
and both transforms compared: a file type whose transform differs, and any
file outside the subset above (rotated or ModelTransformation transforms,
several tie points, "pixel is point", BigTIFF, remote paths), gets GDAL's
answer, so the result is always GDAL's.
"""

from __future__ import annotations

import struct
from typing import Callable

# TIFF tags (TIFF 6.0 and the GeoTIFF 1.1 standard).
_MODEL_PIXEL_SCALE = 33550
_MODEL_TIEPOINT = 33922
_MODEL_TRANSFORMATION = 34264
_GEO_KEY_DIRECTORY = 34735
_GEO_DOUBLE_PARAMS = 34736
_GEO_ASCII_PARAMS = 34737
_WANTED = (_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT, _MODEL_TRANSFORMATION, _GEO_KEY_DIRECTORY,
           _GEO_DOUBLE_PARAMS, _GEO_ASCII_PARAMS)
_GT_RASTER_TYPE_KEY = 1025  # GeoKey: 1 = pixel is area (the default), 2 = pixel is point
# TIFF field type -> (struct code, size in bytes) of the types these tags use.
_TYPES = {2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 12: ("d", 8)}
_PREFIX = 16384  # bytes read at once: GDAL writes the IFD and its tag values at the start

Transform = tuple[float, float, float, float, float, float]
# (crs_wkt, transform) of a path by a full GDAL open with georeferencing.
GdalGeoref = Callable[[str], tuple[str, Transform]]


def _read_tags(path: str) -> dict[int, tuple] | None:
    """The values of the georeferencing tags of the first IFD, or None when not a classic TIFF."""
    with open(path, "rb") as f:
        head = f.read(_PREFIX)

        def read_at(offset: int, size: int) -> bytes:
            if offset + size <= len(head):
                return head[offset:offset + size]
            f.seek(offset)
            return f.read(size)

        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None
        order = "<" if head[:2] == b"II" else ">"
        magic, ifd = struct.unpack(order + "HI", head[2:8])
        if magic != 42:  # 43 is BigTIFF: left to GDAL
            return None
        (count,) = struct.unpack(order + "H", read_at(ifd, 2))
        entries = read_at(ifd + 2, 12 * count)
        if len(entries) != 12 * count:
            return None
        tags: dict[int, tuple] = {}
        for i in range(count):
            tag, kind, n, value = struct.unpack(order + "HHI4s", entries[12 * i:12 * i + 12])
            if tag not in _WANTED:
                continue
            if kind not in _TYPES:
                return None
            code, size = _TYPES[kind]
            raw = value[:n * size] if n * size <= 4 else read_at(struct.unpack(order + "I", value)[0], n * size)
            if len(raw) != n * size:
                return None
            tags[tag] = (raw,) if code == "s" else struct.unpack(f"{order}{n}{code}", raw)
    return tags


def _geokeys(directory: tuple) -> dict[int, int]:
    """Short-valued GeoKeys of a GeoKeyDirectory (keys stored in other tags are left out)."""
    out = {}
    for i in range(4, 4 + 4 * directory[3], 4):
        key, location, _, value = directory[i:i + 4]
        if location == 0:
            out[key] = value
    return out


def _parse(path: str) -> tuple[tuple, Transform] | None:
    """(GeoKey set, transform) from the tags, or None outside the subset this module handles."""
    tags = _read_tags(path)
    if tags is None or _MODEL_TRANSFORMATION in tags:
        return None
    scale, tiepoint, directory = (tags.get(t) for t in (_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT, _GEO_KEY_DIRECTORY))
    if scale is None or tiepoint is None or directory is None or len(tiepoint) != 6 or len(scale) < 2:
        return None
    if len(directory) < 4 or len(directory) < 4 + 4 * directory[3]:
        return None
    if _geokeys(directory).get(_GT_RASTER_TYPE_KEY, 1) != 1 or not (scale[0] > 0 and scale[1] > 0):
        return None
    i, j, _, x, y, _ = tiepoint
    a, e = scale[0], -scale[1]
    transform = (a, 0.0, x - i * a, 0.0, e, y - j * e)
    key = (directory, tags.get(_GEO_DOUBLE_PARAMS), tags.get(_GEO_ASCII_PARAMS))
    return key, transform


class GeorefCache:
    """Georeferencing of GeoTIFFs: GDAL's answer, asking GDAL once per GeoKey set.

    Args:
      gdal_georef: a full GDAL read of a path's ``(crs_wkt, transform)``, used
        for the first file of each GeoKey set and for every file this module
        does not handle.
    """

    def __init__(self, gdal_georef: GdalGeoref):
        self._gdal = gdal_georef
        self._wkt: dict[tuple, str | None] = {}  # GeoKey set -> WKT (None: GDAL disagreed once)
        self.gdal_opens = 0  # how many files went to GDAL (tests, logs)

    def _ask_gdal(self, path: str) -> tuple[str, Transform]:
        self.gdal_opens += 1
        return self._gdal(path)

    def __call__(self, path: str) -> tuple[str, Transform]:
        """``(crs_wkt, transform)`` of the GeoTIFF `path`, as GDAL reads them."""
        parsed = None if "://" in path else _parse(path)
        if parsed is None:
            return self._ask_gdal(path)
        key, transform = parsed
        if key in self._wkt:
            wkt = self._wkt[key]
            return (wkt, transform) if wkt is not None else self._ask_gdal(path)
        wkt, gdal_transform = self._ask_gdal(path)
        agrees = tuple(float(v) for v in gdal_transform) == transform
        self._wkt[key] = wkt if agrees else None
        return wkt, tuple(gdal_transform)
