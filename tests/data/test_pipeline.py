"""make_dataset end to end on small hand-written records (P = 16, S = 8)."""

import json
import os
import posixpath
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from flair_tf import nomenclature
from flair_tf.data import augment as augment_lib
from flair_tf.data import metadata as metadata_lib
from flair_tf.data import pipeline as pl
from flair_tf.data import schema
from flair_tf.data import sentinel as sentinel_lib

P, S = 16, 8


def label_of(rows, cols):
    """The label code at (row, col): every code 1..19 appears."""
    return ((rows * P + cols) % 19 + 1).astype(np.uint8)


def make_example(k, task, rng):
    """aerial R = row, G = column, B = k, so any pixel says where it came from."""
    rows, cols = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    aerial = np.stack([rows, cols, np.full_like(rows, k), rng.integers(0, 256, (P, P))], -1)
    meta = {"domain": "D004_2021", "zone": "Z1_AA", "patch_centroid_x": 924009.6 + k,
            "patch_centroid_y": 6339451.2, "patch_centroid_z": 161.9, "camera": "UCE-M3",
            "date": f"2021-{1 + k % 12:02d}-{1 + k % 28:02d}", "time": "10h07"}
    ex = {"aerial": aerial.astype(np.uint8), "elevation": (255 - rows)[..., None].astype(np.uint8),
          "label": label_of(rows, cols), "metadata": meta, "patch_id": f"{k:06d}",
          "domain": "D004_2021", "zone": "Z1_AA", "crs_wkt": "EPSG:2154",
          "transform": (0.2, 0.0, 1000.0 + k, 0.0, -0.2, 2000.0)}
    if task == "flair2":
        t = 4 + k % 5
        ex["sentinel_data"] = rng.integers(0, 20000, (t, S + 2, S + 2, 10), dtype=np.uint16)
        ex["sentinel_masks"] = (rng.integers(0, 101, (t, S + 2, S + 2, 2)) // 2 + 20).astype(np.uint8)
        months = np.sort(rng.choice(12, t, replace=False)) + 1
        ex["sentinel_dates"] = 20210000 + months * 100 + rng.integers(1, 29, t)
    return ex


def write_records(directory, task, split, num, num_shards, seed=0, compression=None,
                  with_counts=True, byte_layout="aligned64"):
    """Shards + a dataset_info.json like the converter's (the keys the pipeline reads).

    `byte_layout` "aligned64" writes the converter's records (`schema.serialize`),
    "protobuf" protobuf's own serialization of the same examples.
    """
    rng = np.random.default_rng(seed)
    tf.io.gfile.makedirs(directory)
    shards, k, examples = [], 0, {}
    for s in range(num_shards):
        name = schema.shard_name(task, split, s, num_shards)
        n = num // num_shards + (s < num % num_shards)
        with tf.io.TFRecordWriter(posixpath.join(directory, name),
                                  options=compression or "") as w:
            for _ in range(n):
                ex = make_example(k, task, rng)
                examples[ex["patch_id"]] = ex
                w.write(bytes(schema.serialize(ex)) if byte_layout == "aligned64"
                        else schema.encode(ex).SerializeToString())
                k += 1
        shards.append({"file": name, "num_examples": n})
    info = {"schema_version": schema.SCHEMA_VERSION, "task": task, "patch_size": P,
            "sentinel_size": S + 2 if task == "flair2" else None, "compression": compression,
            "byte_layout": byte_layout,
            "splits": {split: {"num_examples": num, "shards": shards,
                               "aerial_stats": {"mean": [1, 2, 3, 4], "std": [5, 6, 7, 8]},
                               "elevation_stats": {"mean": [9], "std": [10]}}}}
    with tf.io.gfile.GFile(posixpath.join(directory, "dataset_info.json"), "w") as f:
        if not with_counts:
            del info["splits"][split]["shards"]
        json.dump(info, f)
    return examples


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    out = {}
    for task, split, n, shards in (("flair1", "train", 12, 4), ("flair1", "val", 11, 3),
                                   ("flair2", "train", 8, 2), ("flair2", "val", 7, 3)):
        d = str(root / f"{task}_{split}")
        out[task, split] = (d, write_records(d, task, split, n, shards))
    return out


def batches(ds, n=None):
    out = []
    for i, b in enumerate(ds.as_numpy_iterator()):
        if n is not None and i == n:
            break
        out.append(b)
    return out


def eval_ids(ds):
    ids = []
    for f, _ in ds.as_numpy_iterator():
        ids += [p.decode() for p, v in zip(f["patch_id"], f["valid"]) if v]
    return ids


# ------------------------------------------------------------------------------ config


def test_config_json_round_trip_and_validation():
    cfg = pl.PipelineConfig(task="flair2", channels=["NIR", "R"], norm_type="custom",
                            norm_means=[1, 2], norm_stds=[3, 4], keep_keys=["domain"])
    back = pl.PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.channels == ("NIR", "R")
    with pytest.raises(ValueError, match="unknown PipelineConfig keys"):
        pl.PipelineConfig.from_dict({"task": "flair1", "batchsize": 3})
    for bad in ({"channels": ("R", "X")}, {"channels": ("R", "R")}, {"num_classes": 12},
                {"sentinel_scaling": "minmax"}, {"ref_date": "5/15"},
                {"norm_type": "custom", "norm_means": (1.0,)}):
        with pytest.raises(ValueError):
            pl.PipelineConfig(**bad)
    assert pl.PipelineConfig(average_month=False, max_dates=20).num_dates == 20


# ------------------------------------------------------------------------------ flair1


@pytest.mark.parametrize("num_classes", [13, 19])
def test_evaluation_batches_cover_every_example_once(records, num_classes):
    directory, examples = records["flair1", "val"]
    cfg = pl.PipelineConfig(channels=("NIR", "R", "E"), num_classes=num_classes,
                            use_metadata=True, keep_keys=("transform",))
    ds = pl.make_dataset(directory, "val", cfg, batch_size=4, pad_final_batch=True)
    spec = ds.element_spec[0]
    assert spec["aerial"].shape == (4, P, P, 3) and spec["aerial"].dtype == tf.uint8
    assert ds.element_spec[1]["aerial"].dtype == tf.uint8  # cast by losses and metrics
    got = batches(ds)
    assert len(got) == 3  # 11 examples -> 4 + 4 + 3 real, 1 filler
    assert [int(f["valid"].sum()) for f, _ in got] == [4, 4, 3]
    seen = []
    for f, lab in got:
        for i in np.flatnonzero(f["valid"]):
            ex = examples[f["patch_id"][i].decode()]
            seen.append(f["patch_id"][i].decode())
            np.testing.assert_array_equal(f["aerial"][i], np.concatenate(
                [ex["aerial"][..., [3, 0]], ex["elevation"]], -1))
            np.testing.assert_array_equal(lab["aerial"][i],
                                          nomenclature.remap(ex["label"], num_classes))
            np.testing.assert_array_equal(f["metadata"][i],
                                          metadata_lib.encode_metadata(ex["metadata"]).astype(np.float32))
            np.testing.assert_array_equal(f["transform"][i], ex["transform"])
        filler = ~f["valid"]
        assert not f["aerial"][filler].any() and not f["metadata"][filler].any()
    assert sorted(seen) == sorted(examples)
    # evaluation order is the file order: deterministic
    assert eval_ids(pl.make_dataset(directory, "val", cfg, 4, pad_final_batch=True)) == seen


def test_month_quirk_fix_matches_metadata_module(records):
    directory, examples = records["flair1", "val"]
    cfg = pl.PipelineConfig(use_metadata=True, fix_month_quirk=True)
    ds = pl.make_dataset(directory, "val", cfg, batch_size=11, pad_final_batch=True)
    (f, _), = batches(ds)
    months = set()
    for i, pid in enumerate(f["patch_id"]):
        meta = examples[pid.decode()]["metadata"]
        months.add(meta["date"][5:7])
        expected = metadata_lib.encode_metadata(meta, fix_month_quirk=True).astype(np.float32)
        np.testing.assert_array_equal(f["metadata"][i], expected)
    assert len(months) == 11  # the fix is checked on 11 different months


def test_training_batches_static_seeded_and_augmented(records):
    directory, examples = records["flair1", "train"]
    cfg = pl.PipelineConfig(augment=True, seed=7, keep_keys=("patch_id",))
    ds = pl.make_dataset(directory, "train", cfg, batch_size=5)
    assert ds.element_spec[0]["aerial"].shape == (5, P, P, 5)  # drop_remainder: static
    first = batches(ds, 6)  # 30 examples: 2.5 epochs of 12, repeated
    second = batches(pl.make_dataset(directory, "train", cfg, batch_size=5), 6)
    for (fa, la), (fb, lb) in zip(first, second):
        np.testing.assert_array_equal(fa["aerial"], fb["aerial"])
        np.testing.assert_array_equal(la["aerial"], lb["aerial"])
    other = batches(pl.make_dataset(directory, "train", pl.PipelineConfig(
        augment=True, seed=8, keep_keys=("patch_id",)), batch_size=5), 6)
    order = lambda bs: [p for f, _ in bs for p in f["patch_id"]]  # noqa: E731
    assert order(first) != order(other)
    epoch = order(first)[:12]
    assert sorted(p.decode() for p in epoch) == sorted(examples)  # one epoch before the next
    transforms = set()
    for f, lab in first:
        img = f["aerial"]
        # labels followed the pixels: label == f(source row, source column)
        np.testing.assert_array_equal(
            lab["aerial"], nomenclature.remap(label_of(img[..., 0], img[..., 1]), 13))
        np.testing.assert_array_equal(img[..., 4], 255 - img[..., 0])  # elevation moved too
        transforms |= {img[i, 0, 0, :2].tobytes() + img[i, 0, 1, :2].tobytes()
                       for i in range(len(img))}
    assert len(transforms) >= 5  # several of the 8 transforms were drawn


def test_sharding_per_input_pipeline(records):
    directory, examples = records["flair1", "val"]  # 3 files
    cfg = pl.PipelineConfig()
    # file-level, then (fewer files than pipelines) example-level; then 2 replicas per pipeline
    for pipelines, replicas in ((2, 2), (4, 4), (2, 4)):
        ids, steps = [], set()
        for p in range(pipelines):
            ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=p,
                                             num_replicas_in_sync=replicas)
            ds = pl.make_dataset(directory, "val", cfg, batch_size=2 * replicas,
                                 input_context=ctx, pad_final_batch=True)
            assert ds.element_spec[0]["aerial"].shape[0] == 2
            ids_p = eval_ids(ds)
            steps.add(len(batches(ds)))
            ids += ids_p
        assert sorted(ids) == sorted(examples), pipelines
        assert len(steps) == 1  # every host runs the same number of evaluation steps
        # ... which evaluation_steps counts up front: one batch per replica per step
        per_pipeline = replicas // pipelines
        assert pl.evaluation_steps(directory, "val", cfg, 2 * replicas, pipelines, replicas) \
            == steps.pop() // per_pipeline, (pipelines, replicas)
    with pytest.raises(ValueError, match="do not divide"):
        pl.evaluation_steps(directory, "val", cfg, 8, 3, 4)


