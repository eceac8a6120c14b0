"""Mixed precision and compilation settings (`--precision`, `--jit_compile`, `--steps_per_execution`).

* `--precision=mixed_bfloat16` (TPU, recent GPUs) or `mixed_float16` (GPUs):
  compute in 16 bits, variables in float32. The models emit float32 logits and
  the losses cast to float32, so the loss is always float32; with
  ``mixed_float16`` Keras 3 wraps the optimizer in a `LossScaleOptimizer` at
  `compile` by itself.
* `--steps_per_execution > 1` runs several steps per `tf.function` call (the
  main TPU throughput knob). Keras 3 (checked with 3.15.1 / TF 2.21) fails under
  `MirroredStrategy` and `MultiWorkerMirroredStrategy` with
  ``InvalidArgumentError: You must feed a value for placeholder tensor
  'while/cond/Placeholder_1'`` (keras-team/keras#19246); see
  `check_steps_per_execution`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def set_precision(precision: str) -> None:
    """Sets the global Keras dtype policy; call before building the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}. Received: --precision={precision!r}")
    keras.mixed_precision.set_dtype_policy(precision)
    logging.info("Keras dtype policy: %s", precision)


def check_steps_per_execution(steps_per_execution: int, strategy: tf.distribute.Strategy) -> int:
    """Validates `--steps_per_execution` against a Keras 3 bug.

    Args:
      steps_per_execution: the requested value (>= 1).
      strategy: the strategy the model will train under.

    Returns:
      The value to pass to `model.compile`.

    Raises:
      ValueError: a value > 1 under a mirrored strategy, which Keras 3 cannot
        run; the message gives the alternatives.
    """
    if steps_per_execution < 1:
        raise ValueError(f"--steps_per_execution must be >= 1. Received: {steps_per_execution}")
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if steps_per_execution > 1 and isinstance(strategy, mirrored):
        raise ValueError(
            f"--steps_per_execution={steps_per_execution} cannot run under {type(strategy).__name__}: "
            "Keras 3 (3.15) fails inside its multi-step loop with \"InvalidArgumentError: You must feed a "
            "value for placeholder tensor 'while/cond/Placeholder_1'\" (keras-team/keras#19246). "
            "Use --steps_per_execution=1 with --strategy=mirrored/multi_worker (on GPUs the per-step "
            "overhead is small); values > 1 work with --strategy=default, one_device and tpu."
        )
    if steps_per_execution > 1 and isinstance(strategy, tf.distribute.TPUStrategy):
        logging.warning(
            "--steps_per_execution=%d under TPUStrategy: Keras 3 runs it through the same loop that fails "
            "under MirroredStrategy; if you see 'You must feed a value for placeholder tensor', use 1.",
            steps_per_execution,
        )
    return steps_per_execution
