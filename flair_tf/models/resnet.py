"""ResNet34 encoder as torchvision builds it (and smp wraps it), for Keras 3.

PyTorch-exact details:

* strided convolutions and the stem max-pool use explicit symmetric zero
  padding followed by ``'valid'`` (Keras ``'same'`` pads asymmetrically for
  stride 2 and gives different results);
* BatchNorm epsilon 1e-5 and momentum 0.9 (= PyTorch momentum 0.1);
* the max-pool follows a ReLU, so zero padding equals PyTorch's -inf padding.

Layer names are the PyTorch module paths (``encoder.layer1.0.conv1``, ...)
so that `flair_tf.models.weights` maps a state_dict by name.
"""

from __future__ import annotations

import keras

from flair_tf.models import layers as L

# (blocks, channels, first stride) of ResNet34's four stages.
RESNET34_STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
# smp's `encoder.out_channels` for ResNet34 with C input channels: (C, 64, 64, 128, 256, 512).
RESNET34_OUT_CHANNELS = (64, 64, 128, 256, 512)


def _encoder_conv_init():
    # torchvision ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu").
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _conv(x, filters, kernel, stride, name):
    """Conv without bias, PyTorch padding ``kernel // 2``."""
    pad = kernel // 2
    if stride == 1:
        padding = "same"  # symmetric for odd kernels at stride 1
    else:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x) if pad else x
        padding = "valid"
    return keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer=_encoder_conv_init(),
        name=name,
    )(x)


def basic_block(x, filters: int, stride: int, name: str):
    """torchvision ``BasicBlock`` (conv-bn-relu-conv-bn + shortcut, relu)."""
    shortcut = x
    y = _conv(x, filters, 3, stride, f"{name}.conv1")
    y = L.batch_norm(f"{name}.bn1")(y)
    y = keras.layers.ReLU(name=f"{name}.relu1")(y)
    y = _conv(y, filters, 3, 1, f"{name}.conv2")
    y = L.batch_norm(f"{name}.bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, stride, f"{name}.downsample.0")
        shortcut = L.batch_norm(f"{name}.downsample.1")(shortcut)
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}.relu2")(y)


def resnet34_features(x, prefix: str = "encoder"):
    """Applies the ResNet34 encoder to a normalised (B, H, W, C) tensor.

    Args:
      x: float tensor (B, H, W, C), H and W divisible by 32.
      prefix: PyTorch module path of the encoder (``"encoder"`` in smp's Unet,
        ``"arch_vhr.encoder"`` in U-T&T).

    Returns:
      ``[f0, f1, f2, f3, f4, f5]`` like smp's ``encoder(x)``: the input, then
      64 @ H/2, 64 @ H/4, 128 @ H/8, 256 @ H/16, 512 @ H/32.
    """
    feats = [x]
    y = _conv(x, 64, 7, 2, f"{prefix}.conv1")
    y = L.batch_norm(f"{prefix}.bn1")(y)
    y = keras.layers.ReLU(name=f"{prefix}.relu")(y)
    feats.append(y)
    y = keras.layers.ZeroPadding2D(1, name=f"{prefix}.maxpool_pad")(y)
    y = keras.layers.MaxPooling2D(3, 2, padding="valid", name=f"{prefix}.maxpool")(y)
    for stage, (blocks, filters, stride) in enumerate(RESNET34_STAGES, start=1):
        for b in range(blocks):
            y = basic_block(y, filters, stride if b == 0 else 1, f"{prefix}.layer{stage}.{b}")
        feats.append(y)
    return feats


def build_resnet34_encoder(in_channels: int = 5, input_size: int | None = None, name="resnet34_encoder"):
    """A standalone ResNet34 encoder model returning the six smp feature levels.

    Args:
      in_channels: number of input channels (float input, already normalised).
      input_size: static H = W, or None for any size divisible by 32.
      name: model name.

    Returns:
      a `keras.Model` mapping (B, H, W, C) float32 to the list [f0, ..., f5];
      layer names ``encoder.conv1``, ``encoder.layer1.0.conv1``, ...

    Example:
      >>> enc = build_resnet34_encoder(5, 64)
      >>> [f.shape[1] for f in enc.outputs]
      [64, 32, 16, 8, 4, 2]
    """
    inp = keras.Input((input_size, input_size, in_channels), name="image")
    return keras.Model(inp, resnet34_features(inp, "encoder"), name=name)
