"""python -m flair_tf.predict, patch mode: PRED_<id>.tif in the exact challenge format."""

import glob
import os

import numpy as np
import pytest
import rasterio
from PIL import Image

from flair_tf.inference import patches
from eval_runs import unet13_run  # noqa: F401  (fixtures)

# TIFF tags: GeoTIFF ModelPixelScale, ModelTiepoint, GeoKeyDirectory, GeoDouble/AsciiParams, ModelTransformation.
GEOTIFF_TAGS = {33550, 33922, 34735, 34736, 34737, 34264}


def _tags(path):
    with Image.open(path) as im:
        return dict(im.tag_v2), im.size, im.mode


def _test_ids(tree):
    return sorted(os.path.basename(p)[4:-4] for p in glob.glob(os.path.join(tree, "flair_1_labels_test", "**",
                                                                            "MSK_*.tif"), recursive=True))


def test_pred_file_naming():
    assert patches.pred_filename("000717") == "PRED_000717.tif"
    assert patches.pred_filename(b"000717") == "PRED_000717.tif"
    assert patches.pred_filename("IMG_000717") == "PRED_000717.tif"
    with pytest.raises(ValueError):
        patches.pred_filename("")


def test_encode_pred_challenge_format_bytes():
    cmap = (np.arange(512 * 512) % 13).astype(np.uint8).reshape(512, 512)
    tmp = patches.encode_pred(cmap)
    with Image.open(__import__("io").BytesIO(tmp)) as im:
        tags = dict(im.tag_v2)
        np.testing.assert_array_equal(np.asarray(im), cmap)
    assert (tags[256], tags[257]) == (512, 512)
    assert tags[259] == 5  # LZW
    assert tags.get(277, 1) == 1 and tags[258] in (8, (8,))
    assert not GEOTIFF_TAGS & set(tags)
    with pytest.raises(ValueError, match="2-D"):
        patches.encode_pred(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        patches.encode_pred(np.full((4, 4), 300))
    with pytest.raises(ValueError, match="both"):
        patches.encode_pred(cmap, crs_wkt="EPSG:2154")


def test_predict_writes_one_challenge_pred_per_test_patch(flair1_tree, flair1_records, unet13_run, tmp_path):
    from flair_tf import predict

    out = tmp_path / "preds"
    result = predict.predict_patches(unet13_run, flair1_records, "test", str(out), batch_size=3)
    ids = _test_ids(flair1_tree)
    assert len(ids) == 8 and result["num_files"] == 8
    assert sorted(os.listdir(out)) == [f"PRED_{i}.tif" for i in ids]
    values = set()
    for name in os.listdir(out):
        tags, size, mode = _tags(out / name)
        assert size == (64, 64) and mode == "L"  # the patch size, uint8
        assert tags[259] == 5 and tags.get(277, 1) == 1 and tags[258] in (8, (8,))
        assert not GEOTIFF_TAGS & set(tags), f"{name} carries GeoTIFF tags"
        values |= set(np.unique(np.asarray(Image.open(out / name))).tolist())
    assert values <= set(range(13)) and len(values) > 1


def test_georeferenced_preds_carry_the_patch_crs_and_transform(flair1_tree, flair1_records, unet13_run, tmp_path):
    from flair_tf import predict

    out = tmp_path / "geo"
    predict.predict_patches(unet13_run, flair1_records, "test", str(out), batch_size=4, georeferenced=True)
    images = {os.path.basename(p)[4:-4]: p for p in glob.glob(os.path.join(flair1_tree, "**", "IMG_*.tif"),
                                                               recursive=True)}
    files = sorted(os.listdir(out))
    assert len(files) == 8
    for name in files:
        with rasterio.open(out / name) as pred, rasterio.open(images[name[5:-4]]) as img:
            assert pred.crs == img.crs and pred.crs is not None
            assert pred.transform.almost_equals(img.transform)
            assert (pred.count, pred.dtypes[0], pred.width, pred.height) == (1, "uint8", img.width, img.height)
            assert pred.compression.name.lower() == "lzw"


def test_tta_patch_predictions(flair1_records, unet13_run, tmp_path):
    from flair_tf import predict

    plain, tta = tmp_path / "plain", tmp_path / "tta"
    predict.predict_patches(unet13_run, flair1_records, "test", str(plain), batch_size=4)
    predict.predict_patches(unet13_run, flair1_records, "test", str(tta), batch_size=4, tta=True)
    assert sorted(os.listdir(plain)) == sorted(os.listdir(tta))
    a = np.stack([np.asarray(Image.open(plain / n)) for n in sorted(os.listdir(plain))])
    b = np.stack([np.asarray(Image.open(tta / n)) for n in sorted(os.listdir(tta))])
    assert b.max() < 13 and 0 < (a != b).mean() < 0.9  # the flips change some pixels, not everything
