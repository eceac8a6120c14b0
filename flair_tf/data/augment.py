"""Geometric augmentation of the FLAIR baselines, stateless and in pure TensorFlow.

The reference applies, to the uint8 HWC image and its label together,
``albumentations.Compose([VerticalFlip(p=0.5), HorizontalFlip(p=0.5),
RandomRotate90(p=0.5)])`` (spec flair1 §2.5, flair2 §2 step 3):

* vertical flip (rows reversed) with probability 0.5;
* then horizontal flip (columns reversed) with probability 0.5;
* then, with probability 0.5, ``np.rot90(x, k)`` with k uniform in {0, 1, 2, 3},
  so P(no rotation) = 0.625 and P(90) = P(180) = P(270) = 0.125.

A transform is drawn from a seed with stateless random ops (same seed, same
transform, eagerly or in a graph), then applied to any number of tensors whose
first two axes are the same square spatial grid (or, with `spatial_axes=(1, 2)`,
to time series such as a Sentinel patch [T, S, S, C]).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tensorflow as tf

FLIP_PROBABILITY = 0.5
ROTATE_PROBABILITY = 0.5


class Transform(NamedTuple):
    """One draw of the augmentation: scalar tensors."""

    vflip: tf.Tensor  # bool: reverse rows
    hflip: tf.Tensor  # bool: reverse columns
    k: tf.Tensor      # int32 in 0..3: counter-clockwise quarter turns (np.rot90)


def sample_transform(seed: tf.Tensor) -> Transform:
    """Draws one transform from a stateless seed.

    Args:
      seed: int32/int64 tensor of shape [2].

    Returns:
      A `Transform` with the reference probabilities.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
    uniform = [tf.random.stateless_uniform([], seed=seeds[i]) for i in range(3)]
    k = tf.random.stateless_uniform([], seed=seeds[3], minval=0, maxval=4, dtype=tf.int32)
    rotate = uniform[2] < ROTATE_PROBABILITY
    return Transform(
        vflip=uniform[0] < FLIP_PROBABILITY,
        hflip=uniform[1] < FLIP_PROBABILITY,
        k=tf.where(rotate, k, 0),
    )


def _rot90(x: tf.Tensor, k: tf.Tensor, row_axis: int) -> tf.Tensor:
    """`np.rot90(x, k, axes=(row_axis, row_axis + 1))` for a square grid."""
    col_axis = row_axis + 1
    perm = list(range(x.shape.rank))
    perm[row_axis], perm[col_axis] = col_axis, row_axis

    def quarter(n: int):
        # One counter-clockwise turn = transpose, then reverse the (new) rows.
        def fn():
            y = x
            for _ in range(n):
                y = tf.reverse(tf.transpose(y, perm), axis=[row_axis])
            return y
        return fn

    # n = 2 is a double flip; n = 3 a transpose then a column reversal.
    branches = [
        lambda: x,
        quarter(1),
        lambda: tf.reverse(x, axis=[row_axis, col_axis]),
        lambda: tf.reverse(tf.transpose(x, perm), axis=[col_axis]),
    ]
    return tf.switch_case(k, branches)


def apply_transform(x: tf.Tensor, transform: Transform,
                    spatial_axes: tuple[int, int] = (0, 1)) -> tf.Tensor:
    """Applies a drawn transform to one tensor.

    Args:
      x: tensor whose `spatial_axes` (consecutive) are a square grid, e.g. an
        image [H, W, C], a label [H, W] or a series [T, S, S, C] with (1, 2).
      transform: from `sample_transform`.
      spatial_axes: (row axis, column axis); must be consecutive.

    Returns:
      The transformed tensor, same shape and dtype.
    """
    row_axis, col_axis = spatial_axes
    if col_axis != row_axis + 1:
        raise ValueError(f"spatial_axes must be consecutive. Received: {spatial_axes}")
    shape = x.shape
    if shape[row_axis] is not None and shape[col_axis] is not None \
            and shape[row_axis] != shape[col_axis]:
        raise ValueError(
            f"augmentation needs a square grid (rot90 changes a rectangle's shape). "
            f"Received shape {shape} with spatial_axes={spatial_axes}")
    x = tf.cond(transform.vflip, lambda: tf.reverse(x, axis=[row_axis]), lambda: x)
    x = tf.cond(transform.hflip, lambda: tf.reverse(x, axis=[col_axis]), lambda: x)
    x = _rot90(x, transform.k, row_axis)
    return tf.ensure_shape(x, shape)


def augment(tensors: Sequence[tf.Tensor], seed: tf.Tensor) -> list[tf.Tensor]:
    """Draws one transform and applies it to every tensor (same grid, axes 0 and 1).

    Args:
      tensors: e.g. [image [H, W, C], label [H, W]].
      seed: [2] stateless seed.

    Returns:
      The transformed tensors, in order.
    """
    transform = sample_transform(seed)
    return [apply_transform(t, transform) for t in tensors]
