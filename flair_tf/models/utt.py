"""U-T&T: FLAIR #2's baseline fusing a U-Net on aerial images with U-TAE on Sentinel-2.

Forward pass of the reference ``TimeTexture_flair`` (spec flair2 section 4.2):

1. U-TAE on the Sentinel-2 super-patch -> decoder maps, ``maps[-1]`` is the
   (B, 40, 40, 64) embedding; U-Net's ResNet34 encoder on the aerial patch ->
   ``f0 .. f5``; optional metadata MLP added to ``f5`` along its height axis.
2. "Cropped" fusion: the 10x10 centre crop of the embedding (the aerial
   footprint), a 1x1 conv per level to C_l channels, bilinear
   (``align_corners=False``) resize to the level's size.
3. "Collapsed" fusion: the spatial mean of the embedding -> a 3-layer MLP per
   level -> broadcast over the level's H x W.
4. ``f_l += cropped_l + collapsed_l`` unless modality dropout skips it; the
   decoder and head give the aerial logits.
5. Auxiliary head: nearest upsampling of the cropped embedding to the aerial
   size and a 1x1 conv to the classes.

Reference quirks, reproduced by default, each switchable (see docs/models.md):

* ``per_sample_collapse=False``: the collapsed vector comes from batch
  sample 0 only and is added to every sample (``torch.mean(maps[-1][0])``);
* level 0 (the input-resolution map) gets its fusion maps computed but the
  smp decoder drops ``f0``: parameters exist (and load), output unused;
* ``modality_dropout_training_only=False``: ``drop_utae_modality`` draws once
  per forward call, at inference too;
* the U-TAE ``out_conv`` is computed (its BatchNorm statistics update in
  training) but unused.

All layer names are ``TimeTexture_flair``'s module paths (``arch_vhr.*``,
``arch_hr.*``, ``fm_utae_featmap_cropped.conv_list.{i}``,
``fm_utae_featmap_collapsed.mlps.{i}.{0,3,6}``, ``reshape_utae_output.1``,
``mtd_mlp.enc_mlp.{0,3,6}``).
"""

from __future__ import annotations

import keras
from keras import ops

from flair_tf.models import layers as L
from flair_tf.models.resnet import RESNET34_OUT_CHANNELS, resnet34_features
from flair_tf.models.unet import (
    METADATA_SIZE,
    AddAlongHeight,
    metadata_mlp,
    segmentation_head,
    unet_decoder,
)
from flair_tf.models.utae import DECODER_WIDTHS, OUT_CONV, SENTINEL_BANDS, sentinel_inputs, utae_graph

CROP_SIZE = 10  # Sentinel-2 pixels (10 m) covering the 512 x 0.2 m aerial patch


def collapsed_mlp_widths(c_in: int, c_out: int) -> tuple[int, int, int]:
    """Hidden/output widths of ``FM_collapsed``'s MLP for one level (m = |c_in - c_out| // 3)."""
    m = abs(c_in - c_out) // 3
    if c_in < c_out:
        return c_in + m, c_in + 2 * m, c_out
    if c_in > c_out:
        return c_in - m, c_in - 2 * m, c_out
    return 2 * c_in, 2 * c_in, c_out


@keras.saving.register_keras_serializable(package="flair_tf")
class SpatialMean(keras.layers.Layer):
    """(B, H, W, C) -> mean over H, W: (B, C), or (1, C) from sample 0 only.

    ``per_sample=False`` reproduces the reference's ``torch.mean(maps[-1][0], (-2, -1))``.
    """

    def __init__(self, per_sample=False, **kwargs):
        super().__init__(**kwargs)
        self.per_sample = bool(per_sample)

    def call(self, x):
        if not self.per_sample:
            x = x[:1]
        return ops.mean(x, axis=(1, 2))

    def compute_output_shape(self, s):
        return (s[0] if self.per_sample else 1, s[3])

    def get_config(self):
        return {**super().get_config(), "per_sample": self.per_sample}


@keras.saving.register_keras_serializable(package="flair_tf")
class AddBroadcast(keras.layers.Layer):
    """``[x (B, H, W, C), v (B or 1, C)]`` -> ``x + v`` broadcast over H, W (and B)."""

    def call(self, inputs):
        x, v = inputs
        return x + ops.cast(v, x.dtype)[:, None, None, :]

    def compute_output_shape(self, shapes):
        return shapes[0]


