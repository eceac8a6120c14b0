"""Choosing the `tf.distribute` strategy, before any dataset or model exists.

One string switch (`--strategy`), in the spirit of TF Model Garden's
`distribute_utils`:

=============  ==============================================================
``default``    no distribution (one CPU or one GPU as TensorFlow places ops)
``one_device`` `OneDeviceStrategy` on the first GPU, else the CPU
``mirrored``   `MirroredStrategy` over all local GPUs (or the logical CPUs
               made by `split_cpu`, for tests and the demo)
``multi_worker`` `MultiWorkerMirroredStrategy`, cluster from ``TF_CONFIG`` (Keras 3
               needs `flair_tf.training.multi_worker` there, which `train` installs)
``tpu``        `TPUStrategy`; ``--tpu=local`` on a TPU VM, or a TPU name /
               ``grpc://`` address
=============  ==============================================================

Asking for hardware that is absent is an error that says what was found and
what to do, never a silent fallback to the CPU.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(num_logical: int) -> None:
    """Splits the first physical CPU into `num_logical` logical devices.

    Lets `MirroredStrategy` run several replicas on a CPU-only machine (tests,
    `make demo`). Must run before TensorFlow initialises its devices, i.e.
    before any op, dataset or model is created.

    Raises:
      RuntimeError: if TensorFlow has already initialised its devices.
    """
    if num_logical <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == num_logical:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_logical)]
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot split the CPU into {num_logical} logical devices: TensorFlow is already "
            "initialised. Set --num_logical_cpus (or FLAIR_TF_NUM_LOGICAL_CPUS) in a fresh process, "
            "before any TensorFlow op runs."
        ) from e


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    address = "" if tpu in ("", "local") else tpu
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local" if tpu == "local" else address)
        if tpu not in ("", "local"):
            # A remote TPU (node architecture) needs a connection; a TPU VM does not.
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # noqa: BLE001 - resolver errors range from URLError to NotFoundError.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(
            f"--strategy=tpu --tpu={tpu!r}: no TPU could be reached ({type(e).__name__}: {first_line}). "
            "On a Cloud TPU VM use --tpu=local with the `tensorflow-tpu` build installed "
            "(pip install -e '.[tpu]'); for a TPU node pass its name or grpc:// address; "
            "without a TPU use --strategy=default or --strategy=mirrored."
        ) from e
    strategy = tf.distribute.TPUStrategy(resolver)
    logging.info("TPUStrategy over %d cores (%s)", strategy.num_replicas_in_sync, tpu)
    return strategy


def accelerator_visible() -> bool:
    """Whether this process sees a GPU or TPU (after the strategy has started TensorFlow's runtime)."""
    return any(d.device_type in ("GPU", "TPU") for d in tf.config.list_logical_devices())


def get_strategy(name: str = "default", tpu: str = "local", num_gpus: int | None = None) -> tf.distribute.Strategy:
    """Builds the distribution strategy.

    Args:
      name: one of `STRATEGIES`.
      tpu: for ``tpu``: "local" (a TPU VM) or a TPU name / grpc:// address.
      num_gpus: for ``mirrored``: use the first `num_gpus` GPUs (None = all).

    Returns:
      The strategy; create the datasets and the model after it, the model
      inside ``strategy.scope()``.

    Raises:
      ValueError: unknown name.
      RuntimeError: the hardware the strategy needs is absent.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}. Received: --strategy={name!r}")
    # Listing logical devices starts TensorFlow's runtime, after which
    # MultiWorkerMirroredStrategy can no longer configure its collectives: only
    # the strategies that place replicas on GPUs list them.
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        device = gpus[0].name if gpus else "/cpu:0"
        strategy = tf.distribute.OneDeviceStrategy(device)
    elif name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            devices = [d.name for d in gpus[: num_gpus or len(gpus)]]
        else:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            if len(devices) < 2:
                logging.warning(
                    "--strategy=mirrored found no GPU and one CPU device: a single replica. "
                    "Use --num_logical_cpus=2 to test multi-replica training on a CPU."
                )
        if num_gpus and len(gpus) < num_gpus:
            raise RuntimeError(
                f"--strategy=mirrored --num_gpus={num_gpus}: only {len(gpus)} GPU(s) visible "
                f"({[d.name for d in gpus]}). Check CUDA_VISIBLE_DEVICES and that the "
                "GPU build is installed (pip install -e '.[gpu]')."
            )
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise RuntimeError(
                "--strategy=multi_worker needs the TF_CONFIG environment variable describing the "
                'cluster, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}} on every worker.'
            )
        json.loads(os.environ["TF_CONFIG"])  # Fail early on malformed JSON.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = _tpu_strategy(tpu)
    logging.info("Strategy %s: %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, logs and `flags.txt`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and task_id == 0)


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.TPUStrategy)
