"""U-TAE builder and the PyTorch-exact resampling helpers."""

from __future__ import annotations

import numpy as np
import pytest

from flair_tf.models import build_utae
from flair_tf.models.layers import center_crop_offset, torch_resize


def test_parameter_count_and_names():
    model = build_utae(sentinel_size=40)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 2_284_199
    names = {layer.name for layer in model.layers}
    assert {"in_conv.conv.conv.0", "down_blocks.2.conv2.conv.1", "temporal_encoder.attention_heads",
            "up_blocks.0.skip_conv.0", "out_conv.conv.conv.4"} <= names
    assert model.get_layer("in_conv.conv.conv.1").epsilon == 1e-5
    assert model.get_layer("in_conv.conv.conv.1").groups == 4
    assert model.get_layer("temporal_encoder.out_norm").groups == 16


@pytest.mark.parametrize("masked_in_norm", [False, True])
def test_padded_frames_content_is_ignored(masked_in_norm):
    """Padded steps: conv outputs forced to 0, attention masked -> their data and dates do not matter."""
    model = build_utae(sentinel_size=16, masked_in_norm=masked_in_norm)
    rng = np.random.RandomState(0)
    x = rng.rand(2, 4, 16, 16, 10).astype(np.float32)
    dates = rng.randint(-100, 200, (2, 4)).astype(np.float32)
    mask = np.array([[False, False, True, True], [False, False, False, True]])
    base = model({"sentinel": x * ~mask[..., None, None, None], "sentinel_dates": dates * ~mask,
                  "sentinel_pad_mask": mask}, training=False)["sentinel"]
    noisy = model({"sentinel": x, "sentinel_dates": dates, "sentinel_pad_mask": mask}, training=False)["sentinel"]
    assert base.shape == (2, 16, 16, 13) and base.dtype == "float32"
    np.testing.assert_allclose(noisy.numpy(), base.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_utae(sentinel_size=20)


def test_torch_resize_matches_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).rand(2, 10, 7, 3).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for size, mode in (((64, 64), "nearest"), ((16, 13), "nearest"), ((40, 40), "bilinear"), ((16, 21), "bilinear"),
                       ((4, 3), "bilinear"), ((512, 512), "nearest")):
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        ref = torch.nn.functional.interpolate(t, size=size, mode=mode, **kwargs).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(torch_resize(x, size, mode)), ref, atol=1e-6, err_msg=f"{mode} {size}")


def test_center_crop_offset_is_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    torch = pytest.importorskip("torch")
    for size in (40, 39, 11, 10):
        img = torch.arange(size * size, dtype=torch.float32).view(1, size, size)
        top = center_crop_offset(size, 10)
        np.testing.assert_array_equal(tvf.center_crop(img, [10, 10])[0].numpy(),
                                      img[0, top:top + 10, top:top + 10].numpy())
    with pytest.raises(ValueError, match="Cannot centre-crop"):
        center_crop_offset(8, 10)
