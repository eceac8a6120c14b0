"""Sentinel-2 preprocessing against a plain numpy re-statement of the reference (spec flair2 §2)."""

import datetime

import numpy as np
import pytest
import tensorflow as tf

from flair_tf.data import sentinel

S = 8  # crop side
C = sentinel.SENTINEL_BANDS


# ----------------------------------------------------------------------------- numpy oracle
# Written from the spec text (flair2 §2 steps 6-9), loops and datetime as in the reference.


def oracle_dates(yyyymmdd):
    ref = datetime.datetime(2021, 5, 15)
    return np.array([(ref - datetime.datetime(2021, (d // 100) % 100, d % 100)).days
                     for d in yyyymmdd], dtype=np.float64)


def oracle_filter(masks_tshw2, area_threshold=0.5, proba_threshold=60):
    masks = np.transpose(masks_tshw2, (0, 3, 1, 2)).astype(int)  # reference layout T,2,H,W
    keep, covers = [], []
    for t in range(masks.shape[0]):
        cover = np.count_nonzero(masks[t, 0] >= proba_threshold) + np.count_nonzero(
            masks[t, 1] >= proba_threshold)
        cover /= masks.shape[2] * masks.shape[3]
        covers.append(cover)
        if cover < area_threshold:
            keep.append(t)
    return keep, np.array(covers)


def oracle_monthly(patch, yyyymmdd):
    months = [(d // 100) % 100 for d in yyyymmdd]
    frames, dates = [], []
    # pd.period_range(first, last, freq='M') for a sorted series inside one year
    for m in range(months[0], months[-1] + 1):
        idx = [i for i, mm in enumerate(months) if mm == m]
        if idx:
            frames.append(np.mean(patch[idx], axis=0))
            dates.append((datetime.datetime(2021, 5, 15) - datetime.datetime(2021, m, 15)).days)
    return np.array(frames), np.array(dates, dtype=np.float64)


def oracle(data, masks, dates, filter_clouds=True, average_month=True, max_dates=6,
           scaling="reference"):
    """Reference steps, then post-padding to the fixed length (zeros, mask True)."""
    patch, raw = data, np.asarray(dates)
    enc = oracle_dates(raw)
    keep, covers = oracle_filter(masks)
    if filter_clouds:
        if not keep:  # documented departure: the reference crashes, we keep the least cloudy
            keep = [int(np.argmin(covers))]
        patch, enc, raw, covers = patch[keep], enc[keep], raw[keep], covers[keep]
    if average_month:
        patch, enc = oracle_monthly(patch, raw)  # float64 -> img_as_float is a no-op
        length = 12
        patch = patch / (10000.0 if scaling == "reflectance" else 1.0)
    else:
        if len(enc) > max_dates:  # documented: least cloudy, in time order
            chosen = np.sort(np.argsort(covers, kind="stable")[:max_dates])
            patch, enc = patch[chosen], enc[chosen]
        length = max_dates
        patch = patch.astype(np.float64) / (10000.0 if scaling == "reflectance" else 65535.0)
    t = len(enc)
    out = np.zeros((length,) + patch.shape[1:], np.float32)
    out[:t] = patch
    out_dates = np.zeros(length, np.float32)
    out_dates[:t] = enc
    pad = np.arange(length) >= t
    return out, out_dates, pad


# ----------------------------------------------------------------------------- helpers


def make_series(dates, cover_fractions, seed=0, snow=None):
    """uint16 data, masks whose cloud channel covers the given fraction of the crop."""
    rng = np.random.default_rng(seed)
    t = len(dates)
    data = rng.integers(0, 20000, size=(t, S, S, C), dtype=np.uint16)
    masks = np.zeros((t, S, S, 2), np.uint8)
    for i, frac in enumerate(cover_fractions):
        n = int(round(frac * S * S))
        flat = masks[i, :, :, 1].reshape(-1)
        flat[rng.permutation(S * S)[:n]] = rng.integers(60, 101, size=n)
        masks[i, :, :, 1] = flat.reshape(S, S)
        # sub-threshold noise never counts
        masks[i, :, :, 0] = rng.integers(0, 60, size=(S, S))
    if snow is not None:
        masks[..., 0] = snow
    return data, masks, np.asarray(dates, np.int32)


def run_both(fn, *args):
    """fn(*args) eagerly and inside tf.data.Dataset.map with a dynamic time axis."""
    eager = [t.numpy() for t in fn(*[tf.constant(a) for a in args])]
    specs = tuple(tf.TensorSpec([None] + list(np.shape(a))[1:], tf.as_dtype(np.asarray(a).dtype))
                  for a in args)
    ds = tf.data.Dataset.from_generator(lambda: iter([tuple(args)]), output_signature=specs)
    graph = [t.numpy() for t in next(iter(ds.map(fn)))]
    for e, g in zip(eager, graph):
        np.testing.assert_array_equal(e, g)
    return eager


def assert_matches_oracle(data, masks, dates, **kw):
    def fn(d, m, t):
        return sentinel.preprocess_sentinel(d, m, t, **kw)
    frames, enc, pad = run_both(fn, data, masks, dates)
    o_frames, o_dates, o_pad = oracle(data, masks, dates, **{
        k: v for k, v in kw.items() if k in ("filter_clouds", "average_month", "max_dates", "scaling")})
    np.testing.assert_array_equal(pad, o_pad)
    np.testing.assert_array_equal(enc, o_dates)
    # float32 of the float64 reference value, to the last bit
    np.testing.assert_array_equal(frames, o_frames.astype(np.float32))
    assert frames.dtype == np.float32 and enc.dtype == np.float32 and pad.dtype == bool
    return frames, enc, pad


# ----------------------------------------------------------------------------- tests

YEAR = [20210105, 20210120, 20210214, 20210303, 20210330, 20210502, 20210611,
        20210612, 20210715, 20210830, 20210921, 20211010, 20211118, 20211225]
COVERS = [0.0, 0.8, 0.3, 0.49, 0.5, 0.1, 0.9, 0.2, 0.0, 1.0, 0.05, 0.7, 0.0, 0.45]


def test_date_encoding_reference_values():
    d = sentinel.encode_dates(tf.constant([20210101, 20190515, 20201231, 20210415, 20220301]))
    np.testing.assert_array_equal(d.numpy(), [134, 0, -230, 30, 135 - 60])
    np.testing.assert_array_equal(d.numpy(), oracle_dates([20210101, 20190515, 20201231,
                                                           20210415, 20220301]))
    # 29 February (a crash in the reference) is encoded as 1 March.
    np.testing.assert_array_equal(sentinel.encode_dates(tf.constant([20200229])).numpy(),
                                  oracle_dates([20210301]))
    np.testing.assert_array_equal(
        sentinel.monthly_date_values().numpy(),
        [120, 89, 61, 30, 0, -31, -61, -92, -123, -153, -184, -214])


def test_bad_dates_are_rejected():
    with pytest.raises(tf.errors.InvalidArgumentError, match="YYYYMMDD"):
        sentinel.encode_dates(tf.constant([2021415]))  # month 14


def test_cloud_filter_thresholds_and_double_counting():
    snow = np.zeros((4, S, S), np.uint8)
    cloud = np.zeros((4, S, S), np.uint8)
    half = S * S // 2
    # 0: 25 % snow + 25 % cloud on disjoint pixels = 0.5 -> dropped (keep iff < 0.5)
    snow[0].reshape(-1)[:half // 2] = 60
    cloud[0].reshape(-1)[half // 2:half] = 60
    # 1: 25 % of pixels flagged by BOTH masks count twice = 0.5 -> dropped
    snow[1].reshape(-1)[:half // 2] = 100
    cloud[1].reshape(-1)[:half // 2] = 100
    # 2: 49 % covered, probability exactly at the threshold counts -> kept
    cloud[2].reshape(-1)[:half - 1] = 60
    # 3: everything at 59 % probability: nothing counts -> kept
    snow[3], cloud[3] = 59, 59
    masks = np.stack([snow, cloud], axis=-1)
    keep, cover = run_both(lambda m: sentinel.filter_dates(m), masks)
    o_keep, o_cover = oracle_filter(masks)
    np.testing.assert_allclose(cover, o_cover, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.flatnonzero(keep), o_keep)
    np.testing.assert_array_equal(keep, [False, False, True, True])


@pytest.mark.parametrize("threshold", [-5, 0, 1, 60, 100, 101, 255, 300])
def test_cloud_cover_any_threshold_equals_numpy(threshold):
    masks = np.random.default_rng(3).integers(0, 256, (4, 6, 6, 2), dtype=np.uint8)
    want = [(np.count_nonzero(m[..., 0] >= threshold) + np.count_nonzero(m[..., 1] >= threshold)) / 36
            for m in masks.astype(int)]
    for dtype in (np.uint8, np.int32):
        got = sentinel.cloud_cover(tf.constant(masks.astype(dtype)), threshold).numpy()
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_monthly_average_matches_reference():
    data, masks, dates = make_series(YEAR, COVERS)
    frames, enc, pad = assert_matches_oracle(data, masks, dates)
    # Jan (2 dates, one cloudy), Feb, Mar (2, one at 0.5 dropped), May, Jun, Jul, Sep, Nov, Dec
    np.testing.assert_array_equal(enc[~pad], [120, 89, 61, 0, -31, -61, -123, -184, -214])
    assert pad.sum() == 3 and not pad[:9].any()
    assert (frames[pad] == 0).all()
    # raw counts reach the network (img_as_float is a no-op on float64 means)
    assert frames.max() > 1000
    # Without the filter every date counts: the cloudy January date changes January's mean.
    unfiltered, enc_all, pad_all = assert_matches_oracle(data, masks, dates, filter_clouds=False)
    assert not (unfiltered[0] == frames[0]).all() and enc_all[0] == enc[0] == 120


def test_series_spanning_fewer_months_is_padded():
    dates = [20210403, 20210409, 20210418, 20210502, 20210520]
    data, masks, dates = make_series(dates, [0.0, 0.1, 0.2, 0.0, 0.3], seed=1)
    frames, enc, pad = assert_matches_oracle(data, masks, dates)
    np.testing.assert_array_equal(pad, [False, False] + [True] * 10)
    np.testing.assert_array_equal(enc, [30, 0] + [0] * 10)
    np.testing.assert_array_equal(frames[0], data[:3].astype(np.float64).mean(0).astype(np.float32))


def test_all_cloudy_series_keeps_least_cloudy_date():
    dates = [20210301, 20210601, 20210701, 20210702]
    data, masks, dates = make_series(dates, [0.9, 0.7, 0.6, 0.6], seed=2)
    frames, enc, pad = assert_matches_oracle(data, masks, dates)
    np.testing.assert_array_equal(pad, [False] + [True] * 11)
    np.testing.assert_array_equal(enc[0], -61)  # July, the earliest of the two 0.6 dates
    np.testing.assert_array_equal(frames[0], data[2].astype(np.float32))
    frames, enc, pad = assert_matches_oracle(data, masks, dates, average_month=False, max_dates=3)
    np.testing.assert_array_equal(pad, [False, True, True])
    np.testing.assert_array_equal(enc[0], oracle_dates([20210701]))


def test_without_monthly_average_scaling_and_truncation():
    data, masks, dates = make_series(YEAR, COVERS, seed=3)
    # 9 dates pass the filter; 6 are kept (least cloudy), in time order
    frames, enc, pad = assert_matches_oracle(data, masks, dates, average_month=False, max_dates=6)
    assert not pad.any()
    assert np.all(np.diff(enc) < 0)  # time order = decreasing offsets
    assert frames.max() <= 1.0  # uint16 / 65535
    # room to spare: all 9 kept dates, then padding
    frames, enc, pad = assert_matches_oracle(data, masks, dates, average_month=False, max_dates=16)
    assert pad.sum() == 7 and (frames[9:] == 0).all() and (enc[9:] == 0).all()
    # no filter: 14 dates, the 6 least cloudy
    assert_matches_oracle(data, masks, dates, average_month=False, max_dates=6, filter_clouds=False)


@pytest.mark.parametrize("average_month", [True, False])
def test_reflectance_scaling(average_month):
    data, masks, dates = make_series(YEAR[:5], COVERS[:5], seed=4)
    frames, _, _ = assert_matches_oracle(data, masks, dates, average_month=average_month,
                                         max_dates=5, scaling="reflectance")
    assert 0.5 < frames.max() <= 2.0


def test_empty_series_is_all_padding():
    data = np.zeros((0, S, S, C), np.uint16)
    masks = np.zeros((0, S, S, 2), np.uint8)
    dates = np.zeros((0,), np.int32)
    for kw in ({}, {"average_month": False, "max_dates": 4}):
        frames, enc, pad = run_both(
            lambda d, m, t: sentinel.preprocess_sentinel(d, m, t, **kw), data, masks, dates)
        assert pad.all() and not frames.any() and not enc.any()


def test_invalid_options():
    data, masks, dates = make_series(YEAR[:2], COVERS[:2])
    with pytest.raises(ValueError, match="scaling"):
        sentinel.preprocess_sentinel(data, masks, dates, scaling="minmax")
    with pytest.raises(ValueError, match="max_dates"):
        sentinel.preprocess_sentinel(data, masks, dates, average_month=False, max_dates=0)
