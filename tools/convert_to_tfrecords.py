"""Converts a FLAIR #1 / FLAIR #2 tree into sharded TFRecords.

    python tools/convert_to_tfrecords.py --task=flair1 --data_root=/data/flair1 \
        --output_dir=/data/flair1_tfrecords --num_workers=8

Writes ``<output_dir>/<task>-<split>.tfrecord-00000-of-000NN`` and
``dataset_info.json``; see docs/conversion.md. A rerun with the same flags
keeps complete shards and writes the rest. Exit status 1 on bad input
(``--on_error=fail``), with the file named.
"""

from __future__ import annotations

import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no math here; silences a startup notice per worker

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", None, ["flair1", "flair2"], "Which dataset: FLAIR #1 (aerial) or FLAIR #2 (aerial + Sentinel-2).")
flags.DEFINE_string("data_root", None, "Folder of the FLAIR tree (released or toy layout); local or gs://.")
flags.DEFINE_string("output_dir", None, "Where the shards and dataset_info.json go; local or gs://.")
flags.DEFINE_list("splits", ["train", "val", "test"], "Splits to convert, among train, val, test.")
flags.DEFINE_list(
    "val_domains", None,
    "Domains of the train folders forming the val split (default: the 8 official ones); "
    "'none' for no val split.")
flags.DEFINE_string("csv_train", None, "IGN CSV list (image_path,mask_path) replacing the folder scan for train.")
flags.DEFINE_string("csv_val", None, "IGN CSV list replacing the folder scan for val.")
flags.DEFINE_string("csv_test", None, "IGN CSV list replacing the folder scan for test.")
flags.DEFINE_integer("patch_size", 512, "Expected aerial patch side in pixels (files of another size are errors).")
flags.DEFINE_integer("sentinel_patch_size", 40, "FLAIR #2: side of the Sentinel-2 crop around the patch centroid.")
flags.DEFINE_integer(
    "num_workers", min(os.cpu_count() or 1, 8),
    "Writer processes (each writes whole shards and holds ~0.5 GB: TensorFlow is loaded in each).")
flags.DEFINE_integer("num_shards", None, "Shards per split; default: from --target_shard_mb.")
flags.DEFINE_float("target_shard_mb", 150.0, "Wanted uncompressed shard size in MB when --num_shards is unset.")
flags.DEFINE_integer("min_shards", 16, "At least this many shards per split (never more than its examples).")
flags.DEFINE_enum("compression", "none", ["none", "gzip"], "Record compression.")
flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                  "fail: stop at the first bad input; skip: leave it out and list it in dataset_info.json.")
flags.DEFINE_integer("shard_seed", 0, "Seed of the record order (which patches share a shard).")
flags.DEFINE_bool("progress", True, "Show a progress bar (log lines when stderr is not a terminal).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("task", "data_root", "output_dir"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    from flair_tf.data import convert, readers, writer  # heavy imports after flag parsing

    csv_lists = {s: getattr(FLAGS, f"csv_{s}") for s in ("train", "val", "test") if getattr(FLAGS, f"csv_{s}")}
    val_domains = None
    if FLAGS.val_domains is not None:
        val_domains = tuple(d for d in FLAGS.val_domains if d.lower() != "none")
    options = convert.ConvertOptions(
        task=FLAGS.task,
        data_root=FLAGS.data_root,
        output_dir=FLAGS.output_dir,
        splits=tuple(FLAGS.splits),
        val_domains=val_domains,
        csv_lists=csv_lists or None,
        patch_size=FLAGS.patch_size,
        sentinel_size=FLAGS.sentinel_patch_size,
        num_workers=FLAGS.num_workers,
        num_shards=FLAGS.num_shards,
        target_shard_mb=FLAGS.target_shard_mb,
        min_shards=FLAGS.min_shards,
        compression=None if FLAGS.compression == "none" else "GZIP",
        on_error=FLAGS.on_error,
        shard_seed=FLAGS.shard_seed,
        show_progress=FLAGS.progress,
        command_line=shlex.join(sys.argv),
    )
    try:
        info = convert.convert(options)
    except (readers.FlairDataError, writer.ConversionError, ValueError, FileNotFoundError) as e:
        print(f"convert_to_tfrecords: error: {e}", file=sys.stderr)
        return 1
    for split in options.splits:
        s = info["splits"][split]
        logging.info("%s: %d examples in %d shards, %d skipped", split, s["num_examples"], s["num_shards"],
                     len(s["skipped"]))
    return 0


if __name__ == "__main__":
    app.run(main)
