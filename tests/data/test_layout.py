"""Tests of tree discovery: folder names, pairing by id and zone, CSV lists, split rules."""

import dataclasses
import logging
import os
import shutil

import pytest

from flair_tf.data import layout, readers
from flair_tf.data.readers import FlairDataError


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb"):
        pass
    return str(path)


def _img(root, domain, zone, pid, folder="flair_aerial_train"):
    return _touch(os.path.join(root, folder, domain, zone, "img", f"IMG_{pid}.tif"))


def _msk(root, domain, zone, pid, folder="flair_labels_train"):
    return _touch(os.path.join(root, folder, domain, zone, "msk", f"MSK_{pid}.tif"))


def test_discover_flair1_splits_by_domain(flair1_tree):
    tree = layout.discover(flair1_tree, "flair1")
    assert tree.task == "flair1" and tree.centroids_json is None
    assert os.path.basename(tree.metadata_json) == "flair-1_metadata_aerial.json"
    assert {p.domain for p in tree.splits["val"]} == {"D004_2021"}
    assert "D004_2021" not in {p.domain for p in tree.splits["train"]}
    assert {p.domain for p in tree.splits["test"]} == {"D012_2019"}
    assert [len(tree.splits[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    for patches in tree.splits.values():
        ids = [int(p.patch_id) for p in patches]
        assert ids == sorted(ids)
        for p in patches:
            assert os.path.basename(p.image) == f"IMG_{p.patch_id}.tif" == p.name + ".tif"
            assert os.path.basename(p.mask) == f"MSK_{p.patch_id}.tif"
            assert f"/{p.domain}/{p.zone}/" in p.image and f"/{p.domain}/{p.zone}/" in p.mask
            assert p.sentinel is None
    # Test ids come after every train id.
    assert min(int(p.patch_id) for p in tree.splits["test"]) > max(
        int(p.patch_id) for s in ("train", "val") for p in tree.splits[s])


def test_discover_flair2_pairs_sentinel_by_zone(flair2_tree):
    tree = layout.discover(flair2_tree, "flair2", splits=("val", "test"))
    assert set(tree.splits) == {"val", "test"}
    assert os.path.basename(tree.centroids_json) == "flair-2_centroids_sp_to_patch.json"
    assert os.path.basename(tree.metadata_json) == "flair_aerial_metadata.json"
    for split, folder in (("val", "flair_sen_train"), ("test", "flair_2_sen_test")):
        for p in tree.splits[split]:
            stem = f"SEN2_sp_{p.domain}-{p.zone}"
            assert p.sentinel.data.endswith(f"{folder}/{p.domain}/{p.zone}/sen/{stem}_data.npy")
            assert p.sentinel.masks.endswith(f"{stem}_masks.npy")
            assert p.sentinel.products.endswith(f"{stem}_products.txt")


def test_user_val_domains_and_absent_domain_warns(flair1_tree, caplog):
    with caplog.at_level(logging.WARNING):
        tree = layout.discover(flair1_tree, "flair1", splits=("train", "val"),
                               val_domains=["D006_2020", "D999_2020"])
    assert {p.domain for p in tree.splits["val"]} == {"D006_2020"}
    assert "D004_2021" in {p.domain for p in tree.splits["train"]}
    assert "D999_2020" in caplog.text
    empty = layout.discover(flair1_tree, "flair1", splits=("train", "val"), val_domains=())
    assert empty.splits["val"] == [] and len(empty.splits["train"]) == 32


def test_toy_dataset_folder_names(flair1_tree, tmp_path):
    toy = tmp_path / "flair_1_toy_dataset"
    for released, name in (("flair_aerial_train", "flair_1_toy_aerial_train"),
                           ("flair_labels_train", "flair_1_toy_labels_train"),
                           ("flair_1_aerial_test", "flair_1_toy_aerial_test"),
                           ("flair_1_labels_test", "flair_1_toy_labels_test")):
        shutil.copytree(os.path.join(flair1_tree, released), toy / name)
    for root in (tmp_path, toy):  # the toy folder or its parent
        tree = layout.discover(str(root), "flair1")
        assert [len(tree.splits[s]) for s in ("train", "val", "test")] == [24, 8, 8]
        assert "flair_1_toy_aerial_test" in tree.splits["test"][0].image


def test_pairing_is_by_id_and_zone_not_sort_order(tmp_path, caplog):
    root = str(tmp_path)
    images = {pid: _img(root, "D006_2020", "Z1_AA", pid) for pid in ("000005", "000010")}
    masks = {pid: _msk(root, "D006_2020", "Z1_AA", pid) for pid in ("000005", "000010")}
    # An orphan mask sorting between the two: pairing by sort order would give 10 -> 7.
    _msk(root, "D006_2020", "Z1_AA", "000007")
    # Ids in another zone: 000002 sorts before both; 000003's mask lives in its own zone.
    images["000002"] = _img(root, "D006_2020", "Z2_UU", "000002")
    masks["000002"] = _msk(root, "D006_2020", "Z2_UU", "000002")
    with caplog.at_level(logging.WARNING):
        tree = layout.discover(root, "flair1", splits=("train",), val_domains=())
    patches = tree.splits["train"]
    assert [p.patch_id for p in patches] == ["000002", "000005", "000010"]
    for p in patches:
        assert p.image == images[p.patch_id] and p.mask == masks[p.patch_id]
    assert patches[0].zone == "Z2_UU"
    assert "MSK_000007.tif" in caplog.text


def test_mask_in_another_zone_is_not_paired(tmp_path):
    root = str(tmp_path)
    image = _img(root, "D006_2020", "Z1_AA", "000001")
    _msk(root, "D006_2020", "Z3_NN", "000001")
    with pytest.raises(FlairDataError) as err:
        layout.discover(root, "flair1", splits=("train",), val_domains=())
    assert image in str(err.value) and "exists in D006_2020/Z3_NN" in str(err.value)


def test_missing_mask_is_an_error_unless_labels_not_required(tmp_path):
    root = str(tmp_path)
    _img(root, "D006_2020", "Z1_AA", "000001")
    lonely = _img(root, "D006_2020", "Z1_AA", "000002")
    _msk(root, "D006_2020", "Z1_AA", "000001")
    with pytest.raises(FlairDataError, match=r"IMG_000002\.tif: no mask MSK_000002\.tif") as err:
        layout.discover(root, "flair1", splits=("train",), val_domains=())
    assert lonely in str(err.value)
    tree = layout.discover(root, "flair1", splits=("train",), val_domains=(), require_labels=False)
    assert [p.mask is None for p in tree.splits["train"]] == [False, True]


def test_test_split_without_labels_folder(tmp_path):
    root = str(tmp_path)
    _img(root, "D012_2019", "Z1_UU", "000100", folder="flair_1_aerial_test")
    with pytest.raises(FlairDataError, match="flair_1_labels_test"):
        layout.discover(root, "flair1", splits=("test",))
    tree = layout.discover(root, "flair1", splits=("test",), require_labels=False)
    assert tree.splits["test"][0].mask is None


def test_duplicate_ids_across_zones(tmp_path):
    root = str(tmp_path)
    _img(root, "D006_2020", "Z1_AA", "000001")
    _img(root, "D007_2020", "Z2_AA", "000001")
    with pytest.raises(FlairDataError, match="IMG_000001.tif appears twice"):
        layout.discover(root, "flair1", splits=("train",), require_labels=False)


def test_missing_aerial_folder_and_sentinel_files(tmp_path, flair2_tree):
    with pytest.raises(FlairDataError, match="flair_aerial_train"):
        layout.discover(str(tmp_path), "flair1", splits=("train",))
    copy = tmp_path / "copy"
    shutil.copytree(flair2_tree, copy)
    victim = layout.discover(str(copy), "flair2", splits=("test",)).splits["test"][0].sentinel
    os.remove(victim.masks)
    with pytest.raises(FlairDataError, match=r"_masks\.npy: missing"):
        layout.discover(str(copy), "flair2", splits=("test",))


def test_csv_lists_relative_and_absolute(flair1_tree, tmp_path):
    tree = layout.discover(flair1_tree, "flair1", splits=("val", "test"))
    csv_dir = str(tmp_path / "csv_lists")  # relative paths climb out of it: ../../...
    os.makedirs(csv_dir)
    rel = os.path.join(csv_dir, "val.csv")
    with open(rel, "w") as f:  # IGN's form: ../flair_aerial_train/...,../flair_labels_train/...
        for p in reversed(tree.splits["val"]):
            f.write(f"{os.path.relpath(p.image, csv_dir)},{os.path.relpath(p.mask, csv_dir)}\n")
    absolute = str(tmp_path / "test.csv")
    with open(absolute, "w") as f:
        for p in tree.splits["test"][:3]:
            f.write(f"{p.image},{p.mask}\n")
    from_csv = layout.discover(flair1_tree, "flair1", splits=("val", "test"),
                               csv_lists={"val": rel, "test": absolute})
    assert from_csv.splits["val"] == tree.splits["val"]
    assert from_csv.splits["test"] == tree.splits["test"][:3]


def test_csv_errors(flair1_tree, tmp_path):
    p = layout.discover(flair1_tree, "flair1", splits=("test",)).splits["test"][0]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{p.image},{p.mask.replace(p.patch_id, '000001')}\n")
    with pytest.raises(FlairDataError, match=r"bad\.csv line 1: mask .* does not match"):
        layout.discover(flair1_tree, "flair1", splits=("test",), csv_lists={"test": str(bad)})
    bad.write_text(f"{p.image}\n")
    with pytest.raises(FlairDataError, match="no mask path"):
        layout.discover(flair1_tree, "flair1", splits=("test",), csv_lists={"test": str(bad)})
    tree = layout.discover(flair1_tree, "flair1", splits=("test",), csv_lists={"test": str(bad)},
                           require_labels=False)
    assert tree.splits["test"][0].mask is None
    bad.write_text("image_path,mask_path\n")
    with pytest.raises(FlairDataError, match="without a header"):
        layout.discover(flair1_tree, "flair1", splits=("test",), csv_lists={"test": str(bad)})


def test_csv_flair2_finds_sentinel(flair2_tree, tmp_path):
    p = layout.discover(flair2_tree, "flair2", splits=("test",)).splits["test"][0]
    path = tmp_path / "test.csv"
    path.write_text(f"{p.image},{p.mask}\n")
    tree = layout.discover(flair2_tree, "flair2", splits=("test",), csv_lists={"test": str(path)})
    assert tree.splits["test"] == [p]


def test_bad_arguments(flair1_tree):
    with pytest.raises(ValueError, match="task"):
        layout.discover(flair1_tree, "flair3")
    with pytest.raises(ValueError, match="splits"):
        layout.discover(flair1_tree, "flair1", splits=("training",))
    assert layout.released_folder("flair2", "sen", "test") == "flair_2_sen_test"
    assert len(layout.OFFICIAL_VAL_DOMAINS) == 8


def test_remote_tree_through_gfile(flair2_tree, tmp_path):
    """gs:// trees are listed through tf.io.gfile; TF's in-memory ram:// file system stands in."""
    tf = pytest.importorskip("tensorflow")
    local = layout.discover(flair2_tree, "flair2", splits=("val",))
    remote_root = f"ram://{tmp_path.name}"
    paths = {path for p in local.splits["val"]
             for path in (p.image, p.mask, *dataclasses.astuple(p.sentinel))}
    for path in sorted(paths):  # once each: ram:// appends when a copy overwrites
        target = remote_root + "/" + os.path.relpath(path, flair2_tree)
        tf.io.gfile.makedirs(os.path.dirname(target))
        tf.io.gfile.copy(path, target)
    tree = layout.discover(remote_root, "flair2", splits=("val",))
    assert [p.patch_id for p in tree.splits["val"]] == [p.patch_id for p in local.splits["val"]]
    p = tree.splits["val"][0]
    assert p.image.startswith(f"{remote_root}/flair_aerial_train/D004_2021/")
    assert p.sentinel.data.startswith(f"{remote_root}/flair_sen_train/D004_2021/")
    # A CSV with relative paths resolves against its remote folder, keeping the scheme.
    with tf.io.gfile.GFile(remote_root + "/lists/val.csv", "w") as f:
        f.write(f"../{os.path.relpath(local.splits['val'][0].image, flair2_tree)},"
                f"../{os.path.relpath(local.splits['val'][0].mask, flair2_tree)}\n")
    from_csv = layout.discover(remote_root, "flair2", splits=("val",),
                               csv_lists={"val": remote_root + "/lists/val.csv"})
    assert from_csv.splits["val"] == [p]
    # The Sentinel arrays and products are read through gfile too (into memory).
    series = readers.read_sentinel(p.sentinel)
    assert series.data.shape[1] == 10 and len(series.dates) == series.data.shape[0]
