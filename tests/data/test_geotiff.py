"""geotiff: the georeferencing read from the TIFF tags is GDAL's, GDAL asked once per GeoKey set."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin

from flair_tf.data import geotiff, readers

LAMBERT93 = "EPSG:2154"
UTM31 = "EPSG:32631"
CUSTOM = "+proj=lcc +lat_0=46.5 +lon_0=3 +lat_1=49 +lat_2=44 +x_0=700000 +y_0=6600000 +ellps=GRS80 +units=m"


def _tif(path, crs, transform, bands=5, **options):
    data = np.arange(bands * 8 * 8, dtype=np.uint8).reshape(bands, 8, 8)
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=bands, dtype="uint8", crs=crs,
                       transform=transform, compress="lzw", **options) as f:
        f.write(data)
    return str(path)


def _counting_gdal():
    calls = []

    def gdal(path):
        calls.append(path)
        return readers.read_georef(path)

    return gdal, calls


@pytest.mark.parametrize("prefix", [geotiff._PREFIX, 16])  # 16 bytes: every tag value read by a seek
def test_georef_equals_gdal_asking_once_per_geokey_set(tmp_path, monkeypatch, prefix):
    monkeypatch.setattr(geotiff, "_PREFIX", prefix)
    files = [
        _tif(tmp_path / "a.tif", LAMBERT93, from_origin(245352.4, 6799475.2, 0.2, 0.2)),
        _tif(tmp_path / "b.tif", LAMBERT93, from_origin(900000.0, 6400000.0, 0.2, 0.2)),
        _tif(tmp_path / "c.tif", LAMBERT93, from_origin(1.0e6 / 3, 6.6e6 + 1 / 7, 0.1, 0.3), bands=1),
        _tif(tmp_path / "d.tif", UTM31, from_origin(500000.5, 5000000.25, 10.0, 10.0)),
        _tif(tmp_path / "e.tif", UTM31, from_origin(499980.0, 4999990.0, 20.0, 20.0), ENDIANNESS="BIG"),
        _tif(tmp_path / "f.tif", CUSTOM, from_origin(700000.0, 6600000.0, 0.5, 0.5)),
        _tif(tmp_path / "g.tif", LAMBERT93, from_origin(12.5, 34.75, 0.2, 0.2), tiled=True,
             blockxsize=16, blockysize=16),
    ]
    gdal, calls = _counting_gdal()
    cache = geotiff.GeorefCache(gdal)
    for _ in range(2):
        for path in files:
            assert cache(path) == readers.read_georef(path), path
    # One GDAL read per GeoKey set, whatever the file's byte order, tiling and bands:
    # Lambert-93, UTM 31N, the custom CRS.
    assert cache.gdal_opens == len(calls) == 3
    assert calls == [files[0], files[3], files[5]]


def test_files_outside_the_handled_subset_get_gdal_answer_each_time(tmp_path):
    rotated = Affine(0.2, 0.05, 245352.4, 0.03, -0.2, 6799475.2)
    files = [
        _tif(tmp_path / "rotated.tif", LAMBERT93, rotated),  # ModelTransformation tag
        _tif(tmp_path / "point.tif", LAMBERT93, from_origin(245352.4, 6799475.2, 0.2, 0.2)),
        _tif(tmp_path / "big.tif", LAMBERT93, from_origin(245352.4, 6799475.2, 0.2, 0.2), BIGTIFF="YES"),
    ]
    with rasterio.open(files[1], "r+") as f:
        f.update_tags(AREA_OR_POINT="Point")  # GTRasterTypeGeoKey = RasterPixelIsPoint
    gdal, calls = _counting_gdal()
    cache = geotiff.GeorefCache(gdal)
    for _ in range(2):
        for path in files:
            assert cache(path) == readers.read_georef(path), path
    assert len(calls) == 2 * len(files)
    assert readers.read_georef(files[0])[1][1] == 0.05  # really rotated


def test_a_geokey_set_gdal_disagrees_with_always_goes_to_gdal(tmp_path):
    files = [_tif(tmp_path / f"{i}.tif", LAMBERT93, from_origin(1000.0 * i, 5000.0, 0.2, 0.2)) for i in range(3)]

    def shifted(path):  # a GDAL that reads these files' transforms differently
        wkt, t = readers.read_georef(path)
        return wkt, (t[0], t[1], t[2] + 0.1, t[3], t[4], t[5])

    cache = geotiff.GeorefCache(shifted)
    assert [cache(p) for p in files] == [shifted(p) for p in files]
    assert cache.gdal_opens == 3


def test_not_a_tiff_is_left_to_gdal_and_its_error(tmp_path):
    path = tmp_path / "IMG_000001.tif"
    path.write_bytes(b"not a tiff at all")
    assert geotiff._parse(str(path)) is None
    with pytest.raises(readers.FlairDataError, match="IMG_000001.tif"):
        geotiff.GeorefCache(readers.read_georef)(str(path))
