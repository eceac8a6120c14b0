"""Tests of the 45-value metadata encoding (spec flair1 §2.4)."""

import math

import numpy as np
import pytest

from flair_tf.data import metadata

IMG_000717 = {
    "domain": "D004_2021", "zone": "Z8_NF", "patch_centroid_x": 924009.6,
    "patch_centroid_y": 6339451.2, "patch_centroid_z": 1661.9399414062,
    "date": "2021-05-28", "time": "08h06", "camera": "UCE-M3-f120-s07",
}
# The spec's worked example, rounded to 1e-6.
EXPECTED_717 = [
    0.00924, 0.999957, 0.000924, 1.0, 9.2e-05, 1.0, 9e-06, 1.0, 1e-06, 1.0, 0, 1, 0, 1, 0, 1,
    0.063352, 0.997991, 0.006339, 0.99998, 0.000634, 1.0, 6.3e-05, 1.0, 6e-06, 1.0, 1e-06, 1.0,
    0, 1, 0, 1,
    0.525114, 1, 0, 0, 0, 0, 1, 0.25, 0.933013, 0.214366, 0.910382, 0.92632, 0.238751,
]


def test_worked_example_img_000717():
    vec = metadata.encode_metadata(IMG_000717)
    assert vec.shape == (45,)
    # Values are rounded to 6 decimals in the spec: half a unit of the last place.
    np.testing.assert_allclose(vec, EXPECTED_717, rtol=0, atol=5.01e-7)


def test_month_quirk_is_constant_and_the_fix_is_not():
    months = {}
    for month in range(4, 11):
        meta = dict(IMG_000717, date=f"2021-{month:02d}-28")
        quirk = metadata.encode_metadata(meta)
        fixed = metadata.encode_metadata(meta, fix_month_quirk=True)
        np.testing.assert_allclose(quirk[39:41], [0.25, 0.933013], atol=1e-6)
        # Only the two month values change.
        np.testing.assert_array_equal(np.delete(quirk, [39, 40]), np.delete(fixed, [39, 40]))
        angle = 2 * math.pi * (month - 1) / 12
        np.testing.assert_allclose(fixed[39:41], [(math.sin(angle) + 1) / 2,
                                                  (math.cos(angle) + 1) / 2], atol=1e-12)
        months[month] = tuple(np.round(fixed[39:41], 9))
    assert len(set(months.values())) == len(months)


def test_camera_and_year_encoding():
    vec = metadata.encode_metadata(dict(IMG_000717, camera="CAMERA#017", date="2018-07-01"))
    np.testing.assert_array_equal(vec[33:35], [0, 1])
    np.testing.assert_array_equal(vec[35:39], [1, 0, 0, 0])


def test_negative_altitude_is_clipped_to_zero():
    assert metadata.encode_metadata(dict(IMG_000717, patch_centroid_z=-1.7))[32] == 0.0


def test_errors():
    with pytest.raises(KeyError, match="camera"):
        metadata.encode_metadata({k: v for k, v in IMG_000717.items() if k != "camera"})
    with pytest.raises(ValueError, match="2017"):
        metadata.encode_metadata(dict(IMG_000717, date="2017-05-28"))
    with pytest.raises(ValueError, match="HHhMM"):
        metadata.encode_metadata(dict(IMG_000717, time="08:06"))