def test_training_shards_are_disjoint(records):
    directory, examples = records["flair1", "train"]  # 4 files of 3
    cfg = pl.PipelineConfig(keep_keys=("patch_id",))
    seen = []
    for p in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=p,
                                         num_replicas_in_sync=2)
        got = batches(pl.make_dataset(directory, "train", cfg, 4, input_context=ctx), 3)
        seen.append({x.decode() for f, _ in got for x in f["patch_id"]})
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 6


def test_missing_files_and_wrong_task(records, tmp_path):
    with pytest.raises(ValueError, match="does not match any files"):
        pl.make_dataset(str(tmp_path / "nothing-*"), "val", pl.PipelineConfig(), 2)
    directory, _ = records["flair2", "val"]
    with pytest.raises(ValueError, match="flair2 records"):
        pl.make_dataset(directory + "/flair2-val.tfrecord-*", "val", pl.PipelineConfig(), 2)


def test_non_local_filesystem_and_gzip():
    directory = "ram://pipeline_test/records"
    examples = write_records(directory, "flair1", "val", 5, 2, compression="GZIP")
    ds = pl.make_dataset(directory, "val", pl.PipelineConfig(), 2, pad_final_batch=True)
    assert sorted(eval_ids(ds)) == sorted(examples)


def test_evaluation_padding_without_shard_counts(tmp_path):
    """Without per-shard counts, batches stop at the first all-filler group of replicas."""
    examples = write_records(str(tmp_path), "flair1", "val", 7, 2, with_counts=False)
    ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    ds = pl.make_dataset(str(tmp_path), "val", pl.PipelineConfig(), 4, input_context=ctx,
                         pad_final_batch=True)
    got = batches(ds)
    # 7 examples, 2 per replica batch: 4 batches (the 4th has 1 real example), a multiple of 2
    assert [int(f["valid"].sum()) for f, _ in got] == [2, 2, 2, 1]
    assert sorted(eval_ids(ds)) == sorted(examples)
    ds = pl.make_dataset(str(tmp_path), "val", pl.PipelineConfig(), 6, input_context=ctx,
                         pad_final_batch=True)
    assert [int(f["valid"].sum()) for f, _ in batches(ds)] == [3, 3, 1, 0]
    # Without counts the number of steps is not known up front.
    assert pl.evaluation_steps(str(tmp_path), "val", pl.PipelineConfig(), 6, 1, 2) is None


