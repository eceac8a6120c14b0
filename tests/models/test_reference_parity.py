"""U-TAE and U-T&T parity against a PyTorch test oracle.

The reference repositories (VSainteuf/utae-paps, IGNF/FLAIR-2-AI-Challenge)
are not installable packages, so this file holds a COMPACT PyTorch
RE-STATEMENT of the reference modules, written from the specification
(spec flair2 sections 3-4), used only as a test oracle. Its module tree (and
hence its state_dict keys) follows the reference's, so loading its
state_dict into our Keras models also checks the name mapping.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")
nn = torch.nn
F = torch.nn.functional

from flair_tf.models import build_utae, build_utt  # noqa: E402
from flair_tf.models import weights as W  # noqa: E402

# --------------------------------------------------------------------------
# Test oracle (PyTorch re-statement of the reference U-TAE / U-T&T).


class ConvLayer(nn.Module):
    def __init__(self, nkernels, norm="batch", k=3, s=1, p=1, n_groups=4):
        super().__init__()
        layers = []
        for i in range(len(nkernels) - 1):
            layers.append(nn.Conv2d(nkernels[i], nkernels[i + 1], k, stride=s, padding=p, padding_mode="reflect"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(nkernels[i + 1]))
            elif norm == "group":
                layers.append(nn.GroupNorm(n_groups, nkernels[i + 1]))
            layers.append(nn.ReLU())
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class Shared(nn.Module):
    """smart_forward: fold time, convolve only non-padded frames, padded ones -> 0."""

    def smart_forward(self, x, pad_mask):
        b, t = x.shape[:2]
        flat = x.reshape(b * t, *x.shape[2:])
        keep = ~pad_mask.reshape(-1)
        y = self(flat[keep])
        out = torch.zeros((b * t, *y.shape[1:]), dtype=y.dtype)
        out[keep] = y
        return out.view(b, t, *y.shape[1:])


class ConvBlock(Shared):
    def __init__(self, nkernels, norm):
        super().__init__()
        self.conv = ConvLayer(nkernels, norm)

    def forward(self, x):
        return self.conv(x)


class DownConvBlock(Shared):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.down = ConvLayer([d_in, d_in], "group", k=4, s=2, p=1)
        self.conv1 = ConvLayer([d_in, d_out], "group")
        self.conv2 = ConvLayer([d_out, d_out], "group")

    def forward(self, x):
        out = self.conv1(self.down(x))
        return out + self.conv2(out)


class UpConvBlock(nn.Module):
    def __init__(self, d_in, d_out, d_skip):
        super().__init__()
        self.skip_conv = nn.Sequential(nn.Conv2d(d_skip, d_skip, 1), nn.BatchNorm2d(d_skip), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(d_in, d_out, 4, 2, 1), nn.BatchNorm2d(d_out), nn.ReLU())
        self.conv1 = ConvLayer([d_out + d_skip, d_out], "batch")
        self.conv2 = ConvLayer([d_out, d_out], "batch")

    def forward(self, x, skip):
        out = torch.cat([self.up(x), self.skip_conv(skip)], dim=1)
        out = self.conv1(out)
        return out + self.conv2(out)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_head=16, d_k=4, d_in=256):
        super().__init__()
        self.n_head, self.d_k = n_head, d_k
        self.Q = nn.Parameter(torch.randn(n_head, d_k) * np.sqrt(2.0 / d_k))
        self.fc1_k = nn.Linear(d_in, n_head * d_k)

    def forward(self, v, pad_mask):
        n, t, d = v.shape
        k = self.fc1_k(v).view(n, t, self.n_head, self.d_k)
        logits = torch.einsum("nthd,hd->nht", k, self.Q) / np.sqrt(self.d_k)
        logits = logits.masked_fill(pad_mask[:, None, :], -1e3)
        attn = torch.softmax(logits, dim=-1)
        out = torch.einsum("nht,nthc->nhc", attn, v.view(n, t, self.n_head, d // self.n_head))
        return out.reshape(n, d), attn


class LTAE2d(nn.Module):
    def __init__(self, in_channels=128, n_head=16, d_k=4, d_model=256, period=1000.0):
        super().__init__()
        self.n_head = n_head
        self.inconv = nn.Conv1d(in_channels, d_model, 1)
        self.in_norm = nn.GroupNorm(n_head, in_channels)
        self.out_norm = nn.GroupNorm(n_head, in_channels)
        self.attention_heads = MultiHeadAttention(n_head, d_k, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, in_channels), nn.BatchNorm1d(in_channels), nn.ReLU())
        d = d_model // n_head
        self.denom = torch.pow(period, 2 * torch.div(torch.arange(d).float(), 2, rounding_mode="floor") / d)

    def forward(self, x, dates, pad_mask):
        b, t, c, h, w = x.shape
        mask = pad_mask[:, None, None, :].expand(b, h, w, t).reshape(-1, t)
        out = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)
        out = self.in_norm(out.permute(0, 2, 1))
        out = self.inconv(out).permute(0, 2, 1)
        pos = dates[:, None, None, :].expand(b, h, w, t).reshape(-1, t)
        table = pos[:, :, None] / self.denom
        table[:, :, 0::2] = torch.sin(table[:, :, 0::2])
        table[:, :, 1::2] = torch.cos(table[:, :, 1::2])
        out = out + table.repeat(1, 1, self.n_head)
        out, attn = self.attention_heads(out, mask)
        out = self.out_norm(self.mlp(out))
        out = out.view(b, h, w, -1).permute(0, 3, 1, 2)
        attn = attn.view(b, h, w, self.n_head, t).permute(3, 0, 4, 1, 2)  # head x B x T x h x w
        return out, attn


def att_group(x, attn, pad_mask):
    heads, b, t, h, w = attn.shape
    a = attn.reshape(heads * b, t, h, w)
    if x.shape[-1] > w:
        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
    a = a.view(heads, b, t, *x.shape[-2:]) * (~pad_mask).float()[None, :, :, None, None]
    out = torch.stack(x.chunk(heads, dim=2))
    out = (a[:, :, :, None] * out).sum(dim=2)
    return torch.cat(list(out), dim=1)


class UTAE(nn.Module):
    def __init__(self, enc=(64, 64, 128, 128), dec=(64, 64, 128, 128), out_conv=(32, 13)):
        super().__init__()
        self.in_conv = ConvBlock([10, enc[0], enc[0]], "group")
        self.down_blocks = nn.ModuleList(DownConvBlock(enc[i], enc[i + 1]) for i in range(3))
        self.up_blocks = nn.ModuleList(UpConvBlock(dec[i], dec[i - 1], enc[i - 1]) for i in range(3, 0, -1))
        self.temporal_encoder = LTAE2d(enc[-1])
        self.out_conv = ConvBlock([dec[0], *out_conv], "batch")

    def forward(self, x, dates, pad_mask):
        feats = [self.in_conv.smart_forward(x, pad_mask)]
        for block in self.down_blocks:
            feats.append(block.smart_forward(feats[-1], pad_mask))
        out, att = self.temporal_encoder(feats[-1], dates, pad_mask)
        maps = [out]
        for i, block in enumerate(self.up_blocks):
            out = block(out, att_group(feats[-(i + 2)], att, pad_mask))
            maps.append(out)
        return self.out_conv(out), maps


def mlp3(widths, dropout, final_relu=False):
    layers = []
    for j in range(3):
        layers.append(nn.Linear(widths[j], widths[j + 1]))
        if j < 2 or final_relu:
            layers += [nn.Dropout(dropout), nn.ReLU()]
    return nn.Sequential(*layers)


class MtdMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_mlp = mlp3([45, 64, 32, 16], 0.5)


class FMCropped(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv_list = nn.ModuleList(nn.Conv2d(64, c, 1) for c in channels)


class FMCollapsed(nn.Module):
    def __init__(self, channels):
        super().__init__()
        widths = []
        for c in channels:
            m = abs(64 - c) // 3
            widths.append([64, 64 + m, 64 + 2 * m, c] if c > 64 else [64, 64 - m, 64 - 2 * m, c] if c < 64 else [64, 128, 128, c])
        self.mlps = nn.ModuleList(mlp3(w, 0.3) for w in widths)


class TimeTexture(nn.Module):
    def __init__(self, size, metadata=False):
        super().__init__()
        self.arch_vhr = smp.Unet("resnet34", encoder_weights=None, in_channels=5, classes=13)
        self.arch_hr = UTAE()
        channels = list(self.arch_vhr.encoder.out_channels)
        self.fm_utae_featmap_cropped = FMCropped(channels)
        self.fm_utae_featmap_collapsed = FMCollapsed(channels)
        if metadata:
            self.mtd_mlp = MtdMLP()
        self.reshape_utae_output = nn.Sequential(nn.Upsample(size=(size, size), mode="nearest"), nn.Conv2d(64, 13, 1))

    def forward(self, patch, spatch, dates, pad_mask, metadata=None):
        _, maps = self.arch_hr(spatch, dates, pad_mask)
        feats = self.arch_vhr.encoder(patch)
        if metadata is not None:
            e = self.mtd_mlp.enc_mlp(metadata)
            h = feats[-1].shape[-2]
            feats[-1] = feats[-1] + e[:, None, [i % 16 for i in range(h)], None]
        top = int(round((maps[-1].shape[-1] - 10) / 2.0))
        crop = maps[-1][..., top : top + 10, top : top + 10]
        sizes = [f.shape[-1] for f in feats]
        cropped = [F.interpolate(conv(crop), size=s, mode="bilinear") for conv, s in zip(self.fm_utae_featmap_cropped.conv_list, sizes)]
        v = torch.mean(maps[-1][0], dim=(-2, -1))
        collapsed = [mlp(v).view(-1, 1, 1).repeat(1, s, s)[None] for mlp, s in zip(self.fm_utae_featmap_collapsed.mlps, sizes)]
        feats = [f + c + d for f, c, d in zip(feats, cropped, collapsed)]
        unet_out = self.arch_vhr.segmentation_head(self.arch_vhr.decoder(feats))
        return self.reshape_utae_output(crop), unet_out


# --------------------------------------------------------------------------


def _randomize(module, seed):
    """Random weights everywhere, incl. BN statistics, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return module.eval()


