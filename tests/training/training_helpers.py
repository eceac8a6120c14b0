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


def free_ports(n: int) -> list[int]:
    """`n` local TCP ports free at the time of the call."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG of worker `index` in a cluster of local workers listening on `ports`."""
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def run_cluster(code: str, num_workers: int, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Runs `code` in `num_workers` processes at once, each a worker of one local cluster.

    Each process gets its own TF_CONFIG, so a `tf.distribute.MultiWorkerMirroredStrategy()`
    made in `code` joins the others: a real multi-worker cluster on this machine. Returns
    one CompletedProcess (text) per worker, as `run_python`; every process is killed on return.
    """
    ports = free_ports(num_workers)
    procs = [subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, "TF_CONFIG": tf_config(ports, i)})
        for i in range(num_workers)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    return results


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
