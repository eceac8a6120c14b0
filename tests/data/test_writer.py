"""writer: shard counts, atomic writes, resume, errors, byte-identical parallel output."""

import json
import os

import pytest
import tensorflow as tf

from flair_tf.data import writer


class ToyEncoder:
    """Record i is a few bytes depending on i; item `bad` raises naming a file."""

    def __init__(self, bad=()):
        self.bad = set(bad)
        self.seen = []

    def encode(self, item):
        if item in self.bad:
            raise ValueError(f"IMG_{item:06d}.tif has 4 band(s), expected 5")
        self.seen.append(item)
        return f"record-{item}-".encode() * (item % 7 + 1)

    def describe(self, item):
        return f"/data/IMG_{item:06d}.tif"

    def collect(self):
        out, self.seen = {"sum": sum(self.seen)}, []
        return out


class ToyFactory:
    def __init__(self, bad=()):
        self.bad = tuple(bad)

    def __call__(self):
        return ToyEncoder(self.bad)


def _tasks(directory, n_items=20, n_shards=4, tag="a"):
    chunks = writer.split_items(list(range(n_items)), n_shards)
    return [
        writer.ShardTask(
            path=os.path.join(directory, f"toy-train.tfrecord-{i:05d}-of-{n_shards:05d}"),
            items=chunk,
            fingerprint=writer.fingerprint(tag, list(chunk)),
        )
        for i, chunk in enumerate(chunks)
    ]


def _read(path, compression=""):
    return [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type=compression)]


def _bytes(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)) if ".tfrecord-" in n}


def test_num_shards_for():
    mb = 1e6
    assert writer.num_shards_for(1000, 3000 * mb, target_shard_mb=150, min_shards=4) == 20
    assert writer.num_shards_for(1000, 10 * mb, target_shard_mb=150, min_shards=4) == 4
    assert writer.num_shards_for(3, 10 * mb, min_shards=16) == 3  # never an empty shard
    assert writer.num_shards_for(1000, 10 * mb, num_shards=7) == 7
    assert writer.num_shards_for(0, 0) == 0


def test_split_items_is_contiguous_and_balanced():
    chunks = writer.split_items(list(range(10)), 3)
    assert [len(c) for c in chunks] in ([3, 4, 3], [3, 3, 4], [4, 3, 3])
    assert [x for c in chunks for x in c] == list(range(10))


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_write_read_back_sidecars_and_byte_identical(tmp_path, compression):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        results = writer.write_shards(_tasks(str(d)), ToyFactory(), compression=compression, show_progress=False)
    assert [r.num_examples for r in results] == [5, 5, 5, 5]
    records = [x for r in results for x in _read(r.path, compression or "")]
    assert records == [ToyEncoder().encode(i) for i in range(20)]
    assert results[1].stats == {"sum": sum(range(5, 10))}
    side = json.loads(open(writer.sidecar_path(results[0].path)).read())
    assert side["num_examples"] == 5 and side["num_bytes"] == os.path.getsize(results[0].path)
    assert _bytes(a) == _bytes(b) and len(_bytes(a)) == 4
    assert not [n for n in os.listdir(a) if n.endswith(".incomplete")]


def test_record_file_writes_tfrecord_writers_bytes(tmp_path):
    pytest.importorskip("google_crc32c")
    crc = writer._crc32c_module()
    assert crc is not None, "google-crc32c without its compiled code: conversions get slower"
    records = [b"", b"x", bytearray(b"\x00\xff" * 70_001), memoryview(b"tail" * 999)]
    ours, theirs = str(tmp_path / "ours.tfrecord"), str(tmp_path / "tf.tfrecord")
    with writer.open_records(ours, None) as out:
        assert isinstance(out, writer.RecordFile)
        for r in records:
            out.write(r)
    with tf.io.TFRecordWriter(theirs) as out:
        for r in records:
            out.write(bytes(r))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    back = [t.numpy() for t in tf.data.TFRecordDataset(ours)]
    assert back == [bytes(r) for r in records]
    # GZIP stays with TensorFlow's writer.
    with writer.open_records(str(tmp_path / "z.tfrecord"), "GZIP") as z:
        assert not isinstance(z, writer.RecordFile)


