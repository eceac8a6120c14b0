"""Parity of our U-Net/ResNet34 with segmentation-models-pytorch (smp), same weights, eval mode."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")
torchvision = pytest.importorskip("torchvision")

from flair_tf.models import build_unet  # noqa: E402
from flair_tf.models import weights as W  # noqa: E402
from flair_tf.models.resnet import build_resnet34_encoder  # noqa: E402

nn = torch.nn


def _randomize_and_calibrate(module, x, seed):
    """Random BN affine parameters, then BN statistics set from ``x`` (as training would).

    Without calibration, eval-mode activations grow through the randomly
    initialised ResNet and float32 rounding of BOTH frameworks exceeds 1e-4.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            m.momentum = 1.0
        module.train()
        module(*x)
        for m in bns:
            m.momentum = 0.1
            m.running_var.clamp_(min=0.1)
    return module.eval()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0


def test_unet_matches_smp_at_64px():
    torch.manual_seed(0)
    x = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 5)).astype(np.uint8)
    ref_model = _randomize_and_calibrate(
        smp.Unet("resnet34", encoder_weights=None, in_channels=5, classes=13), (_nchw(x),), seed=1
    )
    with torch.no_grad():
        ref = ref_model(_nchw(x)).permute(0, 2, 3, 1).numpy()
    model = build_unet(num_classes=13, in_channels=5, input_size=64)
    W.load_state_dict(model, {k: v.numpy() for k, v in ref_model.state_dict().items()}, source="smp Unet")
    out = np.asarray(model({"aerial": x}, training=False)["aerial"])
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


class _MetadataMLP(nn.Module):
    """FLAIR #1 ``mtd_MLP`` (test oracle, restated from spec flair1 section 3.3)."""

    def __init__(self):
        super().__init__()
        layers = []
        for i, o in ((45, 64), (64, 32), (32, 16)):
            layers += [nn.Linear(i, o), nn.Dropout(0.4), nn.ReLU()]
        self.enc_mlp = nn.Sequential(*layers)


class _SmpUnetMeta(nn.Module):
    """FLAIR #1 ``SMP_Unet_meta`` forward (test oracle): MLP output added along the bottleneck height."""

    def __init__(self):
        super().__init__()
        self.seg_model = smp.Unet("resnet34", encoder_weights=None, in_channels=5, classes=13)
        self.enc = _MetadataMLP()

    def forward(self, x, met):
        feats = self.seg_model.encoder(x)
        e = self.enc.enc_mlp(met).unsqueeze(1).unsqueeze(-1).repeat(1, 512, 1, 16)
        feats[-1] = feats[-1] + e
        return self.seg_model.segmentation_head(self.seg_model.decoder(feats))


@pytest.mark.slow
def test_unet_with_metadata_matches_flair1_checkpoint_at_512px(tmp_path):
    """The one 512x512 forward: smp U-Net + FLAIR #1 metadata fusion, loaded from a Lightning .ckpt."""
    torch.manual_seed(2)
    rng = np.random.RandomState(3)
    x = rng.randint(0, 256, (1, 512, 512, 5)).astype(np.uint8)
    meta = rng.rand(1, 45).astype(np.float32)
    ref_model = _randomize_and_calibrate(_SmpUnetMeta(), (_nchw(x), torch.from_numpy(meta)), seed=4)
    state = {f"model.{k}": v.clone() for k, v in ref_model.state_dict().items()}
    # The reference output is computed in float64: at 512 px float32 smp itself
    # is ~9e-5 away from the exact result, so a float32-vs-float32 comparison
    # would measure PyTorch's rounding as much as ours.
    with torch.no_grad():
        ref = ref_model.double()(_nchw(x).double(), torch.from_numpy(meta).double()).permute(0, 2, 3, 1).numpy()
    state["criterion.weight"] = torch.ones(13)
    ckpt = tmp_path / "flair1.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, ckpt)

    model = build_unet(num_classes=13, input_size=512, use_metadata=True)
    W.load_checkpoint(model, str(ckpt))
    out = np.asarray(model({"aerial": x, "metadata": meta}, training=False)["aerial"])
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_imagenet_encoder_through_five_channel_rule(tmp_path):
    """torchvision-style ResNet34 weights (random values, with fc) -> safetensors -> our encoder,
    compared with smp's encoder loaded with the same 3-channel weights and smp's patch_first_conv."""
    from segmentation_models_pytorch.encoders import get_encoder
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    torch.manual_seed(5)
    tv = torchvision.models.resnet34(weights=None)
    x = np.random.RandomState(6).randint(0, 256, (2, 64, 64, 5)).astype(np.uint8)
    tv_state = {k: v.numpy() for k, v in tv.state_dict().items()}  # includes fc.* and num_batches_tracked
    path = tmp_path / "resnet34.safetensors"
    W.write_safetensors(str(path), tv_state)

    ref_encoder = get_encoder("resnet34", in_channels=3, weights=None)
    ref_encoder.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    patch_first_conv(ref_encoder, 5, pretrained=True)
    ref_encoder.eval()
    with torch.no_grad():
        ref = [f.permute(0, 2, 3, 1).numpy() for f in ref_encoder(_nchw(x))]

    encoder = build_resnet34_encoder(in_channels=5, input_size=64)
    assert W.load_encoder_file(encoder, str(path)) == len(W.model_tensors(encoder))
    kernel = encoder.get_layer("encoder.conv1").kernel.numpy()
    np.testing.assert_allclose(kernel[:, :, 3], kernel[:, :, 0])  # NIR <- R
    np.testing.assert_allclose(kernel[:, :, 4], kernel[:, :, 1])  # elevation <- G
    np.testing.assert_allclose(kernel[:, :, 0], tv_state["conv1.weight"][:, 0].transpose(1, 2, 0) * 0.6, rtol=1e-6)
    outs = encoder(x.astype(np.float32) / 255.0, training=False)
    for level, (ours, theirs) in enumerate(zip(outs, ref)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0, err_msg=f"feature level {level}")


def test_encoder_weights_into_unet_leave_decoder_untouched(tmp_path):
    torch.manual_seed(7)
    tv_state = {k: v.numpy() for k, v in torchvision.models.resnet34(weights=None).state_dict().items()}
    path = tmp_path / "resnet34.npz"
    np.savez(path, **tv_state)
    model = build_unet(input_size=64)
    before = model.get_layer("decoder.blocks.0.conv1.0").kernel.numpy().copy()
    W.load_encoder_file(model, str(path))
    np.testing.assert_array_equal(model.get_layer("decoder.blocks.0.conv1.0").kernel.numpy(), before)
    np.testing.assert_allclose(
        model.get_layer("encoder.layer4.2.bn2").moving_variance.numpy(), tv_state["layer4.2.bn2.running_var"]
    )
    del tv_state["layer3.1.conv2.weight"]
    np.savez(path, **tv_state)
    with pytest.raises(W.WeightMappingError, match=r"encoder\.layer3\.1\.conv2\.weight"):
        W.load_encoder_file(model, str(path))
