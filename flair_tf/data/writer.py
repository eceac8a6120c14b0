"""Sharded, parallel, resumable TFRecord writing.

Generic over the examples: a caller gives a list of `ShardTask` (the final path
and the work items of each shard) and a picklable factory of an `Encoder` that
turns one item into serialized record bytes. Then:

* each worker process builds one encoder (so per-worker caches, e.g. an open
  Sentinel super-area, live across items) and writes whole shards, one item in
  memory at a time: memory stays flat whatever the dataset size;
* a shard is written to ``<shard>.incomplete`` and renamed when whole, so a
  killed run never leaves a truncated shard under the final name;
* after the rename a small sidecar ``_shard_info/<shard>.json`` records the
  shard's fingerprint (items, options), record count, byte size, the encoder's
  statistics, the skipped items and when it was written. A rerun reuses a shard whose file exists
  and whose sidecar matches the fingerprint and the file size; any other shard
  is written again (a shard renamed just before a kill, without its sidecar,
  is simply redone);
* nothing time- or host-dependent enters the bytes: the same items and options
  give byte-identical shards.

Workers are started with the ``spawn`` method: the parent has TensorFlow loaded
and running threads, which ``fork`` would copy in an undefined state.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import posixpath
import queue as queue_lib
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from absl import logging

from flair_tf.progress import Progress

SIDECAR_DIR = "_shard_info"
INCOMPLETE_SUFFIX = ".incomplete"
COMPRESSIONS = (None, "GZIP")


def _tf():
    """TensorFlow, imported on first use: a worker process sets up its parent-death
    signal before paying for the import (seconds), so killing the parent mid-start
    leaves no orphan."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf


