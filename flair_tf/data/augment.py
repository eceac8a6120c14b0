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

import numpy as np
import tensorflow as tf


class Transform(NamedTuple):
    """One draw of the augmentation: scalar tensors."""

    vflip: tf.Tensor  # bool: reverse rows
    hflip: tf.Tensor  # bool: reverse columns
    k: tf.Tensor      # int32 in 0..3: counter-clockwise quarter turns (np.rot90)


def _mix64(z: tf.Tensor) -> tf.Tensor:
    """SplitMix64's finaliser: a bijection of uint64 whose every output bit depends on every input bit."""
    u = lambda v: tf.constant(v, tf.uint64)  # noqa: E731
    z = (z ^ tf.bitwise.right_shift(z, u(30))) * u(0xBF58476D1CE4E5B9)
    z = (z ^ tf.bitwise.right_shift(z, u(27))) * u(0x94D049BB133111EB)
    return z ^ tf.bitwise.right_shift(z, u(31))


def sample_transform(seed: tf.Tensor) -> Transform:
    """Draws one transform from a stateless seed.

    The draw is integer arithmetic (SplitMix64 over both seed words; five bits of
    the hash make the four choices), so it gives the same transform eagerly, in
    a graph, under XLA and on any TensorFlow version, which stateless random
    ops do not promise.

    Args:
      seed: int32/int64 tensor of shape [2], or [N, 2] for N draws at once
        (the same draws as one at a time, at the cost of one).

    Returns:
      A `Transform` with the reference probabilities (each bit is a fair coin:
      P(flip) = 1/2 each, P(rotate) = 1/2, k uniform in 0..3); its tensors have
      shape [N] for [N, 2] seeds.
    """
    seed = tf.cast(tf.cast(seed, tf.int64), tf.uint64)
    golden = tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    bits = _mix64(_mix64(seed[..., 0] * golden + tf.constant(1, tf.uint64)) ^ seed[..., 1])
    bit = lambda i: tf.bitwise.bitwise_and(  # noqa: E731
        tf.bitwise.right_shift(bits, tf.constant(i, tf.uint64)), tf.constant(1, tf.uint64)) == 1
    k = tf.cast(tf.bitwise.right_shift(bits, tf.constant(3, tf.uint64)) & tf.constant(3, tf.uint64),
                tf.int32)
    return Transform(vflip=bit(0), hflip=bit(1), k=tf.where(bit(2), k, 0))


def _d4_table() -> list[list[list[int]]]:
    """[vflip][hflip][k] -> index of the equivalent single move in `MOVES`.

    The 16 draws of (vflip, hflip, k) produce only the 8 symmetries of the
    square, and each of those is one optional transpose followed by reversing a
    subset of the two axes. Composing them here, once, on a 2x2 index grid lets
    `apply_transform` move every pixel once instead of up to four times.
    """
    grid = np.array([[0, 1], [2, 3]])  # four distinct values tell the 8 symmetries apart
    table = []
    for vflip in (False, True):
        row = []
        for hflip in (False, True):
            cells = []
            for k in range(4):
                x = grid[::-1] if vflip else grid
                x = x[:, ::-1] if hflip else x
                x = np.rot90(x, k)
                cells.append(next(i for i, (t, rows, cols) in enumerate(MOVES)
                                  if np.array_equal(_move_numpy(grid, t, rows, cols), x)))
            row.append(cells)
        table.append(row)
    return table


# (transpose, reverse rows, reverse columns), applied in that order.
MOVES = tuple((t, r, c) for t in (False, True) for r in (False, True) for c in (False, True))


def _move_numpy(x, transpose, rows, cols):
    x = x.T if transpose else x
    x = x[::-1] if rows else x
    return x[:, ::-1] if cols else x


_MOVE_TABLE = _d4_table()  # [2, 2, 4]


def move_index(transform: Transform) -> tf.Tensor:
    """int32 in 0..7: the symmetry of the square that a drawn transform amounts to (0: none).

    Works on scalar draws and on vectors of them (``sample_transform`` of [N, 2]
    seeds). The 16 draws of (vflip, hflip, k) give 8 distinct moves; `apply_move` applies one.
    """
    table = tf.constant(np.ravel(_MOVE_TABLE), tf.int32)
    index = tf.cast(transform.vflip, tf.int32) * 8 + tf.cast(transform.hflip, tf.int32) * 4 + transform.k
    return tf.gather(table, index)


