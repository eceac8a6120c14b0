"""U-TAE (Sainte Fare Garnot & Landrieu, 2021) as instantiated in FLAIR #2's U-T&T.

Reference call: ``UTAE(input_dim=10, encoder_widths=[64,64,128,128],
decoder_widths=[64,64,128,128], out_conv=[32,13], str_conv_k=4, str_conv_s=2,
str_conv_p=1, agg_mode="att_group", encoder_norm="group", n_head=16,
d_model=256, d_k=4, return_maps=True, pad_value=0, padding_mode="reflect")``:
2,284,199 parameters.

Numerics reproduced:

* every conv of the encoder/decoder ``ConvLayer`` uses reflect padding
  (also the k4/s2 down convolutions); GroupNorm(4 groups, eps 1e-5) in the
  encoder, BatchNorm (eps 1e-5, momentum 0.9) in the decoder and ``out_conv``;
* the temporally shared encoder (``smart_forward``) folds time into the
  batch; padded frames' outputs are forced to 0 (the reference never
  convolves them and fills them with ``pad_value`` 0);
* skip connections use ``att_group`` aggregation: the (post-dropout) L-TAE
  attention of each head is bilinearly upsampled (``align_corners=False``)
  to the skip resolution, zeroed on padded steps, and weights its own
  contiguous chunk of C/16 channels, summed over time;
* up blocks: ``ConvTranspose2d(k4, s2, p1)`` + BN + ReLU, concatenated with
  ``skip_conv`` (1x1 conv + BN + ReLU) of the aggregated skip, then two
  ConvLayers with a residual;
* ``out_conv`` (64 -> 32 -> 13, BN and ReLU after BOTH convs) is computed,
  and returned as the U-TAE logits of the standalone model.

The pad mask is the model input ``sentinel_pad_mask`` (True = padded). The
reference recomputes it from all-zero frames (``(x == 0).all((C, H, W))``)
and pads each batch to its longest series; see `flair_tf.models.ltae` for
``masked_in_norm``.
"""

from __future__ import annotations

import keras
from keras import ops

from flair_tf.models import layers as L
from flair_tf.models.ltae import ltae2d

ENCODER_WIDTHS = (64, 64, 128, 128)
DECODER_WIDTHS = (64, 64, 128, 128)
OUT_CONV = (32, 13)
SENTINEL_BANDS = 10


def _conv(x, filters, kernel, stride, name, use_bias=True):
    """``nn.Conv2d(kernel, stride, padding=1, padding_mode='reflect')`` with PyTorch init."""
    fan_in = x.shape[-1] * kernel * kernel
    k_init, b_init = L.torch_default_initializers(fan_in)
    x = L.ReflectPad2D(1, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="valid",
        use_bias=use_bias,
        kernel_initializer=k_init,
        bias_initializer=b_init,
        name=name,
    )(x)


def conv_layer(x, widths, name, norm="group", kernel=3, stride=1, n_groups=4):
    """Reference ``ConvLayer``: (conv, norm, ReLU) per consecutive width pair.

    ``name`` is the module path of the ``nn.Sequential`` (``....conv``);
    sub-layers take its indices (0 conv, 1 norm, 2 ReLU, 3 conv, ...).
    """
    idx = 0
    for filters in widths:
        x = _conv(x, filters, kernel, stride, f"{name}.{idx}")
        if norm == "group":
            x = L.group_norm(n_groups, f"{name}.{idx + 1}")(x)
        elif norm == "batch":
            x = L.batch_norm(f"{name}.{idx + 1}")(x)
        elif norm is not None:
            raise ValueError(f"norm must be 'group', 'batch' or None. Received: norm={norm!r}")
        x = keras.layers.ReLU(name=f"{name}.{idx + 2}")(x)
        idx += 3 if norm else 2
    return x


def _down_block(x, d_out, name, norm):
    d_in = x.shape[-1]
    y = conv_layer(x, [d_in], f"{name}.down.conv", norm, kernel=4, stride=2)
    y = conv_layer(y, [d_out], f"{name}.conv1.conv", norm)
    z = conv_layer(y, [d_out], f"{name}.conv2.conv", norm)
    return keras.layers.Add(name=f"{name}.add")([y, z])