def test_rerun_reuses_complete_shards_and_redoes_the_rest(tmp_path):
    tasks = _tasks(str(tmp_path))
    first = writer.write_shards(tasks, ToyFactory(), show_progress=False)
    # Shard 1: renamed but its sidecar never written (killed in between). Shard 2: truncated.
    os.remove(writer.sidecar_path(first[1].path))
    with open(first[2].path, "r+b") as f:
        f.truncate(10)
    again = writer.write_shards(tasks, ToyFactory(), show_progress=False)
    assert [r.reused for r in again] == [True, False, False, True]
    assert _read(first[2].path) == [ToyEncoder().encode(i) for i in range(10, 15)]
    # Another item list (fingerprint) for the same names: nothing reused.
    other = writer.write_shards(_tasks(str(tmp_path), tag="b"), ToyFactory(), show_progress=False)
    assert not any(r.reused for r in other)


def test_fail_names_the_file_and_leaves_no_partial_shard(tmp_path):
    with pytest.raises(writer.ConversionError, match=r"IMG_000012\.tif has 4 band\(s\).*toy-train.tfrecord-00002"):
        writer.write_shards(_tasks(str(tmp_path)), ToyFactory(bad=[12]), show_progress=False)
    names = sorted(os.listdir(tmp_path))
    assert "toy-train.tfrecord-00002-of-00004" not in names
    assert not [n for n in names if n.endswith(".incomplete")]


def test_skip_records_file_and_reason(tmp_path):
    results = writer.write_shards(_tasks(str(tmp_path)), ToyFactory(bad=[3, 12]), on_error="skip", show_progress=False)
    assert [r.num_examples for r in results] == [4, 5, 4, 5]
    assert results[0].skipped == [{"file": "/data/IMG_000003.tif", "reason": "IMG_000003.tif has 4 band(s), expected 5"}]
    assert len(_read(results[2].path)) == 4
    # A later run with on_error=fail does not accept a shard that skipped inputs.
    with pytest.raises(writer.ConversionError, match="IMG_000003"):
        writer.write_shards(_tasks(str(tmp_path)), ToyFactory(bad=[3, 12]), show_progress=False)


def test_parallel_workers_match_inline_bytes_and_fail_cleanly(tmp_path):
    inline, par = tmp_path / "inline", tmp_path / "par"
    inline.mkdir()
    par.mkdir()
    writer.write_shards(_tasks(str(inline), 40, 6), ToyFactory(), num_workers=1, show_progress=False)
    results = writer.write_shards(_tasks(str(par), 40, 6), ToyFactory(), num_workers=2, show_progress=False)
    assert _bytes(par) == _bytes(inline)
    assert sum(r.stats["sum"] for r in results) == sum(range(40))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(writer.ConversionError, match=r"IMG_000001\.tif"):
        writer.write_shards(_tasks(str(bad), 40, 6), ToyFactory(bad=[1]), num_workers=2, show_progress=False)
    names = os.listdir(bad)
    assert not [n for n in names if n.endswith(".incomplete")]
    assert "toy-train.tfrecord-00000-of-00006" not in names


def test_remove_stale_deletes_other_shard_sets(tmp_path):
    old = writer.write_shards(_tasks(str(tmp_path), 10, 5), ToyFactory(), show_progress=False)
    new = writer.write_shards(_tasks(str(tmp_path), 10, 2), ToyFactory(), show_progress=False)
    removed = writer.remove_stale(str(tmp_path), "toy-train.tfrecord-", [r.path for r in new])
    assert len(removed) == 10  # 5 shards + 5 sidecars
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("toy")) == [os.path.basename(r.path) for r in new]
    assert not os.path.exists(old[0].path)


def test_objects_older_than_the_writing_are_left_out_of_garbage_collection_meanwhile(tmp_path):
    import gc

    counts = []

    class Spy(ToyEncoder):
        def encode(self, item):
            counts.append(gc.get_freeze_count())
            return super().encode(item)

    assert gc.get_freeze_count() == 0
    writer.write_shards(_tasks(str(tmp_path), n_items=4, n_shards=2), Spy, show_progress=False)
    assert min(counts) > 1000  # TensorFlow's objects at least
    assert gc.get_freeze_count() == 0
    # A process that froze objects itself keeps its freeze.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        (tmp_path / "again").mkdir()
        writer.write_shards(_tasks(str(tmp_path / "again"), n_items=4, n_shards=2), Spy, show_progress=False)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