def _masked_crc(crc: int) -> int:
    """TFRecord's masked CRC32C (``tsl::crc32c::Mask``)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_module():
    """google_crc32c when its compiled (SSE4.2 / ARMv8 CRC) implementation loads, else None."""
    try:
        import google_crc32c  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    return google_crc32c if google_crc32c.implementation == "c" else None


class RecordFile:
    """Writes uncompressed TFRecord framing, byte for byte what ``tf.io.TFRecordWriter`` writes.

    Each record is ``uint64 length, uint32 masked CRC32C(length), data, uint32
    masked CRC32C(data)``, little-endian. The pip builds of TensorFlow compute
    CRC32C in portable code (no SSE4.2 at build time): about 0.5 ms per 1.5 MB
    FLAIR record, 5% of a conversion. Here the hardware instruction does it
    (google-crc32c: 0.05 ms, reading a `bytearray` record through a read-only
    view, not a copy). Local paths use a plain buffered file, other file
    systems (``gs://``) ``tf.io.gfile``.
    """

    def __init__(self, path: str, crc32c):
        self._crc = crc32c
        if "://" in path:
            self._file = _tf().io.gfile.GFile(path, "wb")
        else:
            self._file = open(path, "wb", buffering=1 << 20)  # pylint: disable=consider-using-with

    def write(self, record: bytes | bytearray | memoryview) -> None:
        # google_crc32c reads only read-only buffers: a read-only numpy view of a
        # bytearray record, rather than a `bytes` copy of it (0.1 ms per MB).
        data = record
        if not isinstance(record, bytes):
            data = np.frombuffer(record, np.uint8)
            data.flags.writeable = False
        header = len(data).to_bytes(8, "little")
        w = self._file.write
        w(header)
        w(_masked_crc(self._crc.value(header)).to_bytes(4, "little"))
        w(data)
        w(_masked_crc(self._crc.value(data)).to_bytes(4, "little"))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_records(path: str, compression: str | None):
    """A record writer for `path`: `RecordFile` when uncompressed and google-crc32c's
    compiled code is there, else ``tf.io.TFRecordWriter`` (GZIP; the same bytes
    either way when uncompressed)."""
    crc = None if compression else _crc32c_module()
    if crc is not None:
        return RecordFile(path, crc)
    tf = _tf()
    return tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type=compression or ""))


class Encoder(Protocol):
    """Turns work items into serialized records, keeping statistics."""

    def encode(self, item: Any) -> bytes:
        """Serialized record of `item`; raises (naming the file) on bad input."""

    def describe(self, item: Any) -> str:
        """The input file of `item`, for error messages and the skipped list."""

    def collect(self) -> Any:
        """Statistics of the items encoded since the last call (JSON-able), then resets."""

    # Optional: ``session()``, a context manager held around all the items a process
    # encodes (e.g. a library environment that would cost more to set up per item).


def _session(encoder: Encoder):
    session = getattr(encoder, "session", None)
    return session() if session is not None else contextlib.nullcontext()


class ConversionError(RuntimeError):
    """An input could not be converted (``on_error='fail'``); the message names the file."""


class _Cancelled(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write.

    Attributes:
      path: the final shard path (local or ``gs://``).
      items: the work items, in record order.
      fingerprint: identifies the items and every option that changes the bytes.
    """

    path: str
    items: tuple
    fingerprint: str


@dataclasses.dataclass
class ShardResult:
    """What was written (or found complete) for one shard."""

    path: str
    num_examples: int
    num_bytes: int
    stats: Any
    skipped: list[dict]
    reused: bool = False


def fingerprint(*parts: Any) -> str:
    """A stable sha256 of JSON-able parts (the items' names, the options)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def num_shards_for(
    num_items: int,
    estimated_bytes: float,
    num_shards: int | None = None,
    target_shard_mb: float = 150.0,
    min_shards: int = 16,
) -> int:
    """The number of shards of one split.

    Args:
      num_items: examples in the split.
      estimated_bytes: their estimated total record size (uncompressed).
      num_shards: an explicit count (wins over the target size).
      target_shard_mb: wanted shard size in MB (1e6 bytes).
      min_shards: lower bound, so that every TPU host / GPU worker gets files.

    Returns:
      At least 1 and never more than `num_items` (no empty shard).
    """
    if num_items <= 0:
        return 0
    if num_shards is None:
        num_shards = max(math.ceil(estimated_bytes / (target_shard_mb * 1e6)), min_shards)
    return max(1, min(int(num_shards), num_items))


def split_items(items: Sequence[Any], num_shards: int) -> list[tuple]:
    """Contiguous ranges of equal size (+-1), in order."""
    n = len(items)
    bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
    return [tuple(items[bounds[i] : bounds[i + 1]]) for i in range(num_shards)]


def sidecar_path(shard_path: str) -> str:
    directory, name = posixpath.split(shard_path)
    return posixpath.join(directory, SIDECAR_DIR, name + ".json")


def _remove_quietly(path: str) -> None:
    tf = _tf()
    try:
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError):
        pass


def _write_json_atomic(path: str, content: Any) -> None:
    tf = _tf()
    tf.io.gfile.makedirs(posixpath.dirname(path))
    tmp = path + INCOMPLETE_SUFFIX
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_complete(task: ShardTask, allow_skipped: bool = True) -> ShardResult | None:
    """The result of a previous run if `task`'s shard is complete and valid, else None."""
    tf = _tf()
    side = sidecar_path(task.path)
    try:
        if not (tf.io.gfile.exists(task.path) and tf.io.gfile.exists(side)):
            return None
        with tf.io.gfile.GFile(side, "r") as f:
            info = json.load(f)
        size = tf.io.gfile.stat(task.path).length
    except (tf.errors.OpError, OSError, ValueError):
        return None
    if info.get("fingerprint") != task.fingerprint or info.get("num_bytes") != size:
        return None
    if info.get("skipped") and not allow_skipped:
        return None
    return ShardResult(task.path, info["num_examples"], size, info["stats"], info["skipped"], reused=True)


def _describe_error(encoder: Encoder, item: Any, err: BaseException) -> str:
    where = encoder.describe(item)
    msg = str(err) or type(err).__name__
    if posixpath.basename(where) not in msg:
        msg = f"{where}: {msg}"
    if not isinstance(err, ValueError):
        msg = f"{type(err).__name__}: {msg}"
    return msg


def _write_one(
    task: ShardTask,
    encoder: Encoder,
    compression: str | None,
    on_error: str,
    report: Callable[[int], None],
    cancelled: Callable[[], bool],
) -> ShardResult:
    tf = _tf()
    tmp = task.path + INCOMPLETE_SUFFIX
    count, skipped = 0, []
    started = time.time()
    encoder.collect()  # drop statistics of an aborted previous shard
    try:
        with open_records(tmp, compression) as out:
            for item in task.items:
                if cancelled():
                    raise _Cancelled()
                try:
                    record = encoder.encode(item)
                except MemoryError:
                    raise
                except Exception as e:  # pylint: disable=broad-except
                    msg = _describe_error(encoder, item, e)
                    if on_error != "skip":
                        raise ConversionError(f"{msg} (while writing {posixpath.basename(task.path)})") from None
                    logging.warning("skipped %s", msg)
                    skipped.append({"file": encoder.describe(item), "reason": msg})
                    report(1)
                    continue
                out.write(record)
                count += 1
                report(1)
        stats = encoder.collect()
        tf.io.gfile.rename(tmp, task.path, overwrite=True)
    except BaseException:
        _remove_quietly(tmp)
        raise
    size = tf.io.gfile.stat(task.path).length
    _write_json_atomic(
        sidecar_path(task.path),
        {"fingerprint": task.fingerprint, "num_examples": count, "num_bytes": size,
         "stats": stats, "skipped": skipped,
         # Wall-clock span of the shard's writing (unix time) and the writing process:
         # throughput measurements only.
         "started": round(started, 3), "finished": round(time.time(), 3), "worker": os.getpid()},
    )
    return ShardResult(task.path, count, size, stats, skipped)


# ----------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the parent dies, so no orphan keeps writing."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _init_worker(parent_pid: int, factory_pickle: bytes, progress_queue, cancel_event) -> None:
    _die_with_parent(parent_pid)
    # Unpickled only now: it imports the encoder's modules (TensorFlow), which takes seconds.
    _WORKER["encoder"] = pickle.loads(factory_pickle)()
    _WORKER["session"] = _session(_WORKER["encoder"])
    _WORKER["session"].__enter__()  # for the worker's life
    gc.freeze()  # `_frozen_gc`: the worker's imports are never garbage
    _WORKER["queue"] = progress_queue
    _WORKER["cancel"] = cancel_event


def _worker_task(task: ShardTask, compression: str | None, on_error: str) -> ShardResult:
    q, cancel = _WORKER["queue"], _WORKER["cancel"]
    pending = [0, time.monotonic()]

    def report(n: int) -> None:  # batch the queue traffic to ~10 messages/s
        pending[0] += n
        if time.monotonic() - pending[1] > 0.1:
            q.put(pending[0])
            pending[0], pending[1] = 0, time.monotonic()

    try:
        return _write_one(task, _WORKER["encoder"], compression, on_error, report, cancel.is_set)
    finally:
        if pending[0]:
            q.put(pending[0])


def write_shards(
    tasks: Sequence[ShardTask],
    encoder_factory: Callable[[], Encoder],
    num_workers: int = 1,
    compression: str | None = None,
    on_error: str = "fail",
    desc: str = "convert",
    show_progress: bool = True,
) -> list[ShardResult]:
    """Writes (or reuses) every shard of `tasks`.

    Args:
      tasks: the shards to produce.
      encoder_factory: picklable zero-argument callable returning an `Encoder`;
        called once per worker process (once in-process when `num_workers` is 1).
      num_workers: worker processes; 1 writes in this process.
      compression: None or "GZIP".
      on_error: "fail" stops at the first bad input (its shard's
        ``.incomplete`` file removed, other workers stopped) and raises
        `ConversionError`; "skip" leaves the item out and records it.
      desc: progress bar label.
      show_progress: draw a progress bar on stderr (rate, ETA).

    Returns:
      One `ShardResult` per task, in task order.

    Raises:
      ConversionError: a bad input with ``on_error='fail'``, or a worker died.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}. Received: {compression!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip'. Received: {on_error!r}")
    results: dict[int, ShardResult] = {}
    todo = []
    for i, task in enumerate(tasks):
        done = load_complete(task, allow_skipped=on_error == "skip")
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    if len(todo) < len(tasks):
        logging.info("%s: %d of %d shards already complete, reused", desc, len(tasks) - len(todo), len(tasks))
    total = sum(len(tasks[i].items) for i in todo)
    bar = Progress(total=total, desc=desc, unit="patch", enabled=show_progress and total > 0)
    try:
        if num_workers <= 1 or len(todo) <= 1:
            encoder = encoder_factory()
            with _frozen_gc(), _session(encoder):
                for i in todo:
                    results[i] = _write_one(tasks[i], encoder, compression, on_error, bar.update, lambda: False)
        else:
            results.update(_write_parallel(tasks, todo, encoder_factory, num_workers, compression, on_error, bar))
    finally:
        bar.close()
    return [results[i] for i in range(len(tasks))]


@contextlib.contextmanager
def _frozen_gc():
    """Python's cyclic garbage collector leaves the objects that exist now alone, meanwhile.

    With TensorFlow imported a process holds about a million objects, which
    every full collection walks (about 0.2 s each, 0.4 ms per FLAIR #2 patch);
    encoding allocates enough to trigger one every few hundred patches.
    Objects created meanwhile are collected as usual. A process that froze
    objects itself is left as it is (unfreezing would undo its freeze too).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_parallel(tasks, todo, encoder_factory, num_workers, compression, on_error, bar):
    ctx = multiprocessing.get_context("spawn")
    progress_queue, cancel = ctx.Queue(), ctx.Event()
    results, first_error = {}, None

    def drain() -> None:
        while True:
            try:
                bar.update(progress_queue.get_nowait())
            except queue_lib.Empty:
                return

    with cf.ProcessPoolExecutor(
        max_workers=min(num_workers, len(todo)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(os.getpid(), pickle.dumps(encoder_factory), progress_queue, cancel),
    ) as pool:
        futures = {pool.submit(_worker_task, tasks[i], compression, on_error): i for i in todo}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain()
            for fut in done:
                try:
                    results[futures[fut]] = fut.result()
                except _Cancelled:
                    pass
                except cf.CancelledError:
                    pass
                except Exception as e:  # pylint: disable=broad-except
                    if first_error is None:
                        first_error = e
                        cancel.set()  # running shards stop and remove their .incomplete
                        for other in pending:
                            other.cancel()
        drain()
    if first_error is not None:
        if isinstance(first_error, ConversionError):
            raise ConversionError(str(first_error)) from None
        if isinstance(first_error, cf.process.BrokenProcessPool):
            raise ConversionError(f"a worker process died ({first_error}); rerun to resume") from None
        raise first_error
    return results


def remove_stale(directory: str, prefix: str, keep: Sequence[str]) -> list[str]:
    """Deletes files named ``<prefix>*`` in `directory` (and their sidecars) not in `keep`.

    A rerun with another shard count would otherwise leave the old
    ``-of-000NN`` set beside the new one, and a glob would read both.
    """
    tf = _tf()
    keep_names = {posixpath.basename(k) for k in keep}
    removed = []
    for d, sub in ((directory, ""), (posixpath.join(directory, SIDECAR_DIR), ".json")):
        if not tf.io.gfile.isdir(d):
            continue
        for name in tf.io.gfile.listdir(d):
            base = name[: -len(sub)] if sub and name.endswith(sub) else name
            if name.startswith(prefix) and base not in keep_names:
                tf.io.gfile.remove(posixpath.join(d, name))
                removed.append(name)
    if removed:
        logging.info("removed %d stale file(s) of an earlier run: %s", len(removed), removed[:5])
    return removed