def _calibrate(module, *inputs):
    """Sets BN running statistics to those of ``inputs`` (as training would), so that
    eval-mode activations stay O(1) like in a trained network instead of growing
    through the randomly initialised ResNet."""
    bns = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in bns:
        m.momentum = 1.0
    module.train()
    with torch.no_grad():
        module(*inputs)
    for m in bns:
        m.momentum = 0.1
        # Near-constant channels would amplify float32 rounding noise (both frameworks') past 1e-4.
        m.running_var.clamp_(min=0.1)
    return module.eval()


def _series(b, t, s, seed, pad=None):
    rng = np.random.RandomState(seed)
    x = (rng.rand(b, t, s, s, 10) * 2.0).astype(np.float32)  # reference feeds raw values; keep them moderate
    dates = np.sort(rng.randint(-130, 200, (b, t)), axis=1).astype(np.float32)
    mask = np.zeros((b, t), bool)
    if pad:
        mask[:, t - pad :] = True
        x[mask] = 0.0
        dates[mask] = 0.0
    return x, dates, mask


def _state_dict(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def test_utae_matches_oracle_and_padding_is_ignored_with_masked_in_norm():
    oracle = _randomize(UTAE(), seed=1)
    x, dates, mask = _series(2, 4, 40, seed=2)
    with torch.no_grad():
        ref, _ = oracle(torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.from_numpy(dates), torch.from_numpy(mask))
    ref = ref.permute(0, 2, 3, 1).numpy()

    model = build_utae(masked_in_norm=True)
    W.load_state_dict(model, _state_dict(oracle), source="oracle")
    out = model({"sentinel": x, "sentinel_dates": dates, "sentinel_pad_mask": mask}, training=False)["sentinel"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1  # not a trivially zero output

    # Fixed-length padding (TPU): two masked steps appended leave the output unchanged.
    xp = np.concatenate([x, np.zeros((2, 2, 40, 40, 10), np.float32)], axis=1)
    dp = np.concatenate([dates, np.zeros((2, 2), np.float32)], axis=1)
    mp = np.concatenate([mask, np.ones((2, 2), bool)], axis=1)
    padded = model({"sentinel": xp, "sentinel_dates": dp, "sentinel_pad_mask": mp}, training=False)["sentinel"]
    np.testing.assert_allclose(np.asarray(padded), np.asarray(out), atol=1e-5, rtol=0)


def test_utae_reference_in_norm_includes_padded_steps():
    oracle = _randomize(UTAE(), seed=3)
    x, dates, mask = _series(2, 5, 40, seed=4, pad=2)
    with torch.no_grad():
        ref, _ = oracle(torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.from_numpy(dates), torch.from_numpy(mask))
    ref = ref.permute(0, 2, 3, 1).numpy()
    model = build_utae()  # masked_in_norm=False: the reference's statistics
    W.load_state_dict(model, _state_dict(oracle), source="oracle")
    inputs = {"sentinel": x, "sentinel_dates": dates, "sentinel_pad_mask": mask}
    out = np.asarray(model(inputs, training=False)["sentinel"])
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    noise = np.abs(out - ref).max()
    # ... and therefore differs from the padding-independent variant by far more than float noise.
    masked = build_utae(masked_in_norm=True)
    masked.set_weights(model.get_weights())
    assert np.abs(np.asarray(masked(inputs, training=False)["sentinel"]) - out).max() > 20 * max(noise, 1e-6)


@pytest.mark.parametrize("use_metadata", [False, True])
def test_utt_matches_oracle(use_metadata):
    size = 64
    oracle = _randomize(TimeTexture(size, metadata=use_metadata), seed=5)
    x, dates, mask = _series(2, 3, 40, seed=6)
    rng = np.random.RandomState(7)
    aerial = rng.randint(0, 256, (2, size, size, 5)).astype(np.uint8)
    meta = rng.rand(2, 45).astype(np.float32)
    torch_inputs = (
        torch.from_numpy(aerial).permute(0, 3, 1, 2).float() / 255.0,
        torch.from_numpy(x).permute(0, 1, 4, 2, 3),
        torch.from_numpy(dates),
        torch.from_numpy(mask),
        torch.from_numpy(meta) if use_metadata else None,
    )
    _calibrate(oracle, *torch_inputs)
    with torch.no_grad():
        ref_aux, ref = oracle(*torch_inputs)
    model = build_utt(input_size=size, use_metadata=use_metadata)
    W.load_state_dict(model, _state_dict(oracle), source="oracle")
    inputs = {"aerial": aerial, "sentinel": x, "sentinel_dates": dates, "sentinel_pad_mask": mask}
    if use_metadata:
        inputs["metadata"] = meta
    out = model(inputs, training=False)
    np.testing.assert_allclose(np.asarray(out["aerial"]), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out["sentinel"]), ref_aux.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