@keras.saving.register_keras_serializable(package="flair_tf")
class ModalityDropout(keras.layers.Layer):
    """``[f_1..f_n, m_1..m_n]`` -> ``f_l + keep * m_l``, one draw per call.

    ``keep = uniform() > rate`` like the reference's ``torch.rand(1) > p``.
    With ``training_only=False`` (reference) the draw also happens at
    inference; with True, inference always adds the maps. ``rate=0`` always
    adds them (no random draw).
    """

    def __init__(self, rate=0.0, training_only=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.training_only, self.seed = float(rate), bool(training_only), seed
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"drop_utae_modality must be in [0, 1]. Received: {rate}")
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def call(self, inputs, training=None):
        n = len(inputs) // 2
        feats, maps = inputs[:n], inputs[n:]
        if self.rate == 0.0 or (self.training_only and not training):
            return [f + ops.cast(m, f.dtype) for f, m in zip(feats, maps)]
        keep = ops.cast(keras.random.uniform((), seed=self.seed_generator) > self.rate, "float32")
        return [f + ops.cast(keep, f.dtype) * ops.cast(m, f.dtype) for f, m in zip(feats, maps)]

    def compute_output_shape(self, shapes):
        return list(shapes[: len(shapes) // 2])

    def compute_output_spec(self, inputs, training=None):
        return [keras.KerasTensor(f.shape, dtype=f.dtype) for f in inputs[: len(inputs) // 2]]

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "training_only": self.training_only, "seed": self.seed}


def _cropped_map(crop, channels, size, name):
    k_init, b_init = L.torch_default_initializers(crop.shape[-1])
    y = keras.layers.Conv2D(channels, 1, kernel_initializer=k_init, bias_initializer=b_init, name=name)(crop)
    return L.TorchResize((size, size), "bilinear", name=f"{name}.resize")(y)


def _collapsed_vector(v, channels, name, dropout=0.3):
    fan_in = v.shape[-1]
    widths = collapsed_mlp_widths(fan_in, channels)
    for j, width in enumerate(widths):
        k_init, b_init = L.torch_default_initializers(fan_in)
        v = keras.layers.Dense(width, kernel_initializer=k_init, bias_initializer=b_init, name=f"{name}.{3 * j}")(v)
        fan_in = width
        if j < 2:
            v = keras.layers.Dropout(dropout, name=f"{name}.{3 * j + 1}")(v)
            v = keras.layers.ReLU(name=f"{name}.{3 * j + 2}")(v)
    return v


def build_utt(
    num_classes: int = 13,
    in_channels: int = 5,
    input_size: int = 512,
    sentinel_size: int = 40,
    num_dates: int | None = None,
    use_metadata: bool = False,
    norm_mean=None,
    norm_std=None,
    sentinel_bands: int = SENTINEL_BANDS,
    crop_size: int = CROP_SIZE,
    drop_utae_modality: float = 0.0,
    modality_dropout_training_only: bool = False,
    per_sample_collapse: bool = False,
    masked_in_norm: bool = False,
    metadata_dropout: float = 0.5,
    name: str = "utt",
) -> keras.Model:
    """U-T&T (27,254,744 parameters; +5,552 with metadata).

    Args:
      num_classes: classes of both heads (13 in FLAIR #2).
      in_channels: aerial channels (5 = R, G, B, NIR, elevation).
      input_size: aerial H = W, a multiple of 32 (512 in FLAIR #2).
      sentinel_size: Sentinel-2 patch S (divisible by 8, >= crop_size).
      num_dates: static T of the Sentinel-2 series, or None.
      use_metadata: add FLAIR #2's metadata MLP (``mtd_mlp``: dropout 0.5, no
        final ReLU) onto the bottleneck; the model then takes ``metadata``.
      norm_mean, norm_std: aerial normalisation (None: x / 255).
      sentinel_bands: Sentinel-2 bands (10).
      crop_size: centre crop of the U-TAE embedding used by the fusion and the
        auxiliary head (10 in the reference).
      drop_utae_modality: probability of not adding the U-TAE maps in one
        forward call (reference default 0.0).
      modality_dropout_training_only: False (reference) draws at inference
        too; True never drops at inference.
      per_sample_collapse: False (reference) feeds every sample the collapsed
        vector of batch sample 0; True uses each sample's own.
      masked_in_norm: exclude padded steps from L-TAE's ``in_norm``
        statistics (False = reference).
      metadata_dropout: dropout of the metadata MLP.
      name: model name.

    Returns:
      a `keras.Model` taking ``{"aerial", "sentinel", "sentinel_dates",
      "sentinel_pad_mask"[, "metadata"]}`` (contract C) and returning
      ``{"aerial": (B, H, W, num_classes), "sentinel": (B, H, W, num_classes)}``
      float32 logits (U-Net and auxiliary U-TAE heads).
    """
    if input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32. Received: input_size={input_size}")
    if not 0.0 <= drop_utae_modality <= 1.0:
        raise ValueError(f"drop_utae_modality must be in [0, 1]. Received: drop_utae_modality={drop_utae_modality}")
    if sentinel_size < crop_size:
        raise ValueError(f"sentinel_size ({sentinel_size}) must be >= crop_size ({crop_size}).")
    inputs = {"aerial": keras.Input((input_size, input_size, in_channels), name="aerial")}
    inputs.update(sentinel_inputs(sentinel_size, num_dates, sentinel_bands))
    if use_metadata:
        inputs["metadata"] = keras.Input((METADATA_SIZE,), name="metadata")

    utae_logits, maps = utae_graph(
        inputs["sentinel"],
        inputs["sentinel_dates"],
        inputs["sentinel_pad_mask"],
        prefix="arch_hr",
        out_conv=(OUT_CONV[0], num_classes),
        masked_in_norm=masked_in_norm,
    )
    x = L.InputNormalization(norm_mean, norm_std, name="input_normalization")(inputs["aerial"])
    feats = resnet34_features(x, "arch_vhr.encoder")
    if use_metadata:
        e = metadata_mlp(inputs["metadata"], "mtd_mlp.enc_mlp", metadata_dropout, final_relu=False)
        feats[-1] = AddAlongHeight(name="metadata_fusion")([feats[-1], e])

    embedding = maps[-1]
    crop = L.CenterCrop(crop_size, name="utae_center_crop")(embedding)
    vector = SpatialMean(per_sample_collapse, name="utae_collapse")(embedding)
    channels = (in_channels, *RESNET34_OUT_CHANNELS)
    fms = []
    for level, (c, f) in enumerate(zip(channels, feats)):
        cropped = _cropped_map(crop, c, f.shape[1], f"fm_utae_featmap_cropped.conv_list.{level}")
        collapsed = _collapsed_vector(vector, c, f"fm_utae_featmap_collapsed.mlps.{level}")
        fms.append(AddBroadcast(name=f"fm_utae_sum.{level}")([cropped, collapsed]))

    # Level 0 is dropped by the smp decoder: keep its fusion branch (and the
    # unused U-TAE out_conv) in the graph without using their values.
    fused = ModalityDropout(drop_utae_modality, modality_dropout_training_only, name="drop_utae_modality")(
        feats[1:] + fms[1:]
    )
    fused[-1] = L.PassThrough(name="unused_reference_branches")([fused[-1], fms[0], utae_logits])
    y = unet_decoder([feats[0], *fused], "arch_vhr.decoder", channels=(256, 128, 64, 32, 16))
    aerial_logits = segmentation_head(y, num_classes, "arch_vhr.segmentation_head.0")

    # reshape_utae_output = Upsample(nearest) then Conv2d(64, classes, 1); a 1x1
    # conv commutes with nearest upsampling, so it runs at crop resolution.
    k_init, b_init = L.torch_default_initializers(DECODER_WIDTHS[0])
    aux = keras.layers.Conv2D(
        num_classes, 1, kernel_initializer=k_init, bias_initializer=b_init, dtype="float32", name="reshape_utae_output.1"
    )(crop)
    aux = L.TorchResize((input_size, input_size), "nearest", dtype="float32", name="reshape_utae_output.0")(aux)
    return keras.Model(inputs, {"aerial": aerial_logits, "sentinel": aux}, name=name)
