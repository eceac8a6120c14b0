"""Winograd F(4x4, 3x3) convolutions for CPU inference.

A 3x3 convolution computes each 4 x 4 block of its output from a 6 x 6 block
of its input with 144 multiplications per input and output channel pair; the
Winograd algorithm F(4x4, 3x3) (Lavin & Gray, 2016) computes the same block
with 36: ``Y = A^T [ (G K G^T) (.) (B^T D B) ] A``, where ``(.)`` is a product
per position of the 6 x 6 transformed tiles, summed over input channels. That
sum is 36 independent matrix products ``V_k [tiles, C_in] @ U_k [C_in,
C_out]``, so the work moves from the convolution to a batched matrix product
with 4x fewer multiplications, plus two cheap linear transforms of the tiles.

On CPU, where oneDNN's direct convolution already runs near the machine's peak
rate, this is the only way to make the wide layers of U-Net/ResNet34 faster:
per layer at batch 4 about 2x for 256 channels at 32 x 32 px, 1.5x for 512
channels at 16 x 16 px, 1.1-1.3x for 128 channels at 64 x 64 px; layers with
fewer channels lose (the transforms cost more than the product saves), so only
convolutions with ``C_in * C_out / (C_in + C_out) >= MIN_WORK`` and inputs of at
least ``MIN_SIZE`` pixels (or of sizes unknown until run time) are converted.

The transforms run as XLA programs (each one fused loop), the product as
TensorFlow's batched matmul (oneDNN). The result equals the direct convolution
up to float rounding: about 1e-5 of the output's range per layer in float32
(F(4x4, 3x3) with the points 0, +-1, +-2 multiplies rounding errors by up to
about 10). For inference only: `winograd_model` builds a copy of a model with
the eligible convolutions replaced by `WinogradConv2D`, holding the
transformed kernels; `flair_tf.inference.model_io.load_model` applies it after
folding the BatchNorm layers when the process has no GPU or TPU (GPU libraries
pick their own convolution algorithms, Winograd included).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from flair_tf.models.folding import is_linear, rebuild

__all__ = ["MIN_SIZE", "MIN_WORK", "WinogradConv2D", "transform_kernel", "winograd_candidates", "winograd_model"]

OUT_TILE = 4  # m: output block side
IN_TILE = OUT_TILE + 2  # m + r - 1 with r = 3
MIN_WORK = 64  # C_in * C_out / (C_in + C_out): 128 x 128 channels and wider
MIN_SIZE = 16  # input height and width (when known): at least 4 x 4 tiles per image

# F(4x4, 3x3) with the interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)


def transform_kernel(kernel) -> np.ndarray:
    """``G K G^T`` of a [3, 3, C_in, C_out] kernel: [36, C_in, C_out], computed in float64."""
    k = np.asarray(kernel, np.float64)
    if k.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(4x4, 3x3) takes 3x3 kernels. Received: kernel shape {k.shape}")
    u = np.einsum("ai,ijco,bj->abco", _G, k, _G)
    return u.reshape(IN_TILE * IN_TILE, k.shape[2], k.shape[3])


def _combine(matrix: np.ndarray, parts: list) -> list:
    """``matrix @ parts`` for a small constant matrix and a list of tensors (no multiply by 0 or 1)."""
    out = []
    for row in matrix:
        acc = None
        for coef, part in zip(row, parts):
            if coef == 0:
                continue
            term = part if coef == 1 else -part if coef == -1 else part * float(coef)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _tiles(size):
    return (size + OUT_TILE - 1) // OUT_TILE


@tf.function(jit_compile=True, autograph=False)
def _input_transform(inputs):
    """``B^T D B`` of every 6 x 6 input tile: [36, N * tiles_h * tiles_w, sum of channels]."""
    x = inputs[0] if len(inputs) == 1 else tf.concat(inputs, axis=-1)
    n, h, w, c = (x.shape[i] if x.shape[i] is not None else tf.shape(x)[i] for i in range(4))
    th, tw = _tiles(h), _tiles(w)
    # 'same' padding of a 3x3 kernel, then up to whole tiles
    x = tf.pad(x, [[0, 0], [1, 1 + th * OUT_TILE - h], [1, 1 + tw * OUT_TILE - w], [0, 0]])
    rows = [x[:, r:r + OUT_TILE * th:OUT_TILE] for r in range(IN_TILE)]
    out = []
    for row in _combine(_BT, rows):
        out += _combine(_BT, [row[:, :, s:s + OUT_TILE * tw:OUT_TILE] for s in range(IN_TILE)])
    return tf.reshape(tf.stack(out), [IN_TILE * IN_TILE, n * th * tw, c])


@tf.function(jit_compile=True, autograph=False)
def _output_transform(products, bias, like):
    """``A^T M A`` of every tile, plus the bias, as an (N, H, W, C_out) tensor shaped like `like`."""
    n, h, w = (like.shape[i] if like.shape[i] is not None else tf.shape(like)[i] for i in range(3))
    th, tw = _tiles(h), _tiles(w)
    cout = products.shape[-1]
    m = tf.reshape(products, [IN_TILE, IN_TILE, n, th, tw, cout])
    rows = _combine(_AT, [m[i] for i in range(IN_TILE)])
    y = tf.stack([tf.stack(_combine(_AT, [row[j] for j in range(IN_TILE)])) for row in rows])
    # y[i, j, n, a, b] is output pixel (a * 4 + i, b * 4 + j)
    y = tf.reshape(tf.transpose(y, [2, 3, 0, 4, 1, 5]), [n, th * OUT_TILE, tw * OUT_TILE, cout])
    return y[:, :h, :w] + bias


def winograd_conv2d(inputs, transformed_kernel, bias):
    """The 'same' 3x3 convolution (stride 1) of `inputs` (a tensor or a list concatenated on channels)."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    v = _input_transform(inputs)
    return _output_transform(tf.linalg.matmul(v, transformed_kernel), bias, inputs[0])


