"""Tests of the validating readers: read-back of synthetic files and every error path."""

import datetime
import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from flair_tf.data import layout, readers
from flair_tf.data.readers import FlairDataError

PRODUCT = "S2A_MSIL2A_20210415T105021_N0300_R051_T31UDP_20210415T135921"


def _write_tif(path, array, dtype="uint8"):
    array = np.asarray(array, dtype=dtype)
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                       count=array.shape[0], dtype=dtype, crs="EPSG:2154",
                       transform=Affine(0.2, 0, 924000.0, 0, -0.2, 6339500.0)) as dst:
        dst.write(array)
    return str(path)


def _sentinel(tmp_path, t=4, t_masks=None, h=50, products=None, name="SEN2_sp_D004_2021-Z1_NN"):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 10000, (t, 10, h, h), dtype=np.uint16)
    masks = rng.integers(0, 101, (t if t_masks is None else t_masks, 2, h, h), dtype=np.uint8)
    base = os.path.join(tmp_path, name)
    np.save(base + "_data.npy", data)
    np.save(base + "_masks.npy", masks)
    if products is None:
        products = [f"S2B_MSIL2A_2021{m:02d}15T105021_N0300_R051_T31UDP_2021{m:02d}15T135921"
                    for m in range(3, 3 + t)]
    with open(base + "_products.txt", "w") as f:
        f.write("\n".join(products) + "\n")
    return layout.SentinelFiles(base + "_data.npy", base + "_masks.npy", base + "_products.txt"), data


# --- read-back of the generator's files --------------------------------------------------

def test_read_back_flair2_tree(flair2_tree):
    tree = layout.discover(flair2_tree, "flair2")
    centroids = readers.read_centroids_json(tree.centroids_json)
    meta = readers.read_metadata_json(tree.metadata_json)
    for split in ("train", "val", "test"):
        for patch in tree.splits[split][:3]:
            image, georef = readers.read_image(patch.image, size=64)
            assert image.shape == (64, 64, 5) and image.dtype == np.uint8
            assert "Lambert" in georef.crs_wkt or "2154" in georef.crs_wkt
            mask = readers.read_mask(patch.mask, size=64)
            assert mask.shape == (64, 64) and mask.min() >= 1 and mask.max() <= 19
            assert meta[patch.name]["zone"] == patch.zone
            series = readers.read_sentinel(patch.sentinel)
            assert isinstance(series.data, np.memmap)
            t = series.data.shape[0]
            assert len(series.dates) == len(series.products) == t
            data, masks = readers.crop_sentinel(series, centroids[patch.name], 40, patch.name)
            assert data.shape == (t, 40, 40, 10) and data.dtype == np.uint16
            assert masks.shape == (t, 40, 40, 2) and masks.dtype == np.uint8
            # Channels-last crop equals the reference's channels-first slice.
            r, c = centroids[patch.name]
            np.testing.assert_array_equal(
                data, np.transpose(series.data[:, :, r - 20:r + 20, c - 20:c + 20], (0, 2, 3, 1)))


def test_read_image_any_size_with_none(flair1_tree):
    patch = layout.discover(flair1_tree, "flair1", splits=("test",)).splits["test"][0]
    image, _ = readers.read_image(patch.image, size=None)
    assert image.shape == (64, 64, 5)
    with pytest.raises(FlairDataError, match=r"64x64 px, expected 512x512"):
        readers.read_image(patch.image)  # default: the released 512


# --- raster errors ---------------------------------------------------------------------

def test_image_with_wrong_band_count(tmp_path):
    path = _write_tif(tmp_path / "IMG_000717.tif", np.zeros((4, 32, 32)))
    with pytest.raises(FlairDataError, match=r"IMG_000717\.tif has 4 band\(s\), expected 5"):
        readers.read_image(path, size=32)


def test_image_with_wrong_dtype(tmp_path):
    path = _write_tif(tmp_path / "IMG_000001.tif", np.zeros((5, 32, 32)), dtype="uint16")
    with pytest.raises(FlairDataError, match=r"IMG_000001\.tif has dtype uint16, expected uint8"):
        readers.read_image(path, size=32)


def test_mask_with_wrong_band_count_and_dtype(tmp_path):
    path = _write_tif(tmp_path / "MSK_000001.tif", np.ones((2, 32, 32)))
    with pytest.raises(FlairDataError, match="2 band"):
        readers.read_mask(path, size=32)
    path = _write_tif(tmp_path / "MSK_000002.tif", np.ones((1, 32, 32)), dtype="int16")
    with pytest.raises(FlairDataError, match="dtype int16"):
        readers.read_mask(path, size=32)


@pytest.mark.parametrize("bad", [0, 25])
def test_mask_with_out_of_range_codes(tmp_path, bad):
    mask = np.full((1, 32, 32), 7)
    mask[0, :3, :2] = bad
    path = _write_tif(tmp_path / "MSK_000009.tif", mask)
    with pytest.raises(FlairDataError) as err:
        readers.read_mask(path, size=32)
    assert f"{bad} (6 px)" in str(err.value) and "MSK_000009.tif" in str(err.value)
    assert "1..19" in str(err.value)


def test_not_a_geotiff(tmp_path):
    path = tmp_path / "IMG_000001.tif"
    path.write_bytes(b"not a tiff")
    with pytest.raises(FlairDataError, match="IMG_000001.tif"):
        readers.read_image(str(path))


# --- JSON errors -------------------------------------------------------------------------

