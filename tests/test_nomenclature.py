"""Tests of the FLAIR nomenclature: remap tables, names, colours, class weights."""

import numpy as np
import pytest

from flair_tf import nomenclature


def test_remap_13_merges_codes_13_to_19_into_other():
    codes = np.arange(1, 20, dtype=np.uint8)
    expected = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12, 12, 12, 12, 12])
    np.testing.assert_array_equal(nomenclature.remap(codes, 13), expected)
    # The reference formula: a[a > 13] = 13; a - 1.
    ref = codes.copy()
    ref[ref > 13] = 13
    np.testing.assert_array_equal(nomenclature.remap(codes, 13), ref - 1)


def test_remap_19_is_code_minus_one():
    codes = np.arange(1, 20, dtype=np.uint8).reshape(1, 19)
    np.testing.assert_array_equal(nomenclature.remap(codes, 19), np.arange(19).reshape(1, 19))
    assert nomenclature.remap(codes, 19).dtype == np.uint8


@pytest.mark.parametrize("bad", [0, 20, 25, 255])
def test_remap_rejects_invalid_codes(bad):
    codes = np.array([[1, 2], [bad, 5]], dtype=np.uint8)
    with pytest.raises(ValueError, match=str(bad)):
        nomenclature.remap(codes, 13)


def test_lut_maps_invalid_codes_to_255():
    for n in (13, 19):
        lut = nomenclature.code_to_index_lut(n)
        assert lut.shape == (256,)
        assert lut[0] == 255 and (lut[20:] == 255).all()
        assert lut[1:20].max() == n - 1


def test_unsupported_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        nomenclature.remap(np.array([1]), 12)


def test_names_and_palette():
    names13 = nomenclature.class_names(13)
    assert len(names13) == 13 and names13[0] == "building" and names13[12] == "other"
    assert nomenclature.class_names(19)[12] == "swimming pool"
    pal = nomenclature.palette(13)
    assert pal.shape == (13, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal[0], [0xDB, 0x0E, 0x9A])  # building #db0e9a
    np.testing.assert_array_equal(pal[12], [0, 0, 0])
    np.testing.assert_array_equal(nomenclature.palette(19)[13], [255, 255, 255])  # snow
    rgb = nomenclature.colorize(np.array([[0, 4]]), 13)
    np.testing.assert_array_equal(rgb[0, 1], [0x15, 0x53, 0xAE])  # water #1553ae


def test_frequencies_sum_to_about_100():
    assert sum(nomenclature.TRAIN_FREQUENCY_PERCENT.values()) == pytest.approx(100.0, abs=0.1)


def test_class_weights():
    assert nomenclature.class_weights("flair1", 13) == (1.0,) * 12 + (0.0,)
    w19 = nomenclature.class_weights("flair1", 19)
    assert [i + 1 for i, w in enumerate(w19) if w == 0] == [15, 16, 17, 19]
    assert nomenclature.class_weights("flair2", 13, "sentinel")[11:] == (0.0, 0.0)
    with pytest.raises(ValueError):
        nomenclature.class_weights("flair3", 13)
