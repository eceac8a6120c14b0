"""Whole-raster inference: tiling, blending, georeferencing, nodata, TTA."""

import numpy as np
import pytest
import rasterio
from affine import Affine

from flair_tf.inference import raster
from eval_runs import unet13_run  # noqa: F401  (fixtures)

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

NUM_CLASSES = 13
CRS = "EPSG:2154"
TRANSFORM = Affine(0.2, 0.0, 843000.0, 0.0, -0.2, 6520000.0)


def _write_raster(path, image, nodata=None):
    """Writes an (H, W, C) uint8 image as a georeferenced, tiled GeoTIFF."""
    h, w, c = image.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=c, dtype="uint8", crs=CRS,
        transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
    ) as dst:
        dst.write(np.moveaxis(image, -1, 0))
    return str(path)


def _conv_model(kernel, channels=5, layers=1, seed=0):
    """A fully convolutional model whose receptive field is known: `layers` convs of `kernel`."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inp)  # 0 stays 0: boundless zeros == conv zero padding
    for _ in range(layers - 1):
        x = keras.layers.Conv2D(8, kernel, padding="same", activation="tanh")(x)
    x = keras.layers.Conv2D(NUM_CLASSES, kernel, padding="same",
                            kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(x)
    return keras.Model(inp, x)


def _full_probs(model, image, tta=False):
    """The model on the whole image at once (what tiling must reproduce)."""
    x = tf.constant(image[None], tf.float32)
    p = tf.nn.softmax(model(x), -1)
    if tta:
        p = (p + tf.reverse(tf.nn.softmax(model(tf.reverse(x, [2])), -1), [2])
             + tf.reverse(tf.nn.softmax(model(tf.reverse(x, [1])), -1), [1])
             + tf.reverse(tf.nn.softmax(model(tf.reverse(x, [1, 2])), -1), [1, 2])) / 4
    return p.numpy()[0]


def _read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile, src


def _confident(probs, gap=1e-4):
    top2 = np.sort(probs, -1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) > gap


@pytest.mark.parametrize("length", [1, 31, 32, 64, 95, 300, 517])
@pytest.mark.parametrize("tile,margin", [(64, 16), (64, 0), (64, 20), (512, 128)])
def test_tile_centres_cover_the_axis_exactly(length, tile, margin):
    origins = raster.tile_origins(length, tile, margin)
    assert origins[0] == -margin
    assert origins == sorted(set(origins))
    assert origins[-1] + tile >= length + margin
    covered = np.zeros(length + 2 * tile, int)
    for o in origins:
        covered[o + margin + tile: o + tile - margin + tile] += 1  # centre, shifted by +tile
    assert (covered[tile: tile + length] >= 1).all()
    steps = np.diff(origins)
    assert (steps[:-1] == tile - 2 * margin).all() if len(steps) > 1 else True


def test_reference_grid_of_a_4096_raster_has_256_tiles():
    assert len(raster.tile_origins(4096, 512, 128)) == 16


def test_blend_weights_shape_and_values():
    w = raster.blend_weights(64, 16)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert (w[:8] == 0).all() and (w[:, -8:] == 0).all()  # outer half of the margin discarded
    assert (w[16:48, 16:48] == 1).all()
    assert np.all(np.diff(w[32, 8:17]) > 0)  # then a smooth ramp
    c = raster.blend_weights(64, 16, "crop")
    assert c[15, 32] == 0 and c[16, 32] == 1


def test_equals_whole_image_prediction_on_a_size_not_multiple_of_the_tile(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 517, 5), dtype=np.uint8)
    path = _write_raster(tmp_path / "in.tif", image)
    model = _conv_model(3)
    cfg = raster.RasterConfig(tile_size=64, margin=16, batch_size=3, block_size=64)
    out = tmp_path / "argmax.tif"
    summary = raster.predict_raster(raster.make_probability_fn(model), path, str(out), NUM_CLASSES, cfg,
                                    progress=False)
    assert summary["tiles"] == len(raster.tile_origins(300, 64, 16)) * len(raster.tile_origins(517, 64, 16))
    expected = _full_probs(model, image)
    got, profile, _ = _read(out)
    assert got.shape == (1, 300, 517)
    ok = _confident(expected)
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(got[0][ok], expected.argmax(-1)[ok])

    cfg.output_type = "probabilities"
    out = tmp_path / "probs.tif"
    raster.predict_raster(raster.make_probability_fn(model), path, str(out), NUM_CLASSES, cfg, progress=False)
    got, profile, _ = _read(out)
    assert got.shape == (NUM_CLASSES, 300, 517) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - np.rint(np.moveaxis(expected, -1, 0) * 255).astype(int))
    assert diff.max() <= 1


def test_reference_crop_blend_also_matches_away_from_borders(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 130, 5), dtype=np.uint8)
    path = _write_raster(tmp_path / "in.tif", image)
    model = _conv_model(3)
    cfg = raster.RasterConfig(tile_size=64, margin=16, batch_size=4, blend="crop", block_size=64)
    raster.predict_raster(raster.make_probability_fn(model), path, str(tmp_path / "o.tif"), NUM_CLASSES, cfg,
                          progress=False)
    expected = _full_probs(model, image)
    ok = _confident(expected)
    np.testing.assert_array_equal(_read(tmp_path / "o.tif")[0][0][ok], expected.argmax(-1)[ok])


def test_no_seams_on_a_constant_image(tmp_path, monkeypatch):
    image = np.full((200, 230, 5), 120, np.uint8)
    path = _write_raster(tmp_path / "c.tif", image)
    # Receptive field radius 4 (two 5x5 convs): zero padding disturbs 4 px at every tile border.
    model = _conv_model(5, layers=2, seed=3)
    cfg = raster.RasterConfig(tile_size=64, margin=16, batch_size=4, output_type="probabilities", block_size=64)
    raster.predict_raster(raster.make_probability_fn(model), path, str(tmp_path / "p.tif"), NUM_CLASSES, cfg,
                          progress=False)
    probs = _read(tmp_path / "p.tif")[0][:, 4:-4, 4:-4]  # the raster's own edges see zeros outside
    spread = probs.max(axis=(1, 2)).astype(int) - probs.min(axis=(1, 2)).astype(int)
    assert spread.max() <= 1, spread
    # The same run with unweighted averaging (weights 1 up to the tile border) shows the seams.
    monkeypatch.setattr(raster, "blend_weights", lambda t, m, mode: np.ones((t, t), np.float32))
    raster.predict_raster(raster.make_probability_fn(model), path, str(tmp_path / "s.tif"), NUM_CLASSES, cfg,
                          progress=False)
    seams = _read(tmp_path / "s.tif")[0][:, 4:-4, 4:-4]
    assert (seams.max(axis=(1, 2)).astype(int) - seams.min(axis=(1, 2))).max() > 3


def test_keeps_georeferencing_and_writes_a_tiled_lzw_geotiff(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 5), dtype=np.uint8)
    path = _write_raster(tmp_path / "g.tif", image)
    out = tmp_path / "sub" / "g_pred.tif"
    cfg = raster.RasterConfig(tile_size=64, margin=16, block_size=32)
    raster.predict_raster(raster.make_probability_fn(_conv_model(1)), path, str(out), NUM_CLASSES, cfg,
                          progress=False)
    with rasterio.open(out) as dst:
        assert dst.crs.to_epsg() == 2154
        assert dst.transform == TRANSFORM
        assert (dst.width, dst.height, dst.count, dst.dtypes[0]) == (90, 70, 1, "uint8")
        assert dst.profile["tiled"] and dst.block_shapes[0] == (32, 32)
        assert dst.compression.name.lower() == "lzw"
        assert dst.nodata == 255
        assert dst.colormap(1)[0][:3] == (0xDB, 0x0E, 0x9A)  # building


def test_nodata_areas_are_masked_and_do_not_leak(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 250, (150, 200, 5), dtype=np.uint8)
    image[:, :90] = 255  # a wide nodata band: whole tiles are skipped
    image[100:120, 150:170] = 255  # a hole
    path = _write_raster(tmp_path / "nd.tif", image, nodata=255)
    zeroed = image.copy()
    zeroed[(image == 255).all(-1)] = 0
    path0 = _write_raster(tmp_path / "zero.tif", zeroed)
    model = _conv_model(3, layers=2, seed=5)
    cfg = raster.RasterConfig(tile_size=64, margin=16, block_size=64)
    fn = raster.make_probability_fn(model)
    summary = raster.predict_raster(fn, path, str(tmp_path / "a.tif"), NUM_CLASSES, cfg, progress=False)
    raster.predict_raster(fn, path0, str(tmp_path / "b.tif"), NUM_CLASSES, cfg, progress=False)
    assert summary["tiles_skipped"] > 0
    a, b = _read(tmp_path / "a.tif")[0][0], _read(tmp_path / "b.tif")[0][0]
    nodata = (image == 255).all(-1)
    assert (a[nodata] == 255).all()
    assert (a[~nodata] < NUM_CLASSES).all()
    # Valid pixels see nodata as zeros (like outside the raster), never as bright 255 pixels.
    expected = _full_probs(model, zeroed)
    ok = _confident(expected) & ~nodata
    # Hidden layers see tanh(bias) outside the raster but zero padding in the whole-image run.
    edge = np.ones_like(ok)
    edge[2:-2, 2:-2] = False
    ok &= ~edge
    np.testing.assert_array_equal(a[ok], expected.argmax(-1)[ok])
    np.testing.assert_array_equal(a[~nodata], b[~nodata])

    cfg.output_type = "probabilities"
    raster.predict_raster(fn, path, str(tmp_path / "p.tif"), NUM_CLASSES, cfg, progress=False)
    with rasterio.open(tmp_path / "p.tif") as src:
        probs, mask = src.read(), src.read_masks(1)
    assert (probs[:, nodata] == 0).all() and (mask[nodata] == 0).all() and (mask[~nodata] == 255).all()
    assert np.abs(probs[:, ~nodata].astype(int).sum(0) - 255).max() <= NUM_CLASSES


def test_tta_averages_the_four_flips(tmp_path):
    image = np.random.default_rng(6).integers(0, 256, (80, 100, 5), dtype=np.uint8)
    path = _write_raster(tmp_path / "t.tif", image)
    model = _conv_model(3, seed=7)
    cfg = raster.RasterConfig(tile_size=64, margin=16, batch_size=2, tta=True, output_type="probabilities",
                              block_size=64)
    raster.predict_raster(raster.make_probability_fn(model, tta=True), path, str(tmp_path / "t.tif.out"),
                          NUM_CLASSES, cfg, progress=False)
    got = _read(tmp_path / "t.tif.out")[0]
    with_tta = np.rint(np.moveaxis(_full_probs(model, image, tta=True), -1, 0) * 255)
    without = np.rint(np.moveaxis(_full_probs(model, image), -1, 0) * 255)
    assert np.abs(got - with_tta).max() <= 1
    assert np.abs(got - without).max() > 5  # the flips do change a 3x3 model's output


def test_rejects_bad_bands_and_margins(tmp_path):
    path = _write_raster(tmp_path / "x.tif", np.zeros((20, 20, 3), np.uint8))
    fn = raster.make_probability_fn(_conv_model(1, channels=3))
    with pytest.raises(ValueError, match="has 3 band"):
        raster.predict_raster(fn, path, str(tmp_path / "o.tif"), NUM_CLASSES,
                              raster.RasterConfig(tile_size=64, margin=16), progress=False)
    with pytest.raises(ValueError, match="tile_size > 2 \\* margin"):
        raster.RasterConfig(tile_size=64, margin=32).validate()


def test_tiles_are_read_window_by_window(tmp_path, monkeypatch):
    path = _write_raster(tmp_path / "w.tif", np.ones((150, 170, 5), np.uint8))
    reads = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        window = kwargs.get("window")
        reads.append(None if window is None else (window.height, window.width))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    cfg = raster.RasterConfig(tile_size=64, margin=16, block_size=64)
    raster.predict_raster(raster.make_probability_fn(_conv_model(1)), path, str(tmp_path / "o.tif"), NUM_CLASSES,
                          cfg, progress=False)
    assert reads and None not in reads
    assert max(h for h, _ in reads) <= 64 and max(w for _, w in reads) <= 64


def test_predict_cli_raster_mode_with_a_training_run(unet13_run, tmp_path, capsys, monkeypatch):
    from absl import flags
    from absl.testing import flagsaver

    from flair_tf import predict
    from flair_tf.inference import model_io
    from flair_tf.models.winograd import WinogradConv2D

    image = np.random.default_rng(8).integers(0, 256, (100, 150, 5), dtype=np.uint8)
    path = _write_raster(tmp_path / "ortho.tif", image)
    out = tmp_path / "map.tif"
    loads = []  # (winograd argument, Winograd layers of the model loaded)
    real_load_model = model_io.load_model

    def recording_load_model(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        loads.append((kwargs.get("winograd"), sum(isinstance(lay, WinogradConv2D) for lay in loaded.model.layers)))
        return loaded

    monkeypatch.setattr(model_io, "load_model", recording_load_model)
    predict.define_flags()
    argv = ["predict", f"--model_dir={unet13_run}", f"--input={path}", "--tile_size=64", "--margin=16",
            "--batch_size=2"]
    with flagsaver.flagsaver():
        flags.FLAGS(argv + [f"--output={out}"])
        predict.main([])
    # raster mode rebuilds the U-Net size-free: on this CPU-only machine its 27 wide layers run Winograd
    assert loads == [(None, 27)]
    with flagsaver.flagsaver():
        flags.FLAGS(argv + [f"--output={tmp_path / 'direct.tif'}", "--winograd=off", "--nopreview"])
        predict.main([])
    assert loads[-1] == (False, 0)
    with rasterio.open(tmp_path / "direct.tif") as direct, rasterio.open(out) as winograd:
        assert (direct.read(1) == winograd.read(1)).mean() > 0.999
    assert str(out) in capsys.readouterr().out
    with rasterio.open(out) as dst:
        data = dst.read(1)
        assert dst.crs.to_epsg() == 2154 and dst.transform == TRANSFORM
    assert data.shape == (100, 150) and data.max() < NUM_CLASSES
    from PIL import Image

    from flair_tf import nomenclature

    preview = np.asarray(Image.open(tmp_path / "map_preview.png"))
    np.testing.assert_array_equal(preview, nomenclature.colorize(data, NUM_CLASSES))
    with pytest.raises(ValueError, match="--bands selects 3"):
        predict.predict_raster(unet13_run, path, str(out), raster.RasterConfig(bands=(1, 2, 3), tile_size=64,
                                                                               margin=16))