def test_metadata_json_errors(tmp_path):
    record = {"domain": "D004_2021", "zone": "Z8_NF", "patch_centroid_x": 1.0,
              "patch_centroid_y": 2.0, "patch_centroid_z": 3.0, "date": "2021-05-28",
              "time": "08h06", "camera": "UCE-M3-f120-s07"}
    good = tmp_path / "meta.json"
    good.write_text(json.dumps({"IMG_000717": record}))
    assert readers.read_metadata_json(str(good))["IMG_000717"]["zone"] == "Z8_NF"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"IMG_000717": {k: v for k, v in record.items() if k != "date"}}))
    with pytest.raises(FlairDataError, match=r"IMG_000717 lacks \['date'\]"):
        readers.read_metadata_json(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text('{"IMG_000717": ')
    with pytest.raises(FlairDataError, match="broken.json is not valid JSON"):
        readers.read_metadata_json(str(broken))


def test_centroids_json(tmp_path):
    path = tmp_path / "flair-2_centroids_sp_to_patch.json"
    path.write_text(json.dumps({"IMG_000001.tif": [60, 71]}))
    centroids = readers.read_centroids_json(str(path))
    assert centroids == {"IMG_000001": (60, 71)}
    assert readers.lookup_centroid(centroids, "IMG_000001", str(path)) == (60, 71)
    with pytest.raises(FlairDataError, match=r"no entry for IMG_000002\.tif"):
        readers.lookup_centroid(centroids, "IMG_000002", str(path))
    path.write_text(json.dumps({"IMG_000001.tif": [60.5, "x"]}))
    with pytest.raises(FlairDataError, match="integer row and col"):
        readers.read_centroids_json(str(path))


# --- Sentinel errors ---------------------------------------------------------------------

def test_products_parsed(tmp_path):
    files, _ = _sentinel(tmp_path, t=3)
    assert readers.read_products(files.products, 3) == [
        datetime.date(2021, 3, 15), datetime.date(2021, 4, 15), datetime.date(2021, 5, 15)]
    assert readers.parse_product_date(PRODUCT) == datetime.date(2021, 4, 15)


def test_unparsable_product_name(tmp_path):
    files, _ = _sentinel(tmp_path, t=3, products=[PRODUCT, "S2A_MSIL2A_2021XX15T105021_N0300", PRODUCT])
    with pytest.raises(FlairDataError, match=r"_products\.txt line 2: cannot parse"):
        readers.read_sentinel(files)


def test_products_shorter_than_t(tmp_path):
    files, _ = _sentinel(tmp_path, t=4, products=[PRODUCT] * 3)
    with pytest.raises(FlairDataError, match=r"lists 3 product\(s\), expected 4"):
        readers.read_sentinel(files)


def test_data_and_masks_with_different_t(tmp_path):
    files, _ = _sentinel(tmp_path, t=4, t_masks=5)
    with pytest.raises(FlairDataError, match=r"_masks\.npy has 5 dates, expected T=4"):
        readers.read_sentinel(files)


def test_truncated_npy(tmp_path):
    files, _ = _sentinel(tmp_path, t=4)
    size = os.path.getsize(files.data)
    with open(files.data, "r+b") as f:
        f.truncate(size // 2)
    for mmap in (True, False):
        with pytest.raises(FlairDataError, match=r"_data\.npy is not a readable \.npy array"):
            readers.read_sentinel(files, mmap=mmap)


def test_sentinel_wrong_shape_and_dtype(tmp_path):
    files, data = _sentinel(tmp_path, t=4)
    np.save(files.data, data[:, :9])
    with pytest.raises(FlairDataError, match=r"expected \(T, 10, H, W\)"):
        readers.read_sentinel(files)
    np.save(files.data, data.astype(np.float32))
    with pytest.raises(FlairDataError, match="dtype float32, expected uint16"):
        readers.read_sentinel(files)
    np.save(files.data, data)
    np.save(files.masks, np.zeros((4, 2, 49, 50), np.uint8))
    with pytest.raises(FlairDataError, match="covers 49x50 px, expected 50x50"):
        readers.read_sentinel(files)


def test_missing_sentinel_file(tmp_path):
    files, _ = _sentinel(tmp_path, t=2)
    os.remove(files.products)
    with pytest.raises(FlairDataError, match="file not found"):
        readers.read_sentinel(files)


def test_crop_inside_and_outside(tmp_path):
    files, data = _sentinel(tmp_path, t=3, h=50)
    series = readers.read_sentinel(files)
    crop, masks = readers.crop_sentinel(series, (20, 30), size=40)
    np.testing.assert_array_equal(crop[1, 0, 0], data[1, :, 0, 10])
    assert masks.shape == (3, 40, 40, 2)
    for centroid in [(19, 30), (20, 31), (45, 25)]:
        with pytest.raises(FlairDataError, match="outside the 50x50 super-area"):
            readers.crop_sentinel(series, centroid, size=40, name="IMG_000001")


def test_crop_rejects_mask_values_above_100(tmp_path):
    files, _ = _sentinel(tmp_path, t=2, h=50)
    np.save(files.masks, np.full((2, 2, 50, 50), 101, np.uint8))
    with pytest.raises(FlairDataError, match="expected probabilities 0..100"):
        readers.crop_sentinel(readers.read_sentinel(files), (25, 25), 40)


def test_int16_sentinel_is_accepted_and_clipped(tmp_path):
    files, data = _sentinel(tmp_path, t=2, h=50)
    signed = data.astype(np.int16) // 2
    signed[0, 0, 25, 25] = -5
    np.save(files.data, signed)
    crop, _ = readers.crop_sentinel(readers.read_sentinel(files), (25, 25), 8)
    assert crop.dtype == np.uint16 and crop[0, 4, 4, 0] == 0