# ------------------------------------------------------------------------------ flair2


def reference_transform(x, v, h, k, axes=(0, 1)):
    """VerticalFlip, HorizontalFlip, np.rot90 (the reference's albumentations order)."""
    x = np.flip(x, axes[0]) if v else x
    x = np.flip(x, axes[1]) if h else x
    return np.rot90(x, k, axes=axes)


def _dihedral(src_rows, src_cols):
    """The (vflip, hflip, k) that maps the coordinate grid to these source coordinates."""
    rows, cols = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    for v in (0, 1):
        for h in (0, 1):
            for k in range(4):
                if (reference_transform(rows, v, h, k) == src_rows).all() and \
                        (reference_transform(cols, v, h, k) == src_cols).all():
                    return v, h, k
    raise AssertionError("not a flip/rot90 of the grid")


@pytest.mark.parametrize("augment_sentinel", [False, True])
def test_flair2_sentinel_features_and_labels(records, augment_sentinel):
    directory, examples = records["flair2", "train"]
    common = dict(task="flair2", sentinel_size=S, use_metadata=True, seed=3,
                  keep_keys=("patch_id",))
    plain = batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**common), 4), 2)
    aug = batches(pl.make_dataset(directory, "train", pl.PipelineConfig(
        augment=True, augment_sentinel=augment_sentinel, **common), 4), 2)
    spec = pl.make_dataset(directory, "train", pl.PipelineConfig(**common), 4).element_spec
    assert spec[0]["sentinel"].shape == (4, 12, S, S, 10)
    assert spec[0]["sentinel_dates"].dtype == tf.float32
    assert spec[0]["sentinel_pad_mask"].dtype == tf.bool
    assert spec[1]["sentinel"].dtype == tf.uint8
    rotated = 0
    for (fp, lp), (fa, la) in zip(plain, aug):
        np.testing.assert_array_equal(fp["patch_id"], fa["patch_id"])  # same order
        for i, pid in enumerate(fp["patch_id"]):
            ex = examples[pid.decode()]
            # the stored 10 x 10 crop is centre-cropped to S = 8, then preprocessed
            c = slice(1, S + 1)
            frames, dates, pad = sentinel_lib.preprocess_sentinel(
                ex["sentinel_data"][:, c, c], ex["sentinel_masks"][:, c, c],
                ex["sentinel_dates"].astype(np.int32))
            np.testing.assert_array_equal(fp["sentinel"][i], frames.numpy())
            np.testing.assert_array_equal(fp["sentinel_dates"][i], dates.numpy())
            np.testing.assert_array_equal(fp["sentinel_pad_mask"][i], pad.numpy())
            remapped = nomenclature.remap(ex["label"], 13)
            np.testing.assert_array_equal(lp["sentinel"][i], remapped)
            v, h, k = _dihedral(fa["aerial"][i, ..., 0], fa["aerial"][i, ..., 1])
            rotated += (v, h, k) != (0, 0, 0)
            np.testing.assert_array_equal(la["aerial"][i], nomenclature.remap(
                label_of(fa["aerial"][i, ..., 0], fa["aerial"][i, ..., 1]), 13))
            np.testing.assert_array_equal(fa["sentinel_dates"][i], fp["sentinel_dates"][i])
            if augment_sentinel:
                np.testing.assert_array_equal(fa["sentinel"][i], reference_transform(
                    fp["sentinel"][i], v, h, k, axes=(1, 2)))
                np.testing.assert_array_equal(la["sentinel"][i], la["aerial"][i])
            else:  # reference: Sentinel patch and its labels are not augmented
                np.testing.assert_array_equal(fa["sentinel"][i], fp["sentinel"][i])
                np.testing.assert_array_equal(la["sentinel"][i], remapped)
    assert rotated >= 3


