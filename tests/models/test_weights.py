"""Checkpoint import/export: names, layouts, strictness, file formats, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flair_tf.models import build_unet, build_utt
from flair_tf.models import weights as W

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    for v in model.weights:
        if "seed_generator" not in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return model


def test_utt_round_trip_and_flair2_checkpoint_prefixes():
    model = _randomize(build_utt(input_size=64, use_metadata=True), seed=1)
    state = W.export_state_dict(model)
    # The reference's state_dict names and layouts (spec flair2 section 7).
    expected_shapes = {
        "arch_vhr.encoder.conv1.weight": (64, 5, 7, 7),
        "arch_vhr.encoder.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "arch_vhr.decoder.blocks.0.conv1.1.running_var": (256,),
        "arch_vhr.segmentation_head.0.weight": (13, 16, 3, 3),
        "arch_hr.in_conv.conv.conv.0.weight": (64, 10, 3, 3),
        "arch_hr.down_blocks.2.down.conv.1.weight": (128,),
        "arch_hr.temporal_encoder.inconv.weight": (256, 128, 1),
        "arch_hr.temporal_encoder.attention_heads.Q": (16, 4),
        "arch_hr.temporal_encoder.attention_heads.fc1_k.weight": (64, 256),
        "arch_hr.temporal_encoder.mlp.1.running_mean": (128,),
        "arch_hr.up_blocks.1.up.0.weight": (128, 64, 4, 4),  # ConvTranspose2d: (in, out, kh, kw)
        "arch_hr.out_conv.conv.conv.4.weight": (13,),
        "fm_utae_featmap_cropped.conv_list.5.weight": (512, 64, 1, 1),
        "fm_utae_featmap_collapsed.mlps.5.3.weight": (362, 213),
        "fm_utae_featmap_collapsed.mlps.0.6.bias": (5,),
        "reshape_utae_output.1.weight": (13, 64, 1, 1),
        "mtd_mlp.enc_mlp.6.weight": (16, 32),
    }
    for key, shape in expected_shapes.items():
        assert state[key].shape == shape, key
    n_params = sum(v.size for k, v in state.items() if "running_" not in k)
    assert n_params == 27_260_296

    # A Lightning checkpoint: "model." prefix, CE weight buffers to ignore.
    ckpt = {f"model.{k}": v for k, v in state.items()}
    ckpt.update({"criterion.0.weight": np.ones(13, np.float32), "criterion.1.weight": np.ones(13, np.float32)})
    fresh = build_utt(input_size=64, use_metadata=True)
    W.load_state_dict(fresh, ckpt)
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_unet_export_matches_smp_state_dict_names_and_shapes():
    torch = pytest.importorskip("torch")
    smp = pytest.importorskip("segmentation_models_pytorch")
    del torch
    ref = smp.Unet("resnet34", encoder_weights=None, in_channels=5, classes=19).state_dict()
    ours = W.export_state_dict(build_unet(num_classes=19, input_size=64), num_batches_tracked=True)
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert tuple(ours[k].shape) == tuple(v.shape), k


def test_strict_loading_lists_every_problem():
    model = build_unet(input_size=64, use_metadata=True)
    state = W.export_state_dict(model)
    assert "enc.enc_mlp.3.weight" in state  # FLAIR #1 SMP_Unet_meta naming
    del state["decoder.blocks.3.conv2.1.running_mean"]
    state["decoder.blocks.9.conv1.0.weight"] = np.zeros((1,), np.float32)
    state["segmentation_head.0.weight"] = np.zeros((19, 16, 3, 3), np.float32)
    with pytest.raises(W.WeightMappingError) as err:
        W.load_state_dict(model, state, source="broken.safetensors")
    message = str(err.value)
    for needle in (
        "broken.safetensors",
        "decoder.blocks.3.conv2.1.running_mean",
        "decoder.blocks.9.conv1.0.weight",
        "segmentation_head.0.weight: checkpoint (3, 3, 16, 19)",
    ):
        assert needle in message
    # The model was not modified by the failed load.
    assert not np.any(model.get_layer("segmentation_head.0").kernel.numpy() == 0)


def test_safetensors_reader_writer(tmp_path):
    tensors = {
        "a.weight": np.random.RandomState(0).randn(3, 4, 2).astype(np.float32),
        "b.half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "c.count": np.array(7, np.int64),
    }
    path = str(tmp_path / "t.safetensors")
    W.write_safetensors(path, tensors, metadata={"format": "pt"})
    back = W.read_safetensors(path)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    st = pytest.importorskip("safetensors.numpy")
    for k, v in st.load_file(path).items():  # the official reader agrees
        np.testing.assert_array_equal(v, tensors[k])
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    bf16 = torch.tensor([[1.5, -2.25], [3.0, 1e-3]], dtype=torch.bfloat16)
    save_file({"w": bf16}, str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(W.read_safetensors(str(tmp_path / "bf16.safetensors"))["w"], bf16.float().numpy())


def test_patch_first_conv_rule():
    w = np.random.RandomState(0).randn(64, 3, 7, 7).astype(np.float32)
    five = W.patch_first_conv(w, 5)
    np.testing.assert_allclose(five, np.stack([w[:, 0], w[:, 1], w[:, 2], w[:, 0], w[:, 1]], 1) * 0.6, rtol=1e-6)
    np.testing.assert_allclose(W.patch_first_conv(w, 4)[:, 3], w[:, 0] * 0.75, rtol=1e-6)
    np.testing.assert_allclose(W.patch_first_conv(w, 1)[:, 0], w.sum(1), rtol=1e-6)
    assert W.patch_first_conv(w, 3) is w


def test_canonical_key():
    assert W.canonical_key("model.seg_model.encoder.conv1.weight") == "encoder.conv1.weight"
    assert W.canonical_key("model.enc.enc_mlp.0.bias") == "enc.enc_mlp.0.bias"
    assert W.canonical_key("model.arch_hr.in_conv.conv.conv.0.weight") == "arch_hr.in_conv.conv.conv.0.weight"
    assert W.canonical_key("criterion.weight") is None
    assert W.canonical_key("encoder.bn1.num_batches_tracked") is None


def test_convert_weights_cli_from_pth(tmp_path):
    torch = pytest.importorskip("torch")
    source = _randomize(build_unet(input_size=64), seed=3)
    state = {k: torch.from_numpy(v) for k, v in W.export_state_dict(source, num_batches_tracked=True).items()}
    torch.save(state, tmp_path / "unet.pth")
    dst = tmp_path / "unet.weights.h5"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_weights.py"), "--arch=unet",
         f"--src={tmp_path / 'unet.pth'}", f"--dst={dst}"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tensors"] == len(W.model_tensors(source))
    loaded = build_unet(input_size=32)  # weights do not depend on the input size
    loaded.load_weights(str(dst))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
