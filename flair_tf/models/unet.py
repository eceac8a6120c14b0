"""U-Net/ResNet34 of segmentation-models-pytorch (smp) and the FLAIR #1 metadata MLP.

The aerial baseline of FLAIR #1 and the aerial branch of FLAIR #2's U-T&T is
``smp.Unet("resnet34", classes=13, in_channels=5)``: a ResNet34 encoder, a
decoder of five blocks (256, 128, 64, 32, 16 channels; nearest x2 upsampling,
concatenation ``[upsampled, skip]``, two conv3x3-BN-ReLU) and a conv3x3 head
producing raw logits.

FLAIR #1's metadata variant (``SMP_Unet_meta``) passes the 45-value encoded
metadata through ``Linear(45,64) Dropout(0.4) ReLU Linear(64,32) Dropout(0.4)
ReLU Linear(32,16) Dropout(0.4) ReLU`` and ADDS the 16 outputs to the 16x16x512
bottleneck along its HEIGHT axis (``value[b, h, w, c] = mlp[b, h]``).
"""

from __future__ import annotations

import keras
from keras import ops

from flair_tf.models import layers as L
from flair_tf.models.resnet import resnet34_features

DECODER_CHANNELS = (256, 128, 64, 32, 16)
METADATA_SIZE = 45
METADATA_EMBEDDING = 16


def _decoder_conv(x, filters, name):
    # smp initialize_decoder: kaiming_uniform_(fan_in, relu), no bias (BN follows).
    # x may be [upsampled, skip]: the convolution of their concatenation (L.Conv2D).
    x = L.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_uniform", name=f"{name}.0")(x)
    x = L.batch_norm(f"{name}.1")(x)
    return keras.layers.ReLU(name=f"{name}.2")(x)


def unet_decoder(feats, prefix: str = "decoder", channels=DECODER_CHANNELS):
    """smp ``UnetDecoder`` on the encoder features ``[f0, ..., f5]`` (f0 is dropped).

    Args:
      feats: the six encoder feature maps.
      prefix: PyTorch module path of the decoder.
      channels: output channels of the five blocks.

    Returns:
      the decoder output (B, H, W, channels[-1]).
    """
    skips = list(reversed(feats[1:-1]))  # f4, f3, f2, f1
    x = feats[-1]
    for i, filters in enumerate(channels):
        name = f"{prefix}.blocks.{i}"
        x = L.UpSampling2D(2, interpolation="nearest", name=f"{name}.up")(x)
        if i < len(skips):
            x = [x, skips[i]]  # concatenated along channels by the convolution
        x = _decoder_conv(x, filters, f"{name}.conv1")
        x = _decoder_conv(x, filters, f"{name}.conv2")
    return x


def segmentation_head(x, num_classes: int, name: str = "segmentation_head.0"):
    """smp head: Conv2d(16, num_classes, 3, padding=1) with bias, float32 logits."""
    return keras.layers.Conv2D(
        num_classes,
        3,
        padding="same",
        kernel_initializer="glorot_uniform",  # smp initialize_head: xavier_uniform_
        dtype="float32",
        name=name,
    )(x)


def metadata_mlp(x, prefix: str, dropout: float, final_relu: bool):
    """The metadata MLP 45 -> 64 -> 32 -> 16 (PyTorch ``nn.Sequential`` indices 0, 3, 6).

    Args:
      x: (B, 45) encoded metadata.
      prefix: module path of the Sequential (``enc.enc_mlp`` in FLAIR #1,
        ``mtd_mlp.enc_mlp`` in FLAIR #2).
      dropout: dropout rate before each ReLU (0.4 in FLAIR #1, 0.5 in FLAIR #2).
      final_relu: FLAIR #1 ends with Dropout + ReLU; FLAIR #2 ends with the Linear.

    Returns:
      (B, 16).
    """
    widths = (64, 32, METADATA_EMBEDDING)
    fan_in = METADATA_SIZE
    for j, width in enumerate(widths):
        kernel_init, bias_init = L.torch_default_initializers(fan_in)
        x = keras.layers.Dense(
            width, kernel_initializer=kernel_init, bias_initializer=bias_init, name=f"{prefix}.{3 * j}"
        )(x)
        fan_in = width
        if j < len(widths) - 1 or final_relu:
            x = keras.layers.Dropout(dropout, name=f"{prefix}.{3 * j + 1}")(x)
            x = keras.layers.ReLU(name=f"{prefix}.{3 * j + 2}")(x)
    return x


