"""Lightweight Temporal Attention Encoder (L-TAE 2d) as configured in FLAIR #2.

Reference: ``LTAE2d(in_channels=128, n_head=16, d_k=4, mlp=[256, 128],
dropout=0.2, d_model=256, T=1000)`` of U-TAE (Sainte Fare Garnot & Landrieu,
2021), applied independently to every pixel of the lowest-resolution feature
map. Per pixel sequence (N = B*h*w sequences of length T):

1. ``in_norm``: GroupNorm(16 groups, 128) over (8 channels x T steps). The
   reference INCLUDES zero-padded steps in these statistics, so its output
   depends on how much padding a batch has; ``masked_in_norm=True`` excludes
   them (fixed-length padding then gives the same result as no padding).
2. ``inconv``: Conv1d(128, 256, 1) (a Dense layer here).
3. sinusoidal positional encoding of the day offsets (d = 16, period 1000,
   sin/cos interleaved, tiled 16x), added.
4. one learned query per head (16 x 4), keys ``fc1_k`` Linear(256, 64),
   values = the 256-d input split in 16 contiguous groups; padded steps get
   logit -1000 (not -inf); softmax over T; Dropout(0.1) on the attention
   weights, and the DROPPED weights are also what the skip aggregation uses.
5. ``mlp``: Linear(256,128) BatchNorm1d ReLU, Dropout(0.2), ``out_norm``
   GroupNorm(16, 128).

Layer names are the PyTorch module paths under ``<prefix>.temporal_encoder``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from flair_tf.models import layers as L

PE_PERIOD = 1000.0
PAD_LOGIT = -1000.0


@keras.saving.register_keras_serializable(package="flair_tf")
class ToSequences(keras.layers.Layer):
    """(B, T, h, w, C) -> (B*h*w, T, C), pixel-major like the reference."""

    def call(self, x):
        t = ops.shape(x)[1]
        x = ops.transpose(x, (0, 2, 3, 1, 4))
        return ops.reshape(x, (-1, t, x.shape[-1]))

    def compute_output_shape(self, s):
        n = None if None in (s[0], s[2], s[3]) else s[0] * s[2] * s[3]
        return (n, s[1], s[4])


@keras.saving.register_keras_serializable(package="flair_tf")
class BroadcastToPixels(keras.layers.Layer):
    """(B, T) -> (B*h*w, T): a per-date value repeated for every pixel."""

    def __init__(self, height, width, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def call(self, x):
        shape = ops.shape(x)
        x = ops.broadcast_to(x[:, None, None, :], (shape[0], self.height, self.width, shape[1]))
        return ops.reshape(x, (-1, shape[1]))

    def compute_output_shape(self, s):
        n = None if s[0] is None else s[0] * self.height * self.width
        return (n, s[1])

    def compute_output_spec(self, x):
        return keras.KerasTensor(self.compute_output_shape(x.shape), dtype=x.dtype)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


@keras.saving.register_keras_serializable(package="flair_tf")
class SequenceGroupNorm(keras.layers.Layer):
    """GroupNorm over (channels of a group x time) of (N, T, C) sequences.

    ``inputs = [x (N, T, C), pad_mask (N, T) bool]``. With ``masked=False`` the
    padded steps count in the statistics like in the reference
    (``nn.GroupNorm`` applied to (N, C, T)); with ``masked=True`` they do not.

    Weights ``gamma``/``beta`` map to PyTorch ``weight``/``bias``.
    """

    def __init__(self, groups, epsilon=1e-5, masked=False, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.epsilon, self.masked = int(groups), float(epsilon), bool(masked)

    def build(self, input_shape):
        channels = input_shape[0][-1]
        if channels % self.groups:
            raise ValueError(f"{channels} channels cannot form {self.groups} groups. Received: {input_shape}")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        x, pad_mask = inputs
        dtype = x.dtype
        x = ops.cast(x, "float32")
        n_t = ops.shape(x)[:2]
        channels = x.shape[-1]
        g = ops.reshape(x, (n_t[0], n_t[1], self.groups, channels // self.groups))
        if self.masked:
            w = ops.cast(ops.logical_not(ops.cast(pad_mask, "bool")), "float32")[:, :, None, None]
            count = ops.maximum(ops.sum(w, axis=(1, 3), keepdims=True) * (channels // self.groups), 1.0)
            mean = ops.sum(g * w, axis=(1, 3), keepdims=True) / count
            var = ops.sum(ops.square(g - mean) * w, axis=(1, 3), keepdims=True) / count
        else:
            mean = ops.mean(g, axis=(1, 3), keepdims=True)
            var = ops.mean(ops.square(g - mean), axis=(1, 3), keepdims=True)
        g = (g - mean) * ops.rsqrt(var + self.epsilon)
        y = ops.reshape(g, ops.shape(x)) * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(y, dtype)

    def compute_output_shape(self, shapes):
        return shapes[0]

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon, "masked": self.masked}


def positional_table(d: int = 16, period: float = PE_PERIOD) -> np.ndarray:
    """The reference's ``denom`` (float32): ``period ** (2 * floor(i / 2) / d)``."""
    i = np.arange(d, dtype=np.float64)
    return np.power(period, 2.0 * np.floor(i / 2.0) / d).astype(np.float32)