@pytest.mark.parametrize("task, augment, augment_sentinel, channels", [
    ("flair1", True, False, ("R", "G", "B", "NIR", "E")), ("flair1", True, False, ("B", "R")),
    ("flair1", False, False, ("E",)), ("flair2", True, False, ("NIR", "G", "E")),
    ("flair2", True, True, ("R", "G", "B", "NIR", "E")), ("flair2", False, False, ("R", "G", "B"))])
@pytest.mark.parametrize("mode, wide", [("eager", False), ("xla", False), ("graph", True)])
def test_device_finishing_gives_the_host_batches(records, task, augment, augment_sentinel, channels,
                                                 mode, wide):
    # aerial_on="device": the pipeline batches the record's aerial bytes as they are, with
    # the drawn moves; finish_batch (the training step's half: eagerly, under XLA, and in a
    # graph in int32 as on a GPU) must make of them exactly the batches of aerial_on="host".
    directory, _ = records[task, "train"]
    kw = dict(task=task, sentinel_size=S, augment=augment, augment_sentinel=augment_sentinel,
              channels=channels, seed=11, use_metadata=True)
    host = batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 4), 4)
    config = pl.PipelineConfig(aerial_on="device", **kw)
    ds = pl.make_dataset(directory, "train", config, 4)
    features_spec, labels_spec = ds.element_spec
    assert ("augment_move" in features_spec) == augment and "aerial" not in features_spec
    if augment:
        assert features_spec["augment_move"] == tf.TensorSpec([4], tf.int32)
    assert ("aerial_elevation" in features_spec) == ("E" in channels)
    assert ("aerial_rgbn" in features_spec) == (channels != ("E",))
    assert set(labels_spec) == {"aerial_codes"}  # labels made in the step, none batched twice
    step = lambda f, l: pl.finish_batch(f, l, config, wide=wide)  # noqa: E731
    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    moved = 0
    for (fh, lh), (fd, ld) in zip(host, batches(ds, 4)):
        moved += int((fd.get("augment_move", np.zeros(1)) != 0).sum())
        fa, la = step(fd, ld)
        assert set(fa) == set(fh) and set(la) == set(lh)
        for key in fh:
            np.testing.assert_array_equal(np.asarray(fa[key]), fh[key], err_msg=key)
            assert np.asarray(fa[key]).dtype == fh[key].dtype, key
        for key in lh:
            np.testing.assert_array_equal(np.asarray(la[key]), lh[key], err_msg=key)
            assert np.asarray(la[key]).dtype == np.uint8
    assert moved >= 6 if augment else moved == 0


