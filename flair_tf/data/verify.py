"""Checks converted records against their ``dataset_info.json``.

Every record of every shard is read (CRC-checked by the TFRecord reader) and
decoded through `schema.decode`; shapes, dtypes, value ranges and counts are
compared with what ``dataset_info.json`` says. Each problem names the shard and
the record index, so a corrupt or truncated file can be found and rewritten
(delete it and rerun the conversion: complete shards are kept).
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Sequence

import tensorflow as tf
from absl import logging

from flair_tf.data import schema
from flair_tf.progress import Progress

@dataclasses.dataclass
class VerifyReport:
    """Outcome of `verify`.

    Attributes:
      problems: one line per problem ("<shard> record <i>: <what>").
      num_records: records decoded without a problem, per split.
      num_shards: shards read, per split.
    """

    problems: list[str] = dataclasses.field(default_factory=list)
    num_records: dict[str, int] = dataclasses.field(default_factory=dict)
    num_shards: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _summary_fn(spec: schema.RecordSpec):
    """Decodes one record and reduces it to the few scalars the checks need (runs in tf.data)."""

    def summarize(raw):
        ex = schema.decode(raw, spec)
        out = {
            "label_min": tf.reduce_min(ex["label"]),
            "label_max": tf.reduce_max(ex["label"]),
            "has_label": ex["has_label"],
            "patch_id_len": tf.strings.length(ex["patch_id"]),
            "metadata_finite": tf.reduce_all(tf.math.is_finite(ex["metadata"])),
        }
        if spec.byte_layout == "aligned64":
            # The arrays the pipeline takes as slices of the record must be the ones any
            # protobuf reader sees in its fields.
            keys = [k for k in schema.SLICED_KEYS if k in ex]
            parsed = schema.decode(raw, dataclasses.replace(spec, byte_layout="protobuf"), keys=keys)
            out["layout_ok"] = tf.reduce_all(tf.stack([tf.reduce_all(tf.equal(ex[k], parsed[k])) for k in keys]))
        if spec.task == "flair2":
            out["t"] = ex["sentinel_length"]
            out["t_dates"] = tf.shape(ex["sentinel_dates"])[0]
            out["mask_max"] = tf.reduce_max(tf.concat([tf.reshape(ex["sentinel_masks"], [-1]), [0]], 0))
        return out

    return summarize


def _check_spec(element_spec: dict, expected: dict) -> list[str]:
    """Static shapes and dtypes of the decoded features against dataset_info.json."""
    problems = []
    for key, want in expected.items():
        got = element_spec.get(key)
        if got is None:
            problems.append(f"decode gives no {key!r}")
            continue
        if got.shape.as_list() != want["shape"] or got.dtype.name != want["dtype"]:
            problems.append(
                f"{key} decodes to {got.dtype.name} {got.shape.as_list()}, dataset_info.json says "
                f"{want['dtype']} {want['shape']}"
            )
    return problems


def _check_values(s: dict, task: str) -> list[str]:
    problems = []
    if s["has_label"]:
        if s["label_min"] < 1 or s["label_max"] > 19:
            problems.append(f"label codes span {s['label_min']}..{s['label_max']}, expected 1..19")
    elif s["label_max"] != 0:
        problems.append("has_label is false but the label is not all zeros")
    if not s.get("layout_ok", True):
        problems.append("its aligned64 slices differ from its protobuf fields (not written by schema.serialize?)")
    if s["patch_id_len"] == 0:
        problems.append("empty patch_id")
    if not s["metadata_finite"]:
        problems.append("non-finite metadata values")
    if task == "flair2":
        if s["t"] < 1 or s["t_dates"] != s["t"]:
            problems.append(f"sentinel_length {s['t']} disagrees with {s['t_dates']} dates")
        if s["mask_max"] > 100:
            problems.append(f"sentinel mask values up to {s['mask_max']}, expected 0..100")
    return problems


def verify_split(
    records_dir: str, info: dict, split: str, report: VerifyReport, show_progress: bool = True
) -> None:
    """Verifies one split of `info`, appending problems to `report`."""
    spec = schema.RecordSpec.from_info(info)
    split_info = info["splits"][split]
    listed = {s["file"]: s["num_examples"] for s in split_info["shards"]}
    found = {posixpath.basename(p) for p in tf.io.gfile.glob(schema.shard_pattern(records_dir, spec.task, split))}
    for name in sorted(set(listed) - found):
        report.problems.append(f"{name}: listed in dataset_info.json but missing")
    for name in sorted(found - set(listed)):
        report.problems.append(f"{name}: present but not listed in dataset_info.json (left by another run?)")
    decoded_spec = tf.data.Dataset.from_tensors(tf.constant(b"")).map(lambda s: schema.decode(s, spec)).element_spec
    for problem in _check_spec(decoded_spec, spec.features()):
        report.problems.append(f"{split}: {problem}")
    summarize = _summary_fn(spec)
    total = 0
    bar = Progress(total=sum(listed.values()), desc=f"verify {split}", unit="record", enabled=show_progress)
    with bar:
        for name in sorted(set(listed) & found):
            path = posixpath.join(records_dir, name)
            ds = tf.data.TFRecordDataset(path, compression_type=info.get("compression") or "")
            ds = ds.map(summarize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            it = iter(ds)
            index = 0
            while True:
                try:
                    s = {k: v.numpy() for k, v in next(it).items()}
                except StopIteration:
                    break
                except tf.errors.DataLossError as e:
                    # CRC mismatch, truncation, bad GZIP stream: the rest of the shard is unreadable.
                    report.problems.append(f"{name} record {index}: unreadable (DataLossError: {_first_line(e)})")
                    break
                except tf.errors.OpError as e:
                    # A well-framed record that does not decode; the next ones are still read.
                    report.problems.append(
                        f"{name} record {index}: cannot be decoded ({type(e).__name__}: {_first_line(e)})")
                else:
                    for problem in _check_values(s, spec.task):
                        report.problems.append(f"{name} record {index}: {problem}")
                index += 1
                bar.update()
            if index != listed[name]:
                report.problems.append(f"{name}: {index} record(s) read, dataset_info.json says {listed[name]}")
            total += index
    if total != split_info["num_examples"] and not (set(listed) - found):
        report.problems.append(f"{split}: {total} records, dataset_info.json says {split_info['num_examples']}")
    report.num_records[split] = total
    report.num_shards[split] = len(found)


def _first_line(e: tf.errors.OpError) -> str:
    return (e.message or str(e)).strip().splitlines()[0]


def verify(records_dir: str, splits: Sequence[str] | None = None, show_progress: bool = True) -> VerifyReport:
    """Verifies the records of `records_dir` (all splits of its dataset_info.json by default)."""
    info = schema.load_dataset_info(records_dir)
    report = VerifyReport()
    for split in splits or sorted(info["splits"]):
        if split not in info["splits"]:
            report.problems.append(f"{split}: not in dataset_info.json (splits: {sorted(info['splits'])})")
            continue
        verify_split(records_dir, info, split, report, show_progress)
    for p in report.problems:
        logging.error("%s", p)
    return report