@keras.saving.register_keras_serializable(package="flair_tf")
class PositionalEncoding(keras.layers.Layer):
    """(N, T) day offsets -> (N, T, d * repeat) sin/cos encoding (no weights)."""

    def __init__(self, d=16, repeat=16, period=PE_PERIOD, **kwargs):
        super().__init__(**kwargs)
        self.d, self.repeat, self.period = int(d), int(repeat), float(period)

    def call(self, positions):
        denom = ops.convert_to_tensor(positional_table(self.d, self.period))
        table = ops.cast(positions, "float32")[:, :, None] / denom
        even = (np.arange(self.d) % 2 == 0)[None, None, :]
        table = ops.where(ops.convert_to_tensor(even), ops.sin(table), ops.cos(table))
        table = ops.tile(table, (1, 1, self.repeat))
        return ops.cast(table, self.compute_dtype)

    def compute_output_shape(self, s):
        return (*s, self.d * self.repeat)

    def get_config(self):
        return {**super().get_config(), "d": self.d, "repeat": self.repeat, "period": self.period}


@keras.saving.register_keras_serializable(package="flair_tf")
class LTAEAttention(keras.layers.Layer):
    """Multi-head attention with one learned query per head (reference ``attention_heads``).

    ``inputs = [v (N, T, d_in), k (N, T, n_head*d_k), pad_mask (N, T) bool]``
    -> ``(out (N, d_in), attn (N, n_head, T))``, ``attn`` after dropout.

    The weight ``Q`` (n_head, d_k) maps to PyTorch ``attention_heads.Q``; the
    key projection ``fc1_k`` is a separate Dense layer.
    """

    def __init__(self, n_head=16, d_k=4, attn_dropout=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.n_head, self.d_k, self.attn_dropout = int(n_head), int(d_k), float(attn_dropout)
        self.seed = seed
        self.dropout = keras.layers.Dropout(self.attn_dropout, seed=seed)

    def build(self, input_shape):
        self.Q = self.add_weight(
            name="Q",
            shape=(self.n_head, self.d_k),
            initializer=keras.initializers.RandomNormal(0.0, math.sqrt(2.0 / self.d_k), seed=self.seed),
        )

    def call(self, inputs, training=None):
        v, k, pad_mask = inputs
        dtype = v.dtype
        shape = ops.shape(k)
        k = ops.reshape(ops.cast(k, "float32"), (shape[0], shape[1], self.n_head, self.d_k))
        logits = ops.einsum("nthd,hd->nht", k, ops.cast(self.Q, "float32")) / math.sqrt(self.d_k)
        mask = ops.cast(pad_mask, "bool")[:, None, :]
        logits = ops.where(mask, ops.full_like(logits, PAD_LOGIT), logits)
        attn = ops.softmax(logits, axis=-1)
        attn = self.dropout(attn, training=training)
        d_in = v.shape[-1]
        vh = ops.reshape(ops.cast(v, "float32"), (shape[0], shape[1], self.n_head, d_in // self.n_head))
        out = ops.einsum("nht,nthc->nhc", attn, vh)
        out = ops.reshape(out, (shape[0], d_in))
        return ops.cast(out, dtype), ops.cast(attn, dtype)

    def compute_output_shape(self, shapes):
        v, _, m = shapes
        return (v[0], v[2]), (v[0], self.n_head, m[1])

    def compute_output_spec(self, inputs, training=None):
        v, _, m = inputs
        return (
            keras.KerasTensor((v.shape[0], v.shape[2]), dtype=self.compute_dtype),
            keras.KerasTensor((v.shape[0], self.n_head, m.shape[1]), dtype=self.compute_dtype),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "n_head": self.n_head,
            "d_k": self.d_k,
            "attn_dropout": self.attn_dropout,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="flair_tf")
class FromSequences(keras.layers.Layer):
    """``[y (B*h*w, ...), ref (B, T, h, w, C)]`` -> (B, h, w, ...)."""

    def call(self, inputs):
        y, ref = inputs
        b = ops.shape(ref)[0]
        rest = [ops.shape(y)[i] if d is None else d for i, d in enumerate(y.shape) if i > 0]
        return ops.reshape(y, (b, ref.shape[2], ref.shape[3], *rest))

    def compute_output_shape(self, shapes):
        y, ref = shapes
        return (ref[0], ref[2], ref[3], *y[1:])


def ltae2d(
    x,
    dates,
    pad_mask,
    prefix: str,
    n_head: int = 16,
    d_k: int = 4,
    d_model: int = 256,
    mlp_out: int = 128,
    dropout: float = 0.2,
    attn_dropout: float = 0.1,
    period: float = PE_PERIOD,
    masked_in_norm: bool = False,
):
    """Applies L-TAE 2d to encoder features.

    Args:
      x: (B, T, h, w, C) features of the last encoder level.
      dates: (B, T) float day offsets (the positional encoding input).
      pad_mask: (B, T) bool, True on padded steps.
      prefix: module path, e.g. ``"arch_hr.temporal_encoder"``.
      n_head, d_k, d_model, mlp_out, dropout, attn_dropout, period: the
        reference's hyper-parameters (FLAIR #2 values by default).
      masked_in_norm: exclude padded steps from ``in_norm`` statistics.

    Returns:
      ``(out (B, h, w, mlp_out), attn (B, h, w, n_head, T))``.
    """
    h, w, channels = x.shape[2], x.shape[3], x.shape[4]
    seq = ToSequences(name=f"{prefix}.to_sequences")(x)
    seq_mask = BroadcastToPixels(h, w, name=f"{prefix}.pixel_pad_mask")(pad_mask)
    seq_dates = BroadcastToPixels(h, w, name=f"{prefix}.pixel_dates")(dates)
    seq = SequenceGroupNorm(n_head, masked=masked_in_norm, name=f"{prefix}.in_norm")([seq, seq_mask])
    k_init, b_init = L.torch_default_initializers(channels)
    seq = keras.layers.Dense(d_model, kernel_initializer=k_init, bias_initializer=b_init, name=f"{prefix}.inconv")(seq)
    pe = PositionalEncoding(d_model // n_head, n_head, period, name=f"{prefix}.positional_encoder")(seq_dates)
    seq = keras.layers.Add(name=f"{prefix}.add_positions")([seq, pe])
    _, b_init = L.torch_default_initializers(d_model)
    keys = keras.layers.Dense(
        n_head * d_k,
        kernel_initializer=keras.initializers.RandomNormal(0.0, math.sqrt(2.0 / d_k)),
        bias_initializer=b_init,
        name=f"{prefix}.attention_heads.fc1_k",
    )(seq)
    out, attn = LTAEAttention(n_head, d_k, attn_dropout, name=f"{prefix}.attention_heads")([seq, keys, seq_mask])
    k_init, b_init = L.torch_default_initializers(d_model)
    out = keras.layers.Dense(mlp_out, kernel_initializer=k_init, bias_initializer=b_init, name=f"{prefix}.mlp.0")(out)
    out = L.batch_norm(f"{prefix}.mlp.1")(out)
    out = keras.layers.ReLU(name=f"{prefix}.mlp.2")(out)
    out = keras.layers.Dropout(dropout, name=f"{prefix}.dropout")(out)
    out = L.group_norm(n_head, f"{prefix}.out_norm")(out)
    out = FromSequences(name=f"{prefix}.out_to_map")([out, x])
    attn = FromSequences(name=f"{prefix}.attn_to_map")([attn, x])
    return out, attn