def _shared(fn, x, pad_mask, name):
    """Temporally shared block: fold T into B, apply ``fn``, unfold, zero padded frames."""
    y = fn(L.MergeTime(name=f"{name}.merge_time")(x))
    y = L.SplitTime(name=f"{name}.split_time")([y, x])
    return L.ZeroPaddedSteps(name=f"{name}.zero_padded")([y, pad_mask])


@keras.saving.register_keras_serializable(package="flair_tf")
class AttentionGroupAggregate(keras.layers.Layer):
    """``att_group`` temporal aggregation of a skip connection.

    ``inputs = [attn (B, h, w, G, T), feats (B, T, H, W, C), pad_mask (B, T)]``
    -> (B, H, W, C): channel chunk g of C/G channels is weighted by head g's
    attention (bilinear, ``align_corners=False`` to (H, W)) and summed over T.
    """

    def call(self, inputs):
        attn, feats, pad_mask = inputs
        b, t = ops.shape(feats)[0], ops.shape(feats)[1]
        (h, w, heads), (height, width, channels) = attn.shape[1:4], feats.shape[2:5]
        if height < h or width < w:
            raise ValueError(
                f"att_group aggregation only upsamples attention ({h}x{w}) to the skip resolution; "
                f"got a skip of {height}x{width}. Received: {feats.shape}"
            )
        a = ops.reshape(attn, (b, h, w, heads * t))
        a = L.torch_resize(a, (height, width), "bilinear", in_size=(h, w))
        a = ops.reshape(a, (b, height, width, heads, t))
        keep = ops.cast(ops.logical_not(ops.cast(pad_mask, "bool")), a.dtype)
        a = a * keep[:, None, None, None, :]
        f = ops.reshape(feats, (b, t, height, width, heads, channels // heads))
        out = ops.einsum("byxgt,btyxgc->byxgc", a, ops.cast(f, a.dtype))
        return ops.cast(ops.reshape(out, (b, height, width, channels)), feats.dtype)

    def compute_output_shape(self, shapes):
        _, f, _ = shapes
        return (f[0], f[2], f[3], f[4])


def _up_block(x, skip, d_out, name):
    d_skip = skip.shape[-1]
    k_init, b_init = L.torch_default_initializers(d_skip)
    s = keras.layers.Conv2D(d_skip, 1, kernel_initializer=k_init, bias_initializer=b_init, name=f"{name}.skip_conv.0")(
        skip
    )
    s = L.batch_norm(f"{name}.skip_conv.1")(s)
    s = keras.layers.ReLU(name=f"{name}.skip_conv.2")(s)
    # ConvTranspose2d(k4, s2, p1): fan_in of PyTorch's init is out_channels * 16,
    # which is also what Keras computes for a (kh, kw, out, in) kernel.
    k_init, b_init = L.torch_default_initializers(d_out * 16)
    u = keras.layers.Conv2DTranspose(
        d_out, 4, strides=2, padding="same", kernel_initializer=k_init, bias_initializer=b_init, name=f"{name}.up.0"
    )(x)
    u = L.batch_norm(f"{name}.up.1")(u)
    u = keras.layers.ReLU(name=f"{name}.up.2")(u)
    y = keras.layers.Concatenate(name=f"{name}.concat")([u, s])
    y = conv_layer(y, [d_out], f"{name}.conv1.conv", "batch")
    z = conv_layer(y, [d_out], f"{name}.conv2.conv", "batch")
    return keras.layers.Add(name=f"{name}.add")([y, z])


def utae_graph(
    sentinel,
    dates,
    pad_mask,
    prefix: str = "arch_hr",
    encoder_widths=ENCODER_WIDTHS,
    decoder_widths=DECODER_WIDTHS,
    out_conv=OUT_CONV,
    n_head: int = 16,
    d_model: int = 256,
    d_k: int = 4,
    masked_in_norm: bool = False,
):
    """Builds U-TAE on symbolic inputs.

    Args:
      sentinel: (B, T, S, S, bands) float tensor, S divisible by 8.
      dates: (B, T) day offsets.
      pad_mask: (B, T) bool, True = padded step.
      prefix: module path of the U-TAE (``arch_hr`` in U-T&T, ``""`` standalone).
      encoder_widths, decoder_widths, out_conv, n_head, d_model, d_k: the
        reference's hyper-parameters (FLAIR #2 values by default).
      masked_in_norm: see `flair_tf.models.ltae.ltae2d`.

    Returns:
      ``(out, maps)``: ``out_conv`` output (B, S, S, out_conv[-1]) (after its
      final ReLU, as in the reference) and the decoder maps from the lowest to
      the highest resolution (``maps[-1]`` is the (B, S, S, 64) embedding).
    """
    if encoder_widths[-1] != decoder_widths[-1]:
        raise ValueError(f"encoder_widths[-1] must equal decoder_widths[-1]. Received: {encoder_widths}, {decoder_widths}")
    size = sentinel.shape[2]
    if size is not None and size % 2 ** (len(encoder_widths) - 1):
        raise ValueError(f"Sentinel patch size must be divisible by {2 ** (len(encoder_widths) - 1)}. Received: {size}")
    pre = f"{prefix}." if prefix else ""
    feats = [
        _shared(
            lambda t: conv_layer(t, [encoder_widths[0]] * 2, f"{pre}in_conv.conv.conv", "group"),
            sentinel,
            pad_mask,
            f"{pre}in_conv",
        )
    ]
    for i in range(len(encoder_widths) - 1):
        name = f"{pre}down_blocks.{i}"
        feats.append(
            _shared(lambda t, i=i, name=name: _down_block(t, encoder_widths[i + 1], name, "group"), feats[-1], pad_mask, name)
        )
    out, attn = ltae2d(
        feats[-1], dates, pad_mask, f"{pre}temporal_encoder", n_head, d_k, d_model, encoder_widths[-1],
        masked_in_norm=masked_in_norm,
    )
    maps = [out]
    for i in range(len(encoder_widths) - 1):
        skip = AttentionGroupAggregate(name=f"{pre}temporal_aggregator.{i}")([attn, feats[-(i + 2)], pad_mask])
        out = _up_block(out, skip, decoder_widths[-(i + 2)], f"{pre}up_blocks.{i}")
        maps.append(out)
    logits = conv_layer(out, list(out_conv), f"{pre}out_conv.conv.conv", "batch")
    return logits, maps


def sentinel_inputs(sentinel_size: int = 40, num_dates: int | None = None, bands: int = SENTINEL_BANDS):
    """The three Sentinel-2 `keras.Input`s of contract C (float series, dates, pad mask)."""
    return {
        "sentinel": keras.Input((num_dates, sentinel_size, sentinel_size, bands), name="sentinel"),
        "sentinel_dates": keras.Input((num_dates,), name="sentinel_dates"),
        "sentinel_pad_mask": keras.Input((num_dates,), dtype="bool", name="sentinel_pad_mask"),
    }


def build_utae(
    num_classes: int = 13,
    sentinel_size: int = 40,
    num_dates: int | None = None,
    bands: int = SENTINEL_BANDS,
    masked_in_norm: bool = False,
    name: str = "utae",
) -> keras.Model:
    """Standalone U-TAE with FLAIR #2's configuration (2,284,199 parameters).

    Args:
      num_classes: channels of the last ``out_conv`` layer (13 in FLAIR #2).
      sentinel_size: S of the (S, S) Sentinel-2 patches (divisible by 8).
      num_dates: static T, or None.
      bands: spectral bands (10).
      masked_in_norm: exclude padded steps from L-TAE's ``in_norm`` statistics.
      name: model name.

    Returns:
      a `keras.Model` taking ``{"sentinel": (B, T, S, S, 10) float,
      "sentinel_dates": (B, T), "sentinel_pad_mask": (B, T) bool}`` and
      returning ``{"sentinel": (B, S, S, num_classes)}`` float32 (the
      reference's ``out_conv`` output, ReLU included). Layer names are the
      module paths of ``UTAE`` (``in_conv.conv.conv.0``, ``temporal_encoder.inconv``, ...).
    """
    inputs = sentinel_inputs(sentinel_size, num_dates, bands)
    logits, _ = utae_graph(
        inputs["sentinel"],
        inputs["sentinel_dates"],
        inputs["sentinel_pad_mask"],
        prefix="",
        out_conv=(OUT_CONV[0], num_classes),
        masked_in_norm=masked_in_norm,
    )
    logits = keras.layers.Activation("linear", dtype="float32", name="output_float32")(logits)
    model = keras.Model(inputs, {"sentinel": logits}, name=name)
    return model