@keras.saving.register_keras_serializable(package="flair_tf")
class WinogradConv2D(keras.layers.Layer):
    """A 3x3, stride 1, 'same' convolution with bias, computed by Winograd F(4x4, 3x3).

    Holds the transformed kernel (`transform_kernel`, [36, C_in, C_out]) and the
    bias; takes a tensor or, like `flair_tf.models.layers.Conv2D`, a list of
    tensors convolved as their channel concatenation. Inference only (it has
    no trainable weights); build it from a trained model with `winograd_model`.
    """

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)

    def build(self, input_shape):
        shapes = input_shape if isinstance(input_shape[0], (list, tuple)) else [input_shape]
        channels = sum(int(s[-1]) for s in shapes)
        self.kernel = self.add_weight(name="winograd_kernel", shape=(IN_TILE * IN_TILE, channels, self.filters),
                                      initializer="zeros", trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros", trainable=False)

    def call(self, inputs):
        return winograd_conv2d(inputs, tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(self.bias))

    def compute_output_shape(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        return tuple(shape[:-1]) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def _spatial_size(layer) -> int | None:
    """The smaller of the layer's input height and width, None when unknown (built with None)."""
    inputs = keras.tree.flatten(layer._inbound_nodes[0].input_tensors) if layer._inbound_nodes else []
    dims = [d for t in inputs[:1] for d in tuple(t.shape)[1:3]]
    return None if len(dims) != 2 or None in dims else min(dims)


def winograd_candidates(model: keras.Model, min_work: float = MIN_WORK, min_size: int = MIN_SIZE) -> list[str]:
    """Names of the convolutions `winograd_model` converts.

    Those are `keras.layers.Conv2D` layers (and subclasses that keep its
    computation) with a 3x3 kernel, stride 1, no dilation, one group, 'same'
    padding, channels last, no activation, float32 computation,
    ``C_in * C_out / (C_in + C_out) >= min_work``, and an input of at least
    `min_size` pixels in height and width, or of a size unknown until run time
    (smaller images have too few tiles to gain, and each layer size costs an XLA
    compilation).
    """
    names = []
    for layer in model.layers:
        if type(layer) is not keras.layers.Conv2D and not getattr(layer, "_winograd_compatible", False):
            continue
        if (tuple(layer.kernel_size) != (3, 3) or tuple(layer.strides) != (1, 1)
                or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1 or layer.padding != "same"
                or layer.data_format != "channels_last" or layer.compute_dtype != "float32"
                or not is_linear(layer.activation)):
            continue
        cin, cout = int(layer.kernel.shape[2]), layer.filters
        size = _spatial_size(layer)
        if cin * cout / (cin + cout) >= min_work and (size is None or size >= min_size):
            names.append(layer.name)
    return names


def winograd_model(model: keras.Model, min_work: float = MIN_WORK, min_size: int = MIN_SIZE) -> keras.Model:
    """An inference copy of `model` with its wide 3x3 convolutions computed by Winograd F(4x4, 3x3).

    Args:
      model: a functional Keras model (typically the output of
        `flair_tf.models.folding.fold_batchnorm`, so that the convolutions
        carry the BatchNorm and their bias).
      min_work, min_size: the thresholds of `winograd_candidates`.

    Returns:
      a new model with the same inputs, outputs, name and layer names, the
      converted convolutions replaced by `WinogradConv2D` (same name). Its
      outputs equal the original's up to float rounding (about 1e-5 of each
      layer's output range). `model` is left unchanged.
    """
    names = set(winograd_candidates(model, min_work, min_size))

    def replace(layer):
        if layer.name in names:
            return WinogradConv2D(layer.filters, name=layer.name, dtype=layer.dtype_policy.name)
        return None

    def weights(source):
        if source.name not in names:
            return None
        bias = source.bias.numpy() if source.use_bias else np.zeros(source.filters)
        dtype = keras.backend.standardize_dtype(source.kernel.dtype)
        return [transform_kernel(source.kernel.numpy()).astype(dtype), np.asarray(bias, dtype)]

    return rebuild(model, replace, weights)