@pytest.mark.parametrize("wide", [False, True])
def test_finish_batch_remaps_every_code_like_the_table(wide):
    codes = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    aerial = np.zeros((1, 16, 16, 4), np.uint8)
    for num_classes in (13, 19):
        config = pl.PipelineConfig(num_classes=num_classes, channels=("R",))
        _, labels = pl.finish_batch({"aerial_rgbn": aerial}, {"aerial_codes": codes}, config, wide=wide)
        np.testing.assert_array_equal(labels["aerial"], nomenclature.code_to_index_lut(num_classes)[codes])


def test_device_finishing_leaves_other_batches_alone(records):
    directory, _ = records["flair2", "val"]
    config = pl.PipelineConfig(task="flair2", sentinel_size=S, augment=True, aerial_on="device")
    (f, l), = batches(pl.make_dataset(directory, "val", config, 8, pad_final_batch=True))
    assert "aerial" in f and "augment_move" not in f and set(l) == {"aerial", "sentinel"}  # evaluation
    f2, l2 = pl.finish_batch(f, l, config)
    assert f2.keys() == f.keys() and l2.keys() == l.keys()
    with pytest.raises(ValueError, match="aerial_on"):
        pl.PipelineConfig(aerial_on="gpu")


def test_flair2_without_monthly_average(records):
    directory, examples = records["flair2", "val"]
    cfg = pl.PipelineConfig(task="flair2", sentinel_size=S, average_month=False, max_dates=6,
                            filter_clouds=False)
    ds = pl.make_dataset(directory, "val", cfg, 7, pad_final_batch=True)
    (f, _), = batches(ds)
    assert f["sentinel"].shape == (7, 6, S, S, 10)
    for i, pid in enumerate(f["patch_id"]):
        ex = examples[pid.decode()]
        t = min(len(ex["sentinel_dates"]), 6)
        assert (~f["sentinel_pad_mask"][i]).sum() == t
        assert f["sentinel"][i].max() <= 1.0  # uint16 / 65535
    assert f["sentinel_pad_mask"].any()  # series of 4 and 5 dates are padded


