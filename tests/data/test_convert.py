"""convert: records equal their sources, exact statistics, bad input named, resume after a kill."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import rasterio
import tensorflow as tf

from flair_tf.data import convert, layout, readers, schema, verify, writer
from flair_tf.data.metadata import encode_metadata

P = 64  # tests/conftest.py SYNTHETIC_TREE_KWARGS
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _records(directory, task, split):
    info = schema.load_dataset_info(directory)
    spec = schema.RecordSpec.from_info(info)
    files = sorted(tf.io.gfile.glob(schema.shard_pattern(directory, task, split)))
    ds = tf.data.TFRecordDataset(files, compression_type=info["compression"] or "")
    return [{k: v.numpy() for k, v in schema.decode(r, spec).items()} for r in ds]


def _options(task, root, out, **kw):
    kw.setdefault("splits", ("val",))
    kw.setdefault("min_shards", 2)
    return convert.ConvertOptions(task=task, data_root=root, output_dir=str(out), patch_size=P,
                                  sentinel_size=40, show_progress=False, **kw)


def _copy(tree, tmp_path):
    dst = tmp_path / "tree"
    shutil.copytree(tree, dst)
    return str(dst)


def _val_images(root):
    return sorted(glob.glob(os.path.join(root, "flair_aerial_train", "D004_2021", "*", "img", "IMG_*.tif")))


def _write_tif(path, array):
    transform = rasterio.transform.from_origin(900000.0, 6400000.0, 102.4 / P, 102.4 / P)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=array.dtype.name, crs="EPSG:2154",
                       transform=transform) as f:
        f.write(array)


# ----------------------------------------------------------------------------- content


def test_flair2_records_equal_their_sources(flair2_tree, flair2_records):
    tree = layout.discover(flair2_tree, "flair2")
    metadata = readers.read_metadata_json(tree.metadata_json)
    centroids = readers.read_centroids_json(tree.centroids_json)
    by_id = {p.patch_id: p for split in tree.splits.values() for p in split}
    for split in ("train", "val", "test"):
        records = _records(flair2_records, "flair2", split)
        assert sorted(r["patch_id"].decode() for r in records) == sorted(p.patch_id for p in tree.splits[split])
    for rec in records[:3]:
        p = by_id[rec["patch_id"].decode()]
        image, georef = readers.read_image(p.image, size=P)
        np.testing.assert_array_equal(rec["aerial"], image[..., :4])
        np.testing.assert_array_equal(rec["elevation"], image[..., 4:])
        np.testing.assert_array_equal(rec["label"], readers.read_mask(p.mask, size=P))
        assert rec["has_label"] and rec["domain"].decode() == p.domain and rec["zone"].decode() == p.zone
        np.testing.assert_array_equal(rec["transform"], georef.transform)
        assert rec["crs_wkt"].decode() == georef.crs_wkt and "Lambert" in georef.crs_wkt
        np.testing.assert_array_equal(rec["metadata"], encode_metadata(metadata[p.name]).astype(np.float32))
        assert rec["metadata_month"] == int(metadata[p.name]["date"][5:7])
        series = readers.read_sentinel(p.sentinel)
        r, c = centroids[p.name]
        np.testing.assert_array_equal(
            rec["sentinel_data"], series.data[:, :, r - 20:r + 20, c - 20:c + 20].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(
            rec["sentinel_masks"], series.masks[:, :, r - 20:r + 20, c - 20:c + 20].transpose(0, 2, 3, 1))
        assert rec["sentinel_length"] == len(series.dates) == rec["sentinel_data"].shape[0]
        assert list(rec["sentinel_dates"]) == [int(d.strftime("%Y%m%d")) for d in series.dates]


def test_encoder_gives_the_same_records_in_and_out_of_a_session(flair2_tree, flair2_records):
    """A conversion encodes inside `PatchEncoder.session` (GDAL's environment set once):
    the records equal those encoded one by one, and equal the converted ones."""
    tree = layout.discover(flair2_tree, "flair2")
    items, _ = convert._work_items(tree, "val", {})
    encoder = convert.EncoderFactory("flair2", P, 40)()
    alone = [bytes(encoder.encode(it)) for it in items]
    with encoder.session():
        assert encoder._in_session == 1
        inside = [bytes(encoder.encode(it)) for it in items]
    assert encoder._in_session == 0
    assert inside == alone
    converted = sorted(r.numpy() for f in sorted(glob.glob(os.path.join(flair2_records, "flair2-val.tfrecord-*")))
                       for r in tf.data.TFRecordDataset(f))
    assert sorted(alone) == converted


def test_remote_images_take_their_georeferencing_from_their_own_open(flair2_tree, monkeypatch):
    """gs:// images are opened with their georeferencing once, not asked of GDAL a second time."""
    tree = layout.discover(flair2_tree, "flair2")
    items, _ = convert._work_items(tree, "val", {})
    local = convert.EncoderFactory("flair2", P, 40)()
    expected = [bytes(local.encode(it)) for it in items]
    assert local._georef.gdal_opens == 1  # once per GeoKey set
    monkeypatch.setattr(readers, "is_remote", lambda path: True)  # local files, read as if remote
    remote = convert.EncoderFactory("flair2", P, 40)()
    assert [bytes(remote.encode(it)) for it in items] == expected
    assert remote._georef.gdal_opens == 0


def test_dataset_info_counts_and_exact_statistics(flair2_tree, flair2_records):
    info = schema.load_dataset_info(flair2_records)
    assert info["task"] == "flair2" and info["schema_version"] == schema.SCHEMA_VERSION
    assert (info["patch_size"], info["sentinel_size"], info["compression"]) == (P, 40, None)
    assert info["band_order"]["aerial"] == ["R", "G", "B", "NIR"]
    tree = layout.discover(flair2_tree, "flair2")
    centroids = readers.read_centroids_json(tree.centroids_json)
    s = info["splits"]["train"]
    patches = tree.splits["train"]
    assert s["num_examples"] == len(patches) == sum(x["num_examples"] for x in s["shards"])
    assert s["domains"] == {d: sum(p.domain == d for p in patches) for d in sorted({p.domain for p in patches})}
    images = np.stack([readers.read_image(p.image, size=P)[0] for p in patches]).astype(np.float64)
    labels = np.stack([readers.read_mask(p.mask, size=P) for p in patches])
    hist = np.bincount(labels.ravel(), minlength=20)
    assert s["class_histogram"] == {str(c): int(hist[c]) for c in range(1, 20)}
    np.testing.assert_allclose(s["aerial_stats"]["mean"], images[..., :4].mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(s["aerial_stats"]["std"], images[..., :4].std(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(s["elevation_stats"]["mean"], [images[..., 4].mean()], atol=1e-5)
    crops = []
    for p in patches:
        series = readers.read_sentinel(p.sentinel)
        crops.append(readers.crop_sentinel(series, centroids[p.name], 40)[0].reshape(-1, 10))
    crops = np.concatenate(crops).astype(np.float64)
    np.testing.assert_allclose(s["sentinel_stats"]["mean"], crops.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s["sentinel_stats"]["std"], crops.std(axis=0), rtol=1e-6)
    lengths = [len(readers.read_products(p.sentinel.products)) for p in patches]
    assert s["sentinel_length_histogram"] == {str(t): lengths.count(t) for t in sorted(set(lengths))}
    assert s["skipped"] == [] and info["command_line"] == "conftest flair2_records"


def test_flair1_records_verify_and_unlabelled_test_split(flair1_tree, flair1_records, tmp_path):
    report = verify.verify(flair1_records, show_progress=False)
    assert report.ok, report.problems
    assert report.num_records == {"test": 8, "train": 24, "val": 8}
    # A test split without its labels folder: has_label False, zeros, not an error.
    root = _copy(flair1_tree, tmp_path)
    shutil.rmtree(os.path.join(root, "flair_1_labels_test"))
    info = convert.convert(_options("flair1", root, tmp_path / "out", splits=("test",), compression="GZIP"))
    assert info["splits"]["test"]["has_labels"] is False
    recs = _records(str(tmp_path / "out"), "flair1", "test")
    assert len(recs) == 8 and not any(r["has_label"] or r["label"].any() for r in recs)
    assert verify.verify(str(tmp_path / "out"), show_progress=False).ok


def test_byte_layout_is_recorded_and_old_layouts_are_not_mixed_in(flair1_tree, tmp_path):
    out = tmp_path / "out"
    info = convert.convert(_options("flair1", flair1_tree, out))
    assert info["byte_layout"] == "aligned64"
    assert schema.RecordSpec.from_info(info).byte_layout == "aligned64"
    # A val split converted before the aligned layout existed (no byte_layout in the info).
    path = out / schema.DATASET_INFO_NAME
    old = json.loads(path.read_text())
    del old["byte_layout"]
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"\['val'\].*byte_layout='protobuf'.*--splits=test,val"):
        convert.convert(_options("flair1", flair1_tree, out, splits=("test",)))
    info = convert.convert(_options("flair1", flair1_tree, out, splits=("test", "val")))
    assert info["byte_layout"] == "aligned64"
    assert verify.verify(str(out), show_progress=False).ok


def test_shard_order_is_seeded_and_groups_zones_for_flair2(flair2_tree, tmp_path):
    out = tmp_path / "out"
    convert.convert(_options("flair2", flair2_tree, out, splits=("train",), num_shards=3))
    info = schema.load_dataset_info(str(out))
    assert [s["num_examples"] for s in info["splits"]["train"]["shards"]] == [8, 8, 8]
    names = [s["file"] for s in info["splits"]["train"]["shards"]]
    zones = [[r["zone"].numpy() for r in _records_of_shard(out, name)] for name in names]
    # 6 zones of 4 patches in 3 shards of 8: whole zones per shard (the open super-area is
    # reused), each shard sorted by zone.
    assert all(len(set(z)) == 2 and z == sorted(z) for z in zones)
    other = tmp_path / "seed1"
    convert.convert(_options("flair2", flair2_tree, other, splits=("train",), num_shards=3, shard_seed=1))
    zones1 = [[r["zone"].numpy() for r in _records_of_shard(other, name)] for name in names]
    assert zones1 != zones and sorted(sum(zones1, [])) == sorted(sum(zones, []))


def _records_of_shard(directory, name):
    info = schema.load_dataset_info(str(directory))
    spec = schema.RecordSpec.from_info(info)
    return [schema.decode(r, spec) for r in tf.data.TFRecordDataset(os.path.join(directory, name))]


# --------------------------------------------------------------------------- bad input


def _fails_naming(task, root, out, pattern):
    with pytest.raises((readers.FlairDataError, writer.ConversionError)) as e:
        convert.convert(_options(task, root, out))
    assert pattern in str(e.value), str(e.value)
    assert not glob.glob(os.path.join(str(out), "*.incomplete"))
    return str(e.value)


def test_corrupt_geotiff(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[1]
    with open(img, "r+b") as f:
        f.write(b"\x00garbage" * 16)
    _fails_naming("flair1", root, tmp_path / "out", os.path.basename(img))


def test_truncated_geotiff(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[2]
    with open(img, "r+b") as f:
        f.truncate(os.path.getsize(img) // 2)
    _fails_naming("flair1", root, tmp_path / "out", os.path.basename(img))


def test_wrong_band_count(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[0]
    _write_tif(img, np.zeros((4, P, P), np.uint8))
    msg = _fails_naming("flair1", root, tmp_path / "out", os.path.basename(img))
    assert "4 band(s), expected 5" in msg


def test_mask_missing_fails_or_is_skipped(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[3]
    msk = img.replace("flair_aerial_train", "flair_labels_train").replace("/img/IMG_", "/msk/MSK_")
    os.remove(msk)
    msg = _fails_naming("flair1", root, tmp_path / "out", os.path.basename(img))
    assert "no mask" in msg
    # skip: the patch is left out, listed with its reason; counts and records agree.
    out = tmp_path / "skip"
    info = convert.convert(_options("flair1", root, out, on_error="skip"))
    s = info["splits"]["val"]
    assert s["num_examples"] == 7 == sum(x["num_examples"] for x in s["shards"])
    assert s["skipped"][0]["file"] == img and "no mask" in s["skipped"][0]["reason"]
    assert len(_records(str(out), "flair1", "val")) == 7
    assert verify.verify(str(out), show_progress=False).ok


@pytest.mark.parametrize("code", [0, 25])
def test_label_code_out_of_range(flair1_tree, tmp_path, code):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[1]
    msk = img.replace("flair_aerial_train", "flair_labels_train").replace("/img/IMG_", "/msk/MSK_")
    with rasterio.open(msk) as src:
        mask = src.read()
    mask[0, 5, 5] = code
    _write_tif(msk, mask)
    msg = _fails_naming("flair1", root, tmp_path / "out", os.path.basename(msk))
    assert f"{code} (1 px)" in msg


def test_metadata_key_or_record_missing(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    path = os.path.join(root, "flair-1_metadata_aerial.json")
    meta = json.load(open(path))
    name = os.path.basename(_val_images(root)[0])[:-4]
    del meta[name]["camera"]
    json.dump(meta, open(path, "w"))
    msg = _fails_naming("flair1", root, tmp_path / "out", "flair-1_metadata_aerial.json")
    assert name in msg and "camera" in msg
    # skip: only that patch is left out, with the missing key named; a malformed entry is ignored.
    meta["IMG_not_a_patch"] = []
    json.dump(meta, open(path, "w"))
    info = convert.convert(_options("flair1", root, tmp_path / "skip", on_error="skip"))
    s = info["splits"]["val"]
    assert s["num_examples"] == 7 == len(_records(str(tmp_path / "skip"), "flair1", "val"))
    assert [x["file"] for x in s["skipped"]] == [_val_images(root)[0]]
    assert "camera" in s["skipped"][0]["reason"] and "metadata JSON" in s["skipped"][0]["reason"]
    del meta["IMG_not_a_patch"]
    del meta[name]
    json.dump(meta, open(path, "w"))
    msg = _fails_naming("flair1", root, tmp_path / "out2", f"{name}.tif")
    assert "metadata JSON" in msg


def test_centroid_missing_or_outside_super_area(flair2_tree, tmp_path):
    root = _copy(flair2_tree, tmp_path)
    path = os.path.join(root, "flair-2_centroids_sp_to_patch.json")
    cents = json.load(open(path))
    name = os.path.basename(_val_images(root)[0])
    cents[name] = [3, 500]
    json.dump(cents, open(path, "w"))
    msg = _fails_naming("flair2", root, tmp_path / "out", name)
    assert "outside" in msg and "super-area" in msg
    del cents[name]
    json.dump(cents, open(path, "w"))
    msg = _fails_naming("flair2", root, tmp_path / "out2", name)
    assert "centroid JSON" in msg


def _sentinel_base(root):
    return sorted(glob.glob(os.path.join(root, "flair_sen_train", "D004_2021", "*", "sen", "*_data.npy")))[0][: -len("_data.npy")]


def test_sentinel_data_and_masks_with_different_t(flair2_tree, tmp_path):
    root = _copy(flair2_tree, tmp_path)
    base = _sentinel_base(root)
    masks = np.load(base + "_masks.npy")
    np.save(base + "_masks.npy", masks[:-1])
    msg = _fails_naming("flair2", root, tmp_path / "out", os.path.basename(base) + "_masks.npy")
    assert f"expected T={masks.shape[0]}" in msg


def test_products_shorter_than_t(flair2_tree, tmp_path):
    root = _copy(flair2_tree, tmp_path)
    base = _sentinel_base(root)
    lines = open(base + "_products.txt").read().split()
    open(base + "_products.txt", "w").write("\n".join(lines[:-2]) + "\n")
    msg = _fails_naming("flair2", root, tmp_path / "out", os.path.basename(base) + "_products.txt")
    assert f"lists {len(lines) - 2} product(s), expected {len(lines)}" in msg


def test_cli_bad_input_exits_nonzero_without_traceback(flair1_tree, tmp_path):
    root = _copy(flair1_tree, tmp_path)
    img = _val_images(root)[0]
    _write_tif(img, np.zeros((3, P, P), np.uint8))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_to_tfrecords.py"), "--task=flair1",
         f"--data_root={root}", f"--output_dir={tmp_path / 'out'}", "--splits=val", f"--patch_size={P}",
         "--num_workers=1", "--noprogress"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"error: {os.path.basename(img)} has 3 band(s), expected 5" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- kill/resume


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """Enough small patches (one per shard) that a conversion can be killed midway."""
    from flair_tf.data import synthetic

    root = tmp_path_factory.mktemp("big_tree")
    synthetic.make_tree(str(root), task="flair1", num_domains=2, zones_per_domain=4, patches_per_zone=40,
                        num_test_domains=0, num_val_domains=0, patch_size=32, show_progress=False)
    return str(root)


def _shard_bytes(directory):
    return {os.path.basename(f): open(f, "rb").read()
            for f in glob.glob(schema.shard_pattern(str(directory), "flair1", "train"))}


def _alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_kill_midway_then_rerun_equals_uninterrupted_run(big_tree, tmp_path):
    # Reference: an uninterrupted in-process run, one worker.
    ref = tmp_path / "ref"
    convert.convert(convert.ConvertOptions(task="flair1", data_root=big_tree, output_dir=str(ref),
                                           splits=("train",), patch_size=32, num_shards=160,
                                           show_progress=False))
    expected = _shard_bytes(ref)
    assert len(expected) == 160
    out = tmp_path / "out"
    flagfile = tmp_path / "convert.flags"
    flagfile.write_text("\n".join([
        "--task=flair1", f"--data_root={big_tree}", f"--output_dir={out}", "--splits=train",
        "--patch_size=32", "--num_shards=160", "--num_workers=2", "--noprogress"]) + "\n")
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_to_tfrecords.py"), f"--flagfile={flagfile}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    side = out / writer.SIDECAR_DIR
    deadline = time.monotonic() + 120
    while not (side.is_dir() and any(side.iterdir())) and time.monotonic() < deadline:
        assert proc.poll() is None, "conversion ended before the first shard was seen"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)  # the parent only: workers must die with it (PR_SET_PDEATHSIG)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children), "worker processes outlived the killed conversion"
    done = _shard_bytes(out)
    assert 0 < len(done) < 160, f"{len(done)} shards complete at the kill; expected a partial run"
    for name, content in done.items():  # finished shards are whole and final
        assert content == expected[name]
    # Shards with a sidecar are complete for the rerun (one renamed just before the kill,
    # without its sidecar yet, is legitimately written again).
    kept = [n for n in done if (side / f"{n}.json").exists()]
    assert kept
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in kept}
    # The rerun (in-process, one worker) keeps the finished shards: the worker count is not
    # part of a shard's identity.
    rerun = subprocess.run(cmd + ["--num_workers=1"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _shard_bytes(out) == expected
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == mtimes  # kept, not rewritten
    assert not glob.glob(os.path.join(str(out), "*.incomplete"))
    info, ref_info = schema.load_dataset_info(str(out)), schema.load_dataset_info(str(ref))
    assert info["splits"] == ref_info["splits"]


@pytest.mark.parametrize("shape,fill", [((5, 64, 64), None), ((5, 512, 512), 255), ((2, 300, 301), None),
                                        ((1, 512, 512), 255)])
def test_fast_band_sums_and_code_histogram_are_exact(shape, fill):
    """The uint32 fast paths equal Python-int arithmetic, at the overflow limits too; the bands
    are interleaved (channels-last), as the converter counts the aerial bands and the elevation."""
    from flair_tf.data.convert import Statistics

    rng = np.random.RandomState(0)
    bands = np.full(shape, fill, np.uint8) if fill is not None else rng.randint(0, 256, shape).astype(np.uint8)
    sums, sumsq = Statistics._uint8_channels_last_sums(np.ascontiguousarray(bands.transpose(1, 2, 0)))
    for b in range(shape[0]):
        values = bands[b].astype(object).ravel()
        assert int(sums[b]) == sum(values)
        assert int(sumsq[b]) == int((bands[b].astype(np.uint64) ** 2).sum())
    for lab in (bands[0], bands[0].reshape(-1)[1:]):  # odd and even pixel counts, unaligned view
        np.testing.assert_array_equal(Statistics.code_histogram(lab), np.bincount(lab.ravel(), minlength=256))


@pytest.mark.parametrize("rows", [66051, 66052])
def test_channels_last_sums_at_the_uint32_limit_are_exact(rows):
    """66,051 rows of 255**2 fit uint32; past that the uint64 path takes over."""
    from flair_tf.data.convert import Statistics

    x = np.full((rows, 1, 2), 255, np.uint8)
    x[0, 0, 1] = 3
    sums, sumsq = Statistics._uint8_channels_last_sums(x)
    assert [int(v) for v in sums] == [rows * 255, (rows - 1) * 255 + 3]
    assert [int(v) for v in sumsq] == [rows * 255**2, (rows - 1) * 255**2 + 9]


@pytest.mark.parametrize("num_rows", [3, 65536, 65538])
def test_sentinel_band_sums_are_exact_at_the_uint32_limit(num_rows):
    """uint16 sums accumulate in uint32 up to 65,536 rows, in uint64 beyond (65,538 maximal rows overflow uint32)."""
    from flair_tf.data.convert import Statistics

    crop = np.full((num_rows, 1, 1, 10), 65535, np.uint16)
    crop[0, 0, 0, 0] = 7
    sums, sumsq = Statistics._band_sums(crop, np.uint32, channels_last=True)
    values = crop.reshape(-1, 10).astype(object)
    assert [int(v) for v in sums] == [sum(values[:, b]) for b in range(10)]
    assert [int(v) for v in sumsq] == [sum(v * v for v in values[:, b]) for b in range(10)]