def apply_transform(x: tf.Tensor, transform: Transform,
                    spatial_axes: tuple[int, int] = (0, 1)) -> tf.Tensor:
    """Applies a drawn transform to one tensor.

    The flips and the rotation are composed first into one of the 8 symmetries
    of the square, so each element moves once (one transpose and/or one
    reversal), whatever was drawn.

    Args:
      x: tensor whose `spatial_axes` (consecutive) are a square grid, e.g. an
        image [H, W, C], a label [H, W] or a series [T, S, S, C] with (1, 2).
      transform: from `sample_transform`.
      spatial_axes: (row axis, column axis); must be consecutive.

    Returns:
      The transformed tensor, same shape and dtype.
    """
    return apply_move(x, move_index(transform), spatial_axes)


def _grid_axes(shape: tf.TensorShape, spatial_axes: tuple[int, int], first: int
               ) -> tuple[int, int, list[int]]:
    """(row axis, column axis, the permutation swapping them), checked: consecutive, from
    axis `first` on, and a square grid where the sizes are known."""
    row_axis, col_axis = spatial_axes
    if row_axis < first or col_axis != row_axis + 1:
        where = " and after the batch axis" if first else ""
        raise ValueError(f"spatial_axes must be consecutive{where}. Received: {spatial_axes}")
    if shape[row_axis] is not None and shape[col_axis] is not None \
            and shape[row_axis] != shape[col_axis]:
        raise ValueError(
            f"augmentation needs a square grid (rot90 changes a rectangle's shape). "
            f"Received shape {shape} with spatial_axes={spatial_axes}")
    perm = list(range(shape.rank))
    perm[row_axis], perm[col_axis] = col_axis, row_axis
    return row_axis, col_axis, perm


def apply_move(x: tf.Tensor, move: tf.Tensor, spatial_axes: tuple[int, int] = (0, 1)) -> tf.Tensor:
    """Applies symmetry number `move` (from `move_index`) to one tensor; see `apply_transform`.

    Under XLA, a `move` that is a compile-time constant of the program selects
    its branch at compile time (one program per move, 8 at most).
    """
    shape = x.shape
    row_axis, col_axis, perm = _grid_axes(shape, spatial_axes, first=0)

    def branch(transpose, rows, cols):
        def fn():
            y = tf.transpose(x, perm) if transpose else x
            axes = [a for a, on in ((row_axis, rows), (col_axis, cols)) if on]
            return tf.reverse(y, axis=axes) if axes else tf.identity(y)
        return fn

    y = tf.switch_case(move, [branch(*m) for m in MOVES])
    return tf.ensure_shape(y, shape)


def apply_moves(x: tf.Tensor, moves: tf.Tensor, spatial_axes: tuple[int, int] = (1, 2)) -> tf.Tensor:
    """Applies a different symmetry to each example of a batch (`apply_move` per example).

    For the accelerator (``PipelineConfig.aerial_on="device"``): no branch and no
    per-example loop, so it compiles as one program under XLA and on TPU. The
    optional transpose and the two reversals are each computed for the whole
    batch and selected per example (3 selects over the batch: memory traffic an
    accelerator runs in microseconds at the batch sizes of training). TensorFlow
    has no GPU kernel of the select for uint8: give a GPU int32 values
    (`pipeline.finish_batch` does).

    Args:
      x: batch whose `spatial_axes` (consecutive, after the batch axis 0) are a
        square grid, e.g. images [B, H, W, C], labels [B, H, W] or series
        [B, T, S, S, C] with (2, 3).
      moves: int [B], each in 0..7 (`move_index`); 0 leaves its example alone.
      spatial_axes: (row axis, column axis) of `x`.

    Returns:
      ``x`` with example b moved by ``MOVES[moves[b]]``: the same values as
      `apply_move` on each example.
    """
    x = tf.convert_to_tensor(x)
    row_axis, col_axis, perm = _grid_axes(x.shape, spatial_axes, first=1)
    moves = tf.cast(moves, tf.int32)
    # MOVES[m] = (m & 4 transpose, m & 2 reverse rows, m & 1 reverse columns).
    flags = [tf.bitwise.bitwise_and(moves, bit) > 0 for bit in (4, 2, 1)]
    # The v1 select takes a [B] condition as a choice of whole examples: on a CPU 2.5x
    # faster than the broadcasting select of a [B, 1, 1, ...] condition.
    select = tf.compat.v1.where
    x = select(flags[0], tf.transpose(x, perm), x)
    x = select(flags[1], tf.reverse(x, [row_axis]), x)
    return select(flags[2], tf.reverse(x, [col_axis]), x)


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