# ------------------------------------------------------------------------------ normalisation


def test_normalization_stats_and_model_input_layer():
    info = {"splits": {"train": {"aerial_stats": {"mean": [1, 2, 3, 4], "std": [5, 6, 7, 8]},
                                 "elevation_stats": {"mean": [9], "std": [10]}}}}
    assert pl.normalization_stats(pl.PipelineConfig(), info) == (None, None)
    cfg = pl.PipelineConfig(norm_type="custom", channels=("E", "R"))
    assert pl.normalization_stats(cfg) == ((53.26, 105.08), (79.3, 52.17))
    cfg = pl.PipelineConfig(norm_type="custom", channels=("E", "R"), norm_stats_from="dataset")
    assert pl.normalization_stats(cfg, info) == ((9.0, 1.0), (10.0, 5.0))
    with pytest.raises(ValueError, match="train split"):
        pl.normalization_stats(cfg, {"splits": {}})
    cfg = pl.PipelineConfig(norm_type="custom", channels=("G",), norm_means=(7,), norm_stds=(2,))
    assert pl.normalization_stats(cfg) == ((7.0,), (2.0,))
    assert pl.normalization_stats(pl.PipelineConfig(norm_type="without", channels=("R",))) == \
        ((0.0,), (1.0,))

    layers = pytest.importorskip("flair_tf.models.layers")
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(5, axis=-1)
    # reference: skimage.img_as_float(uint8) = x / 255 in float64, then torch float32
    out = np.asarray(layers.InputNormalization(None, None)(x))
    np.testing.assert_array_equal(out, (x.astype(np.float64) / 255.0).astype(np.float32))
    mean, std = pl.normalization_stats(pl.PipelineConfig(norm_type="custom"))
    out = np.asarray(layers.InputNormalization(mean, std)(x))
    ref = (x.astype(np.float64) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------ distribution

_DISTRIBUTED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from flair_tf.data import pipeline as pl
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    val_dir, train_dir = sys.argv[1], sys.argv[2]

    def replicas(values):
        return [v.numpy().tolist() for v in strategy.experimental_local_results(values)]

    out = {"replicas": strategy.num_replicas_in_sync, "eval": [], "train": {}}
    ds = strategy.distribute_datasets_from_function(lambda ctx: pl.make_dataset(
        val_dir, "val", pl.PipelineConfig(), 8, input_context=ctx, pad_final_batch=True))
    for f, _ in ds:
        out["eval"].append([[p.decode() for p, v in zip(ids, valid) if v] for ids, valid in
                            zip(replicas(f["patch_id"]), replicas(f["valid"]))])
    for seed in (1, 1, 2):
        cfg = pl.PipelineConfig(seed=seed, augment=True, keep_keys=("patch_id",))
        ds = strategy.distribute_datasets_from_function(
            lambda ctx: pl.make_dataset(train_dir, "train", cfg, 4, input_context=ctx))
        steps, it = [], iter(ds)
        for _ in range(3):
            f, _ = next(it)
            steps.append([[p.decode() for p in r] for r in replicas(f["patch_id"])])
        out["train"].setdefault(str(seed), []).append(steps)
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_strategy_two_logical_cpus(records):
    val_dir, val_examples = records["flair1", "val"]
    train_dir, train_examples = records["flair1", "train"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _DISTRIBUTED, val_dir, train_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT"):])
    assert out["replicas"] == 2
    # evaluation: 11 examples, per-replica batch 4 -> 3 batches, rounded up to 4 so
    # that both replicas get one in each of 2 steps; every example exactly once
    assert len(out["eval"]) == 2
    ids = [p for step in out["eval"] for rep in step for p in rep]
    assert sorted(ids) == sorted(val_examples)
    for step in out["eval"]:
        assert len(step) == 2 and not set(step[0]) & set(step[1])
    # training: replicas see different examples; same seed, same batches
    first, again = out["train"]["1"]
    assert first == again
    assert first != out["train"]["2"][0]
    for step in first:
        assert len(step[0]) == len(step[1]) == 2 and not set(step[0]) & set(step[1])
    assert set(p for step in first for rep in step for p in rep) <= set(train_examples)


# ------------------------------------------------------------------------------ converter output


def test_on_converted_synthetic_records(flair2_records):
    """The converter's real dataset_info.json: counts, compression, per-band stats."""
    info = schema.load_dataset_info(flair2_records)
    cfg = pl.PipelineConfig(task="flair2", use_metadata=True)
    pattern = schema.shard_pattern(flair2_records, "flair2", "val")
    ds = pl.make_dataset(pattern, "val", cfg, batch_size=3, pad_final_batch=True)
    ids = eval_ids(ds)
    assert len(ids) == len(set(ids)) == info["splits"]["val"]["num_examples"] > 0
    f, lab = next(ds.as_numpy_iterator())
    assert f["aerial"].shape == (3, info["patch_size"], info["patch_size"], 5)
    assert f["sentinel"].shape == (3, 12, 40, 40, 10)
    assert set(np.unique(lab["aerial"][f["valid"]])) <= set(range(13))
    real = ~f["sentinel_pad_mask"][f["valid"]]
    assert real.any(axis=1).all()  # every patch keeps at least one month
    mean, std = pl.normalization_stats(pl.PipelineConfig(norm_type="custom",
                                                         norm_stats_from="dataset"), info)
    stats = info["splits"]["train"]
    assert mean == tuple(stats["aerial_stats"]["mean"] + stats["elevation_stats"]["mean"])
    assert len(std) == 5 and all(s > 0 for s in std)


# ------------------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("stream_id, stride", [(0, 1), (1, 3)])
def test_augmentation_draws_are_the_per_example_draws(stream_id, stride):
    draws = list(pl.augmentation_draws(7, stream_id, stride, chunk=5).take(12))
    for n, move in enumerate(draws):
        want = augment_lib.sample_transform(tf.constant([7, n * stride + stream_id], tf.int64))
        assert move.dtype == tf.int32 and move.shape == ()
        assert int(move) == int(augment_lib.move_index(want)), n
    batched = list(pl.augmentation_draws(7, stream_id, stride, per_batch=4).take(3))
    assert all(b.shape == (4,) for b in batched)
    np.testing.assert_array_equal(np.concatenate(batched), [int(m) for m in draws])


@pytest.mark.parametrize("dtype", [tf.uint8, tf.int32])
@pytest.mark.parametrize("num_classes", [13, 19])
def test_remap_codes_equals_the_nomenclature_table(num_classes, dtype):
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = pl.remap_codes(tf.constant(codes), num_classes, dtype).numpy()
    assert got.dtype == dtype.as_numpy_dtype
    np.testing.assert_array_equal(got, nomenclature.code_to_index_lut(num_classes)[codes])


@pytest.mark.parametrize("channels", [(0, 1, 2, 3, 4), (0, 1, 2), (3, 4), (4,), (3, 0, 4)])
def test_pack_unpack_round_trip(channels):
    rng = np.random.default_rng(0)
    aerial = rng.integers(0, 256, (P, P, 4), dtype=np.uint8)
    elevation = rng.integers(0, 256, (P, P, 1), dtype=np.uint8)
    codes = rng.integers(0, 256, (P, P), dtype=np.uint8)
    words = pl._pack(tf.constant(aerial), tf.constant(elevation), tf.constant(codes))
    image, back = pl._unpack(words, channels)
    np.testing.assert_array_equal(image, np.concatenate([aerial, elevation], -1)[..., channels])
    assert back.dtype == tf.uint8
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("channels", [[4, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 4], [4, 3], [3, 0, 4],
                                      [2, 4, 3]])
def test_aerial_fn_applies_every_draw_like_numpy(jit_compile, channels):
    # All 16 draws (8 distinct moves) through the parser's aerial program: under XLA the
    # move is a compile-time constant, so each move runs its own specialised program.
    # The channel lists cover both ways of interleaving elevation under XLA (padded parts
    # OR-ed, E after or before a run of bands) and the gather of any other order.
    p = 12
    rows, cols = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    aerial = np.stack([rows, cols, rows * p + cols, (rows + 2 * cols) % 7], -1).astype(np.uint8)
    elevation = ((rows * 3 + cols) % 200).astype(np.uint8)[..., None]
    codes = ((rows * p + cols) % 19 + 1).astype(np.uint8)
    fn = pl.make_aerial_fn(channels, 13, augment=True, jit_compile=jit_compile,
                           with_unaugmented=True)
    want_image = np.concatenate([aerial, elevation], -1)[..., channels]
    want_label = nomenclature.code_to_index_lut(13)[codes]
    for vflip in (False, True):
        for hflip in (False, True):
            for k in range(4):
                t = augment_lib.Transform(tf.constant(vflip), tf.constant(hflip), tf.constant(k))
                image, label, unaugmented = fn(tf.constant(aerial), tf.constant(elevation),
                                               tf.constant(codes), augment_lib.move_index(t))
                np.testing.assert_array_equal(image.numpy(),
                                              reference_transform(want_image, vflip, hflip, k))
                np.testing.assert_array_equal(label.numpy(),
                                              reference_transform(want_label, vflip, hflip, k))
                np.testing.assert_array_equal(unaugmented.numpy(), want_label)


@pytest.mark.parametrize("augment", [True, False])
def test_xla_packed_and_generic_paths_give_the_same_batches(records, monkeypatch, augment):
    directory, _ = records["flair2", "train"]
    kw = dict(task="flair2", sentinel_size=S, augment=augment, channels=("NIR", "G", "E"), seed=5)
    results = [batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 4), 2)]
    kw["jit_compile"] = False
    results.append(batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 4), 2))
    monkeypatch.setattr(pl, "_LITTLE_ENDIAN", False)  # the big-endian fallback
    results.append(batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 4), 2))
    for other in results[1:]:
        for (ff, fl), (sf, sl) in zip(results[0], other):
            for key in ("aerial", "sentinel"):
                np.testing.assert_array_equal(ff[key], sf[key])
                np.testing.assert_array_equal(fl[key], sl[key])


