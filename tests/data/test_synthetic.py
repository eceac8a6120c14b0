"""Tests of the synthetic FLAIR generator: format, determinism, realism, learnability."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from flair_tf import nomenclature, scoring
from flair_tf.data import layout, metadata, readers, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(num_domains=2, zones_per_domain=1, patches_per_zone=2, num_test_domains=1,
            patch_size=32, num_dates=(3, 5), max_sentinel_crop=16, show_progress=False)


def _hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _hashes(synthetic.make_tree(str(tmp_path / "a"), "flair2", seed=3, **TINY)["root"])
    b = _hashes(synthetic.make_tree(str(tmp_path / "b"), "flair2", seed=3, **TINY)["root"])
    c = _hashes(synthetic.make_tree(str(tmp_path / "c"), "flair2", seed=4, **TINY)["root"])
    assert len(a) == 6 * 2 + 3 * 3 + 2  # IMG+MSK per patch, 3 Sentinel files per zone, 2 JSONs
    assert a == b
    assert a != c and len(c) == len(a)
    # No timestamp in the GeoTIFFs (equal hashes above could hide one written in the same second).
    image = next(k for k in a if k.endswith(".tif"))
    with rasterio.open(tmp_path / "a" / image) as src:
        assert not any("DATETIME" in tag.upper() for tag in src.tags())


def test_refuses_to_overwrite_and_checks_arguments(tmp_path):
    synthetic.make_tree(str(tmp_path), "flair1", **{k: v for k, v in TINY.items()
                                                     if k not in ("num_dates", "max_sentinel_crop")})
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.make_tree(str(tmp_path), "flair1", show_progress=False)
    with pytest.raises(ValueError, match="task"):
        synthetic.make_tree(str(tmp_path / "x"), "flair3")
    with pytest.raises(ValueError, match="train"):
        synthetic.make_tree(str(tmp_path / "x"), "flair1", num_domains=50)


def test_geotiffs_and_metadata_agree(flair1_tree):
    tree = layout.discover(flair1_tree, "flair1")
    meta = readers.read_metadata_json(tree.metadata_json)
    patches = [p for s in tree.splits.values() for p in s]
    assert sorted(meta) == sorted(p.name for p in patches)  # test patches included
    for p in patches:
        record = meta[p.name]
        assert (record["domain"], record["zone"]) == (p.domain, p.zone)
        for path, bands in ((p.image, 5), (p.mask, 1)):
            with rasterio.open(path) as src:
                assert src.crs.to_epsg() == 2154
                assert (src.count, src.dtypes[0], src.width) == (bands, "uint8", 64)
                assert src.profile["compress"] == "lzw"
                t = src.transform
                assert t.a == pytest.approx(102.4 / 64) and t.e == pytest.approx(-102.4 / 64)
                # The patch centre is the metadata centroid.
                assert t.c + 51.2 == pytest.approx(record["patch_centroid_x"], abs=1e-6)
                assert t.f - 51.2 == pytest.approx(record["patch_centroid_y"], abs=1e-6)
        year, month, _ = metadata.parse_date(record["date"])
        assert year == int(p.domain[-4:]) and 4 <= month <= 10
        assert re.fullmatch(r"(0[7-9]|1[0-4])h[0-5]\d", record["time"])
        assert re.fullmatch(r"UCE-M3-f1[02]0(-s0[678])?|CAMERA#0\d\d", record["camera"])
        assert metadata.encode_metadata(record).shape == (45,)
    assert re.fullmatch(r"Z\d+_[UAFN]{2}", patches[0].zone)


def test_sentinel_format_and_centroids(flair2_tree):
    tree = layout.discover(flair2_tree, "flair2")
    centroids = readers.read_centroids_json(tree.centroids_json)
    meta = readers.read_metadata_json(tree.metadata_json)
    patches = [p for s in tree.splits.values() for p in s]
    assert sorted(centroids) == sorted(p.name for p in patches)
    by_zone = {}
    for p in patches:
        by_zone.setdefault(p.sentinel, []).append(p)
    for files, zone_patches in by_zone.items():
        series = readers.read_sentinel(files)
        assert 6 <= series.data.shape[0] <= 12
        assert series.dates == sorted(set(series.dates))
        assert {d.year for d in series.dates} == {int(zone_patches[0].domain[-4:])}
        for line in series.products:
            assert re.fullmatch(r"S2[AB]_MSIL2A_\d{8}T\d{6}_N\d{4}_R\d{3}_T\d\d[A-Z]{3}_\d{8}T\d{6}",
                                line)
        assert int(series.masks.max()) <= 100
        for p in zone_patches:
            readers.crop_sentinel(series, centroids[p.name], 40, p.name)  # fits
        # Adjacent patches are 102.4 m = 10.24 Sentinel pixels apart, as in Lambert-93.
        a, b = zone_patches[0], zone_patches[1]
        dx = meta[b.name]["patch_centroid_x"] - meta[a.name]["patch_centroid_x"]
        assert centroids[b.name][1] - centroids[a.name][1] == pytest.approx(dx / 10, abs=1)


def test_cloudy_and_snowy_dates_are_flagged_and_perturbed(flair2_tree):
    tree = layout.discover(flair2_tree, "flair2")
    cloudy_seen = snowy_seen = 0
    for files in {p.sentinel for s in tree.splits.values() for p in s}:
        series = readers.read_sentinel(files, mmap=False)
        clear = series.masks.max(axis=1) == 0  # neither cloud nor snow
        data = series.data.astype(np.float64)
        for t, date in enumerate(series.dates):
            cloud = series.masks[t, 1] >= 80
            snow = (series.masks[t, 0] >= 80) & (series.masks[t, 1] < 20)
            if cloud.mean() > 0.2 and clear[t].mean() > 0.05:
                cloudy_seen += 1
                assert data[t, 0][cloud].mean() > 3 * data[t, 0][clear[t]].mean()  # bright B2
            if snow.mean() > 0.1:
                snowy_seen += 1
                doy = date.timetuple().tm_yday
                assert doy < 100 or doy > 310, date  # snow in winter only
                green, swir = data[t, 1][snow], data[t, 8][snow]  # B3, B11
                assert green.mean() > 4000 and (swir / green).mean() < 0.3  # snow's signature
    assert cloudy_seen >= 2 and snowy_seen >= 1


def test_sentinel_agrees_with_aerial_labels(flair2_tree):
    tree = layout.discover(flair2_tree, "flair2")
    centroids = readers.read_centroids_json(tree.centroids_json)
    veg, ndvi = [], []
    for p in [p for s in tree.splits.values() for p in s]:
        series = readers.read_sentinel(p.sentinel)
        summer = [i for i, d in enumerate(series.dates) if 150 <= d.timetuple().tm_yday <= 250]
        if not summer:
            continue
        data, masks = readers.crop_sentinel(series, centroids[p.name], 10, p.name)
        data = data[summer].astype(np.float64)
        ok = masks[summer].max(axis=-1) < 20
        if ok.sum() < 20:
            continue
        red, nir = data[..., 2][ok], data[..., 6][ok]
        ndvi.append(np.mean((nir - red) / (nir + red + 1)))
        label = readers.read_mask(p.mask, 64)
        veg.append(np.isin(label, (6, 7, 8, 10, 16)).mean())
    assert len(veg) >= 10
    assert np.corrcoef(veg, ndvi)[0, 1] > 0.5


def test_phenology_signatures():
    doy = np.array([20, 200])
    sig = synthetic.class_temporal_signature(doy)
    b4, b8 = 2, 6
    ndvi = (sig[:, 1:, b8] - sig[:, 1:, b4]) / (sig[:, 1:, b8] + sig[:, 1:, b4])
    ndvi = np.concatenate([np.zeros((2, 1)), ndvi], axis=1)  # index = code
    assert ndvi[1, 7] > ndvi[0, 7] + 0.3  # deciduous: leaf-on in July
    assert abs(ndvi[1, 6] - ndvi[0, 6]) < 0.15  # coniferous: evergreen
    assert ndvi[1, 5] < 0 and ndvi[0, 5] < 0  # water
    assert sig[0, 14, 1] > 3 * sig[1, 14, 1]  # snow class: bright in January only


def test_class_frequencies_shape(tmp_path):
    summary = synthetic.make_tree(str(tmp_path), "flair1", num_domains=12, num_val_domains=3,
                                  zones_per_domain=3, patches_per_zone=4, patch_size=32,
                                  num_test_domains=0, seed=1, show_progress=False)
    pixels = summary["class_pixels"]["trainval"]
    share = np.array([pixels.get(c, 0) for c in range(1, 20)], np.float64)
    share = 100 * share / share.sum()
    want = np.array([nomenclature.TRAIN_FREQUENCY_PERCENT[c] for c in range(1, 20)])
    assert (share[:12] > 1.0).all(), share  # every common class is common
    assert share[[6, 9]].min() > 8  # deciduous and herbaceous are among the largest
    assert (share[12:] > 0).all(), share  # codes 13..19 present ...
    assert (share[12:] < 1.0).all() and share[12:].sum() < 2.5, share  # ... but rare
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(rank(share), rank(want))[0, 1] > 0.8
    assert np.abs(share - want).max() < 6


def test_labels_are_spatially_coherent_and_learnable_not_trivial(flair1_tree):
    tree = layout.discover(flair1_tree, "flair1", splits=("train", "val"))

    def load(split):
        images = np.stack([readers.read_image(p.image, 64)[0] for p in tree.splits[split]])
        labels = np.stack([nomenclature.remap(readers.read_mask(p.mask, 64))
                           for p in tree.splits[split]])
        return images.reshape(-1, 5).astype(np.float64), labels

    x_train, y_train = load("train")
    x_val, y_val = load("val")
    assert (y_train[:, :, 1:] == y_train[:, :, :-1]).mean() > 0.8  # regions, not salt and pepper

    # A per-pixel Gaussian classifier (one full-covariance Gaussian per class) trained on
    # the train domains: the bands carry the classes, but no single pixel gives them away.
    def gaussian_classifier_miou(x, y_true):
        log_lik = []
        for c in range(13):
            xc = x_train[y_train.ravel() == c]
            if len(xc) < 20:
                log_lik.append(np.full(len(x), -np.inf))
                continue
            cov = np.cov(xc.T) + np.eye(5)
            d = x - xc.mean(0)
            log_lik.append(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
                           - 0.5 * np.linalg.slogdet(cov)[1])
        pred = np.argmax(np.stack(log_lik, 1), 1)
        return scoring.miou(scoring.confusion_matrix(y_true.ravel(), pred, 13))

    train_miou = gaussian_classifier_miou(x_train, y_train)
    val_miou = gaussian_classifier_miou(x_val, y_val)
    print(f"per-pixel Gaussian classifier mIoU: train {train_miou:.3f}, val {val_miou:.3f}")
    assert 0.35 < train_miou < 0.85, train_miou
    assert 0.2 < val_miou < 0.8, val_miou  # another domain: radiometric shift


def test_cli_writes_both_trees(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_synthetic_flair.py"),
         f"--output_dir={tmp_path}", "--task=both", "--patch_size=16", "--num_domains=2",
         "--zones_per_domain=1", "--patches_per_zone=1", "--min_dates=3", "--max_dates=4",
         "--max_sentinel_crop=16", "--seed=5"],
        capture_output=True, text=True, timeout=120, check=True)
    assert "flair1: wrote 2 train+val and 1 test patches of 16 px" in out.stdout
    assert "sentinel: 3 super-areas" in out.stdout
    for task in ("flair1", "flair2"):
        tree = layout.discover(str(tmp_path / task), task)
        assert [len(tree.splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
        with open(tmp_path / task / "synthetic_summary.json") as f:
            assert json.load(f)["seed"] == 5
