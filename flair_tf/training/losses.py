"""Weighted cross-entropy with the reference averaging, exact under `tf.distribute`.

The two FLAIR code bases average their weighted cross-entropy differently
(spec flair1 §4.1, flair2 §4.3):

* ``"pixels"`` -- FLAIR #1 challenge code (`legacy-torch`): one-hot soft targets,
  so PyTorch's ``'mean'`` divides by the number of pixels,
  ``L = sum_i w[y_i] * CE_i / N_pixels``: weight-0 ("other") pixels add nothing
  to the numerator but still count in the denominator.
* ``"weights"`` -- FLAIR #2 (both branches) and FLAIR #1's later 19-class
  library: integer targets, so PyTorch's weighted mean is
  ``L = sum_i w[y_i] * CE_i / sum_i w[y_i]``.

Distribution. Keras sums the gradients of the per-replica losses over the
replicas, and reports ``num_replicas * loss`` averaged over replicas. Neither
average above is a mean of per-example values (the "weights" denominator
depends on the labels of the whole global batch), so each replica returns
``local_numerator / global_denominator``, the denominator being all-reduced
over the replicas (a label-only quantity, so no gradient flows through it).
The sum over replicas is then exactly the single-device loss of the same
global batch, for both modes and for unequal per-replica batches.

The loss is always computed in float32 from float32 logits, whatever the
mixed-precision policy.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from flair_tf import nomenclature

AVERAGING_MODES = ("pixels", "weights")


def default_averaging(task: str, num_classes: int) -> str:
    """The reference averaging of a task: "pixels" for FLAIR #1 (13 classes), else "weights"."""
    return "pixels" if (task == "flair1" and num_classes == 13) else "weights"


def _global_sum(value: tf.Tensor) -> tf.Tensor:
    """Sums a replica-local value over all replicas (identity without a strategy)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # Cross-replica context: the caller holds the whole batch.
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def weighted_cross_entropy_terms(
    y_true: tf.Tensor,
    logits: tf.Tensor,
    class_weights: Sequence[float],
    averaging: str,
    sample_weight: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The local numerator and denominator of the weighted cross-entropy.

    Args:
      y_true: int class indices, [B, H, W] (any shape matching ``logits[..., 0]``).
      logits: [B, H, W, C] logits, any float dtype (cast to float32).
      class_weights: C per-class weights.
      averaging: "pixels" or "weights" (see the module docstring).
      sample_weight: optional per-example [B] or per-pixel [B, H, W] weight;
        padded evaluation examples carry 0 and drop out of both terms.

    Returns:
      (numerator, denominator), float32 scalars over this replica's batch.
    """
    if averaging not in AVERAGING_MODES:
        raise ValueError(f"averaging must be one of {AVERAGING_MODES}. Received: averaging={averaging!r}")
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(y_true, tf.int32)
    num_classes = logits.shape[-1]
    if num_classes is not None and len(class_weights) != num_classes:
        raise ValueError(
            f"{len(class_weights)} class weights for logits with {num_classes} classes; "
            "pass one weight per class (nomenclature.class_weights)."
        )
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    weights = tf.constant(list(class_weights), dtype=tf.float32)
    pixel_w = tf.gather(weights, labels)
    mask = tf.ones_like(ce)
    if sample_weight is not None:
        sw = tf.cast(sample_weight, tf.float32)
        # [B] -> [B, 1, 1] so one weight covers a whole example.
        sw = tf.reshape(sw, tf.concat([tf.shape(sw), tf.ones([tf.rank(ce) - tf.rank(sw)], tf.int32)], 0))
        mask = mask * sw
    numerator = tf.reduce_sum(pixel_w * mask * ce)
    if averaging == "pixels":
        denominator = tf.reduce_sum(mask)
    else:
        denominator = tf.reduce_sum(pixel_w * mask)
    return numerator, denominator


@keras.saving.register_keras_serializable(package="flair_tf")
class WeightedCrossEntropy(keras.losses.Loss):
    """Class-weighted sparse cross-entropy on logits, reference averaging, distribution-exact.

    Args:
      class_weights: one weight per class, e.g. ``nomenclature.class_weights("flair1")``.
      averaging: "pixels" (FLAIR #1 challenge) or "weights" (FLAIR #2, FLAIR #1 19-class).
      name: loss name.

    Example:
      >>> loss = WeightedCrossEntropy([1.0] * 12 + [0.0], averaging="pixels")
      >>> value = loss(labels, logits)  # labels [B, H, W] int, logits [B, H, W, 13]
    """

    def __init__(self, class_weights: Sequence[float], averaging: str = "weights", name: str = "weighted_ce"):
        super().__init__(name=name, reduction="sum", dtype="float32")
        if averaging not in AVERAGING_MODES:
            raise ValueError(f"averaging must be one of {AVERAGING_MODES}. Received: averaging={averaging!r}")
        self.class_weights = tuple(float(w) for w in class_weights)
        self.averaging = averaging

    def __call__(self, y_true, y_pred, sample_weight=None):
        with tf.name_scope(self.name):
            numerator, denominator = weighted_cross_entropy_terms(
                y_true, y_pred, self.class_weights, self.averaging, sample_weight
            )
            denominator = tf.stop_gradient(_global_sum(denominator))
            # Returned per replica; Keras sums gradients over replicas, so the
            # replicas' values add up to the global-batch loss.
            return tf.math.divide_no_nan(numerator, denominator)

    def call(self, y_true, y_pred):  # pragma: no cover - __call__ is overridden
        raise NotImplementedError("WeightedCrossEntropy reduces in __call__")

    def get_config(self):
        return {"class_weights": list(self.class_weights), "averaging": self.averaging, "name": self.name}


def build_losses(
    task: str,
    num_classes: int,
    output_names: Sequence[str],
    averaging: str | None = None,
    aerial_weight: float = 1.0,
    sentinel_weight: float = 1.0,
    use_class_weights: bool = True,
) -> tuple[dict[str, keras.losses.Loss], dict[str, float]]:
    """The per-output losses and loss weights for `model.compile`.

    U-T&T: total = ``sentinel_weight * L_sentinel + aerial_weight * L_aerial``
    (the reference ``w_unet_utae: [1, 1]``), each branch with its own class
    weights (FLAIR #2 ``weights_aerial_satellite``).

    Args:
      task: "flair1" or "flair2".
      num_classes: 13 or 19.
      output_names: the model's output keys ("aerial", and "sentinel" for U-T&T).
      averaging: "pixels", "weights" or None for the task's reference averaging.
      aerial_weight: weight of the aerial (U-Net) loss in the total.
      sentinel_weight: weight of the auxiliary Sentinel (U-TAE) loss in the total.
      use_class_weights: False gives every class weight 1 (the reference's
        ``use_weights: False``).

    Returns:
      (losses, loss_weights), dicts keyed by output name.
    """
    averaging = averaging or default_averaging(task, num_classes)
    losses, loss_weights = {}, {}
    for name in output_names:
        if name not in ("aerial", "sentinel"):
            raise ValueError(f"Unknown model output {name!r}; expected 'aerial' and optionally 'sentinel'.")
        if use_class_weights:
            weights = nomenclature.class_weights(task, num_classes, branch=name if task == "flair2" else "aerial")
        else:
            weights = (1.0,) * num_classes
        losses[name] = WeightedCrossEntropy(weights, averaging=averaging, name=f"{name}_ce")
        loss_weights[name] = float(aerial_weight if name == "aerial" else sentinel_weight)
    return losses, loss_weights