@pytest.mark.parametrize("task", ["flair1", "flair2"])
def test_both_byte_layouts_give_the_same_batches(tmp_path, monkeypatch, task):
    # The same examples as the converter writes them (aligned64, decoded from slices of the
    # record) and as protobuf serializes them (parsed feature by feature); and aligned
    # records read as a big-endian host would (parsed).
    kw = dict(task=task, augment=True, seed=3, use_metadata=True)
    if task == "flair2":
        kw["sentinel_size"] = S
    results = []
    for layout in schema.BYTE_LAYOUTS:
        directory = str(tmp_path / layout)
        write_records(directory, task, "train", 6, 2, seed=7, byte_layout=layout)
        results.append(batches(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 3), 3))
        ids = eval_ids(pl.make_dataset(directory, "train", pl.PipelineConfig(**kw), 4,
                                       training=False, repeat=False, pad_final_batch=True))
        assert len(ids) == 6
    monkeypatch.setattr(schema, "_LITTLE_ENDIAN", False)
    results.append(batches(pl.make_dataset(str(tmp_path / "aligned64"), "train", pl.PipelineConfig(**kw), 3), 3))
    for other in results[1:]:
        for (ff, fl), (sf, sl) in zip(results[0], other):
            assert sorted(ff) == sorted(sf) and sorted(fl) == sorted(sl)
            for key in ff:
                np.testing.assert_array_equal(ff[key], sf[key], err_msg=key)
            for key in fl:
                np.testing.assert_array_equal(fl[key], sl[key], err_msg=key)
