"""The synthetic whole-raster scene used by the demo and raster-mode tests."""

import numpy as np
import rasterio

from flair_tf.data import synthetic


def test_make_raster_writes_georeferenced_scene_with_labels_and_nodata(tmp_path):
    img, lab = str(tmp_path / "scene.tif"), str(tmp_path / "labels.tif")
    info = synthetic.make_raster(img, 150, 97, patch_size=64, label_path=lab, nodata_rows=9, seed=3)
    with rasterio.open(img) as src, rasterio.open(lab) as lsrc:
        image, label = src.read(), lsrc.read(1)
        assert (src.count, src.height, src.width) == (5, 97, 150)
        assert src.dtypes[0] == "uint8" and src.crs.to_epsg() == 2154
        assert abs(src.transform.a - 102.4 / 64) < 1e-9 and src.transform.e < 0
        assert src.block_shapes[0][0] < 97 and src.compression.name.lower() == "lzw"
        assert lsrc.transform == src.transform
    # Nodata strip: zeros on every band, label 0; the rest is valid FLAIR codes.
    assert not image[:, -9:].any() and not label[-9:].any()
    assert label[:-9].min() >= 1 and label[:-9].max() <= 19
    assert image[:, :-9].reshape(5, -1).std(axis=1).min() > 1  # textured, not constant
    # Several classes present, histogram reported exactly.
    assert len([c for c in np.unique(label[:-9])]) >= 4
    assert info["class_pixels"][0] == 9 * 150
    # Same seed -> same raster.
    again = str(tmp_path / "again.tif")
    synthetic.make_raster(again, 150, 97, patch_size=64, nodata_rows=9, seed=3)
    with rasterio.open(again) as src:
        np.testing.assert_array_equal(src.read(), image)