@keras.saving.register_keras_serializable(package="flair_tf")
class AddAlongHeight(keras.layers.Layer):
    """``[f (B, H, W, C), e (B, 16)]`` -> ``f + e[:, h % 16]`` broadcast over W and C.

    For the 16x16 bottleneck of a 512x512 input this is exactly the reference's
    ``e.unsqueeze(1).unsqueeze(-1).repeat(1, 512, 1, 16)`` addition. The
    reference only works for that size; for other sizes the 16 values are
    tiled (H > 16) or truncated (H < 16) along the height axis, a documented
    generalisation (see docs/models.md).
    """

    def call(self, inputs):
        f, e = inputs
        height = f.shape[1]
        n = e.shape[-1]
        rows = [h % n for h in range(height)]
        if rows != list(range(n)):
            e = ops.take(e, ops.convert_to_tensor(rows, "int32"), axis=1)
        return f + ops.cast(e[:, :, None, None], f.dtype)

    def compute_output_shape(self, shapes):
        return shapes[0]


def build_unet(
    num_classes: int = 13,
    in_channels: int = 5,
    input_size: int | None = None,
    use_metadata: bool = False,
    norm_mean=None,
    norm_std=None,
    metadata_dropout: float = 0.4,
    name: str = "unet_resnet34",
) -> keras.Model:
    """smp ``Unet('resnet34')`` (FLAIR #1 baseline), optionally with metadata fusion.

    Args:
      num_classes: output classes (13 for the challenge, 19 for the main lib).
      in_channels: aerial channels (5 = R, G, B, NIR, elevation).
      input_size: static H = W (multiple of 32), or None for any multiple of
        32. The metadata fusion reproduces the reference exactly at 512.
      use_metadata: add FLAIR #1's metadata MLP (+5,552 parameters); the
        model then takes ``metadata`` (B, 45).
      norm_mean: per-channel means of the raw input, or None (x / 255).
      norm_std: per-channel standard deviations, or None.
      metadata_dropout: dropout of the metadata MLP (0.4 in the reference).
      name: model name.

    Returns:
      a `keras.Model` taking ``{"aerial": (B, H, W, C)[, "metadata": (B, 45)]}``
      (uint8 or float) and returning ``{"aerial": (B, H, W, num_classes)}``
      float32 logits. Layer names are smp's module names (``encoder.conv1``,
      ``decoder.blocks.0.conv1.0``, ``segmentation_head.0``) and ``enc.enc_mlp.{0,3,6}``
      for the metadata MLP (``SMP_Unet_meta.enc``).

    Example:
      >>> model = build_unet(num_classes=13, input_size=64)
      >>> model.count_params() > 24_000_000
      True
    """
    if input_size is not None and input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32. Received: input_size={input_size}")
    inputs = {"aerial": keras.Input((input_size, input_size, in_channels), name="aerial")}
    x = L.InputNormalization(norm_mean, norm_std, name="input_normalization")(inputs["aerial"])
    feats = resnet34_features(x, "encoder")
    if use_metadata:
        inputs["metadata"] = keras.Input((METADATA_SIZE,), name="metadata")
        e = metadata_mlp(inputs["metadata"], "enc.enc_mlp", metadata_dropout, final_relu=True)
        feats[-1] = AddAlongHeight(name="metadata_fusion")([feats[-1], e])
    y = unet_decoder(feats, "decoder")
    logits = segmentation_head(y, num_classes, "segmentation_head.0")
    return keras.Model(inputs, {"aerial": logits}, name=name)
