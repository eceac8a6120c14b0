"""Verifies converted FLAIR TFRecords against their dataset_info.json.

    python tools/verify_tfrecords.py --records_dir=/data/flair1_tfrecords

Decodes every record of every shard; prints each problem as
``<shard> record <index>: <what>`` and exits with status 1 if there is any.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no math here; silences a startup notice per worker

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("records_dir", None, "Folder holding the shards and dataset_info.json; local or gs://.")
flags.DEFINE_list("splits", None, "Splits to verify (default: all in dataset_info.json).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.records_dir:
        raise app.UsageError("--records_dir is required")
    from flair_tf.data import verify  # heavy import after flag parsing

    try:
        report = verify.verify(FLAGS.records_dir, FLAGS.splits, show_progress=FLAGS.progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"verify_tfrecords: error: {e}", file=sys.stderr)
        return 1
    for problem in report.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    summary = ", ".join(f"{s}: {n} records in {report.num_shards[s]} shards" for s, n in report.num_records.items())
    print(f"{'OK' if report.ok else 'FAILED'}: {summary}; {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    app.run(main)
