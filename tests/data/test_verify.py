"""verify: a flipped byte, a truncated shard, a missing or extra shard are named by shard and record."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from flair_tf.data import schema, verify

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record_offsets(path):
    """Start of each record's payload in a TFRecord file (8-byte length + 4-byte CRC header)."""
    data = open(path, "rb").read()
    offsets, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        offsets.append((pos + 12, length))
        pos += 12 + length + 4
    return offsets


@pytest.fixture
def records(flair2_records, tmp_path):
    dst = tmp_path / "records"
    shutil.copytree(flair2_records, dst)
    info = schema.load_dataset_info(str(dst))
    shard = info["splits"]["train"]["shards"][1]["file"]
    return str(dst), shard


def test_clean_records_pass(records):
    directory, _ = records
    report = verify.verify(directory, show_progress=False)
    assert report.ok, report.problems
    assert sum(report.num_records.values()) == 40


def test_flipped_byte_names_shard_and_record(records):
    directory, shard = records
    path = os.path.join(directory, shard)
    start, length = _record_offsets(path)[2]
    with open(path, "r+b") as f:
        f.seek(start + length // 2)
        byte = f.read(1)
        f.seek(start + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify.verify(directory, ["train"], show_progress=False)
    assert not report.ok
    assert report.problems[0].startswith(f"{shard} record 2: unreadable (DataLossError")
    assert any("2 record(s) read, dataset_info.json says" in p for p in report.problems)


def test_truncated_shard_names_shard_and_record(records):
    directory, shard = records
    path = os.path.join(directory, shard)
    start, length = _record_offsets(path)[3]
    with open(path, "r+b") as f:
        f.truncate(start + length // 3)
    report = verify.verify(directory, ["train"], show_progress=False)
    assert report.problems[0].startswith(f"{shard} record 3: unreadable (DataLossError")


def test_missing_extra_and_miscounted_shards(records):
    directory, shard = records
    info_path = os.path.join(directory, "dataset_info.json")
    info = json.load(open(info_path))
    info["splits"]["train"]["shards"][0]["num_examples"] += 1
    json.dump(info, open(info_path, "w"))
    os.rename(os.path.join(directory, shard), os.path.join(directory, "flair2-train.tfrecord-00007-of-00009"))
    problems = verify.verify(directory, ["train"], show_progress=False).problems
    assert f"{shard}: listed in dataset_info.json but missing" in problems
    assert any(p.startswith("flair2-train.tfrecord-00007-of-00009: present but not listed") for p in problems)
    first = info["splits"]["train"]["shards"][0]
    assert f"{first['file']}: {first['num_examples'] - 1} record(s) read, dataset_info.json says {first['num_examples']}" in problems


def test_cli_exit_code(records):
    directory, shard = records
    cli = [sys.executable, os.path.join(REPO, "tools", "verify_tfrecords.py"), f"--records_dir={directory}",
           "--noprogress"]
    with open(os.path.join(directory, shard), "r+b") as f:
        f.truncate(100)
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"PROBLEM {shard} record 0: unreadable" in proc.stderr and "FAILED" in proc.stdout


def test_record_that_does_not_decode_is_named_and_reading_goes_on(records):
    import tensorflow as tf

    directory, shard = records
    path = os.path.join(directory, shard)
    good = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    bad = tf.train.Example()
    bad.features.feature["aerial"].bytes_list.value.append(b"too short")
    with tf.io.TFRecordWriter(path) as w:  # CRC-valid framing, wrong content at index 1
        for i, r in enumerate(good):
            w.write(bad.SerializeToString() if i == 1 else r)
    problems = verify.verify(directory, ["train"], show_progress=False).problems
    assert len(problems) == 1 and problems[0].startswith(f"{shard} record 1: cannot be decoded (InvalidArgumentError")


def test_record_whose_aligned_slices_disagree_with_its_fields_is_named(records):
    import tensorflow as tf

    directory, shard = records
    path = os.path.join(directory, shard)
    good = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    # A second Features message appended to record 2 overrides "aerial" for protobuf readers
    # (repeated message fields merge, last value wins) while the aligned slice keeps the first.
    p = schema.RecordSpec.from_info(schema.load_dataset_info(directory)).patch_size
    extra = tf.train.Features()
    extra.feature["aerial"].bytes_list.value.append(bytes(p * p * 4))
    body = extra.SerializeToString()
    tampered = good[2] + b"\x0a" + schema._varint(len(body)) + body
    with tf.io.TFRecordWriter(path) as w:
        for i, r in enumerate(good):
            w.write(tampered if i == 2 else r)
    problems = verify.verify(directory, ["train"], show_progress=False).problems
    assert problems == [f"{shard} record 2: its aligned64 slices differ from its protobuf fields "
                        "(not written by schema.serialize?)"]
