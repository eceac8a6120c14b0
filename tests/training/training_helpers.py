"""Helpers for the training tests: run Python snippets in a fresh process.

Imported as `training_helpers` (a unique module name; `conftest` is ambiguous
when several test folders have one).

Logical CPU devices (MirroredStrategy with 2 replicas on a CPU) must be set up
before TensorFlow initialises, which has already happened in the pytest
process; such tests run their code in a subprocess.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, logical_cpus: int = 0, timeout: float = 600, env: dict | None = None):
    """Runs `code` in a fresh interpreter; returns the CompletedProcess (text).

    With `logical_cpus`, the CPU is split before anything else runs.
    """
    prelude = ""
    if logical_cpus:
        prelude = f"from flair_tf.training.strategy import split_cpu\nsplit_cpu({logical_cpus})\n"
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
    )


def last_json(proc) -> dict:
    """The last stdout line of a snippet that printed json.dumps(...)."""
    if proc.returncode != 0:
        raise AssertionError(f"snippet failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Snippet:
    """`run` -> CompletedProcess; `json` -> the parsed last stdout line (fails on rc != 0)."""

    run = staticmethod(run_python)

    @staticmethod
    def json(code: str, logical_cpus: int = 0, timeout: float = 600, env: dict | None = None) -> dict:
        return last_json(run_python(code, logical_cpus, timeout, env))


def event_tags(event_dir) -> set:
    """Every summary tag written to the TensorBoard event files of `event_dir`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tags = set()
    for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags
