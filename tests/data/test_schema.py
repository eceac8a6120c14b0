"""schema.encode / schema.decode round-trip every field exactly, eagerly and in tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from flair_tf.data import metadata as metadata_lib
from flair_tf.data import schema

P, S = 16, 8
META = {
    "domain": "D004_2021", "zone": "Z8_NF", "patch_centroid_x": 924009.6,
    "patch_centroid_y": 6339451.2, "patch_centroid_z": 1661.9399414062,
    "date": "2021-05-28", "time": "08h06", "camera": "UCE-M3-f120-s07",
}
CONTRACT_KEYS = {
    "aerial", "elevation", "label", "has_label", "metadata", "metadata_month", "patch_id",
    "domain", "zone", "crs_wkt", "transform",
}
SENTINEL_KEYS = {"sentinel_data", "sentinel_masks", "sentinel_dates", "sentinel_length"}


def _example(rng, t=None, labelled=True, month=5):
    meta = dict(META, date=f"2020-{month:02d}-28")
    ex = {
        "aerial": rng.integers(0, 256, (P, P, 4), dtype=np.uint8),
        "elevation": rng.integers(0, 256, (P, P, 1), dtype=np.uint8),
        "label": rng.integers(1, 20, (P, P), dtype=np.uint8) if labelled else None,
        "metadata": meta,
        "patch_id": f"{rng.integers(0, 999999):06d}",
        "domain": "D004_2021",
        "zone": "Z8_NF",
        "crs_wkt": 'PROJCS["RGF93 v1 / Lambert-93"]',
        "transform": (0.2, 0.0, 924000.123456789, 0.0, -0.2, 6339460.987654321),
    }
    if t is not None:
        # Values above 32767 catch a signed/unsigned or endianness slip.
        ex["sentinel_data"] = rng.integers(0, 65536, (t, S, S, 10), dtype=np.uint16)
        ex["sentinel_masks"] = rng.integers(0, 101, (t, S, S, 2), dtype=np.uint8)
        ex["sentinel_dates"] = np.array([20210101 + 100 * (i % 12) for i in range(t)])
    return ex


def _check(decoded, ex, spec):
    got = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in decoded.items()}
    expected = CONTRACT_KEYS | (SENTINEL_KEYS if spec.task == "flair2" else set())
    assert set(got) == expected
    np.testing.assert_array_equal(got["aerial"], ex["aerial"])
    assert got["aerial"].dtype == np.uint8
    np.testing.assert_array_equal(got["elevation"], ex["elevation"])
    if ex["label"] is None:
        assert not got["has_label"]
        np.testing.assert_array_equal(got["label"], np.zeros((P, P), np.uint8))
    else:
        assert got["has_label"]
        np.testing.assert_array_equal(got["label"], ex["label"])
    np.testing.assert_array_equal(got["metadata"], metadata_lib.encode_metadata(ex["metadata"]).astype(np.float32))
    assert got["metadata"].dtype == np.float32
    assert got["metadata_month"] == int(ex["metadata"]["date"][5:7])
    for k in ("patch_id", "domain", "zone", "crs_wkt"):
        assert got[k].decode() == ex[k]
    np.testing.assert_array_equal(got["transform"], np.asarray(ex["transform"], np.float64))
    assert got["transform"].dtype == np.float64
    if spec.task == "flair2":
        t = ex["sentinel_data"].shape[0]
        assert got["sentinel_length"] == t and got["sentinel_length"].dtype == np.int32
        np.testing.assert_array_equal(got["sentinel_data"], ex["sentinel_data"])
        assert got["sentinel_data"].dtype == np.uint16
        np.testing.assert_array_equal(got["sentinel_masks"], ex["sentinel_masks"])
        np.testing.assert_array_equal(got["sentinel_dates"], ex["sentinel_dates"])
        assert got["sentinel_dates"].dtype == np.int32


def _records(examples, layout):
    """Records of `examples` in a byte layout: ours (aligned64) or protobuf's own serializer."""
    if layout == "aligned64":
        return [bytes(schema.serialize(ex)) for ex in examples]
    return [schema.encode(ex).SerializeToString() for ex in examples]


@pytest.mark.parametrize("layout", schema.BYTE_LAYOUTS)
@pytest.mark.parametrize("task", ["flair1", "flair2"])
def test_round_trip_eager_and_in_tf_data(task, layout):
    rng = np.random.default_rng(0)
    spec = schema.RecordSpec(task, P, S if task == "flair2" else None, byte_layout=layout)
    ts = [3, 7, 1] if task == "flair2" else [None, None, None]
    examples = [_example(rng, t, labelled=i != 1, month=4 + i) for i, t in enumerate(ts)]
    serialized = _records(examples, layout)
    for ex, s in zip(examples, serialized):
        _check(schema.decode(tf.constant(s), spec), ex, spec)
    # Graph mode, as the input pipeline uses it; T varies between elements.
    ds = tf.data.Dataset.from_tensor_slices(serialized).map(lambda s: schema.decode(s, spec))
    for ex, dec in zip(examples, ds):
        _check(dec, ex, spec)
    if task == "flair2":
        assert ds.element_spec["sentinel_data"].shape.as_list() == [None, S, S, 10]
        assert ds.element_spec["aerial"].shape.as_list() == [P, P, 4]


@pytest.mark.parametrize("task", ["flair1", "flair2"])
def test_aligned_records_decode_alike_with_either_layout_and_at_odd_sizes(task):
    # The aligned slices and the protobuf parse give the same arrays, including at patch
    # sizes whose arrays do not end on a 64-byte boundary (those slices copy).
    rng = np.random.default_rng(5)
    for p in (P, 20, 3):
        for labelled in (True, False):
            ex = _example(rng, 5 if task == "flair2" else None, labelled=labelled)
            ex["aerial"] = rng.integers(0, 256, (p, p, 4), dtype=np.uint8)
            ex["elevation"] = rng.integers(0, 256, (p, p, 1), dtype=np.uint8)
            ex["label"] = rng.integers(1, 20, (p, p), dtype=np.uint8) if labelled else None
            record = tf.constant(bytes(schema.serialize(ex)))
            sizes = (p, S if task == "flair2" else None)
            fast = schema.decode(record, schema.RecordSpec(task, *sizes, byte_layout="aligned64"))
            parsed = schema.decode(record, schema.RecordSpec(task, *sizes))
            assert set(fast) == set(parsed)
            for key in parsed:
                np.testing.assert_array_equal(fast[key].numpy(), parsed[key].numpy(), err_msg=key)


def _record_in_order(example, order):
    """`example`'s record with its feature map entries written in `order` (then the rest sorted)."""
    features = schema.encode(example).features.feature
    order = list(order) + sorted(set(features) - set(order))
    body = b"".join(tf.train.Features(feature={k: features[k]}).SerializeToString() for k in order)
    return b"\x0a" + schema._varint(len(body)) + body  # Example.features


# The map entries of an "aligned64" record, in the order `serialize` writes them.
_ALIGNED_ORDER = ["_pad0", "aerial", "_pad1", "elevation", "_pad2", "label",
                  "_pad3", "sentinel/data", "_pad4", "sentinel/masks"]
_SLOT_KEYS = ["aerial", "elevation", "label", "sentinel_data", "sentinel_masks"]


@pytest.mark.parametrize("kept", range(6))
def test_aligned_decoding_of_a_record_in_another_layout_fails_clearly(kept):
    # A record re-serialized in another feature order fails wherever a slot lost its place,
    # even when its first `kept` slots (and the padding before them) kept theirs: protobuf's
    # own serializer writes the map in an order that varies from process to process.
    ex = _example(np.random.default_rng(6), t=3)
    record = tf.constant(_record_in_order(ex, _ALIGNED_ORDER[:2 * kept]))
    assert (record.numpy() == bytes(schema.serialize(ex))) == (kept == 5)
    spec = schema.RecordSpec("flair2", P, S, byte_layout="aligned64")
    _check(schema.decode(record, schema.RecordSpec("flair2", P, S)), ex, spec)  # a valid record
    for i, key in enumerate(_SLOT_KEYS):
        if i < kept:
            got = schema.decode(record, spec, keys=[key])[key].numpy()
            np.testing.assert_array_equal(got, ex[key], err_msg=key)
        else:
            with pytest.raises(tf.errors.InvalidArgumentError, match="aligned64 byte layout"):
                schema.decode(record, spec, keys=[key])
    if kept < 5:
        with pytest.raises(tf.errors.InvalidArgumentError, match="aligned64 byte layout"):
            schema.decode(record, spec)
        ds = tf.data.Dataset.from_tensors(record).map(lambda r: schema.decode(r, spec, keys=["label"]))
        if kept < 3:
            with pytest.raises(tf.errors.InvalidArgumentError, match="aligned64 byte layout"):
                next(iter(ds))


@pytest.mark.parametrize("layout", schema.BYTE_LAYOUTS)
@pytest.mark.parametrize("task", ["flair1", "flair2"])
def test_decoding_some_keys_gives_the_same_values(task, layout):
    rng = np.random.default_rng(2)
    spec = schema.RecordSpec(task, P, S if task == "flair2" else None, byte_layout=layout)
    record = tf.constant(_records([_example(rng, 4 if task == "flair2" else None)], layout)[0])
    full = schema.decode(record, spec, with_raw_metadata=True)
    assert sorted(full) == sorted(schema.decoded_keys(spec, with_raw_metadata=True))
    subsets = [["label", "aerial"], ["elevation"], ["metadata_month"], ["transform", "metadata_centroid"]]
    if task == "flair2":
        subsets += [["sentinel_dates"], ["sentinel_masks", "elevation"], ["sentinel_length"],
                    ["sentinel_data"], ["label", "sentinel_masks", "patch_id"]]
    for keys in subsets:
        some = schema.decode(record, spec, with_raw_metadata=True, keys=keys)
        assert list(some) == keys
        for k in keys:
            np.testing.assert_array_equal(some[k].numpy(), full[k].numpy())
    with pytest.raises(ValueError, match="metadata_date"):
        schema.decode(record, spec, keys=["aerial", "metadata_date"])  # needs with_raw_metadata
    if task == "flair1":
        with pytest.raises(ValueError, match="sentinel_data"):
            schema.decode(record, spec, keys=["sentinel_data"])


def test_raw_metadata_fields_round_trip():
    ex = _example(np.random.default_rng(1))
    spec = schema.RecordSpec("flair1", P)
    dec = schema.decode(tf.constant(schema.encode(ex).SerializeToString()), spec, with_raw_metadata=True)
    assert dec["metadata_date"].numpy().decode() == ex["metadata"]["date"]
    assert dec["metadata_time"].numpy().decode() == "08h06"
    assert dec["metadata_camera"].numpy().decode() == "UCE-M3-f120-s07"
    np.testing.assert_array_equal(dec["metadata_centroid"].numpy(), [924009.6, 6339451.2, 1661.9399414062])


def _protobuf_example(fields, pads):
    """The same features built with protobuf's own API (an independent encoder)."""
    proto = tf.train.Example()
    for key, (kind, value) in fields.items():
        feature = proto.features.feature[key]
        if kind == schema._BYTES:
            feature.bytes_list.value.append(value.tobytes() if isinstance(value, np.ndarray) else bytes(value))
        elif kind == schema._FLOAT:
            feature.float_list.value.extend(value.tolist())
        else:
            feature.int64_list.value.append(value)
    for key, n in pads.items():
        proto.features.feature[key].bytes_list.value.append(bytes(n))
    return proto


@pytest.mark.parametrize("t", [None, 3])
def test_hand_serialized_bytes_are_the_example_protobuf_builds(t):
    # serialize() writes the wire format itself: protobuf must parse it into the same message
    # its own API builds from the same values, with the big arrays at 64-byte offsets.
    for labelled in (True, False):
        ex = _example(np.random.default_rng(4), t=t, labelled=labelled)
        ex["transform"] = (-0.2, 0.0, -1e300, 0.0, 0.2, 5e-324)  # signs, extremes
        raw = bytes(schema.serialize(ex))
        parsed = tf.train.Example.FromString(raw)
        pads = {k: len(v.bytes_list.value[0]) for k, v in parsed.features.feature.items() if k.startswith("_pad")}
        fields = schema._fields(ex)
        slots = [k for k in schema._SLOTS if k in fields]
        assert sorted(pads) == [f"_pad{i}" for i in range(len(slots))]
        expected = _protobuf_example(fields, pads)
        assert parsed.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
        # Canonical encoding: protobuf's serialization of the message is as long as ours.
        assert len(expected.SerializeToString(deterministic=True)) == len(raw)
        assert raw == bytes(schema.serialize(dict(reversed(list(ex.items())))))  # deterministic
        # The slotted payloads, in slot order, each at a multiple of 64 bytes.
        offsets = []
        for key in slots:
            payload = fields[key][1]
            payload = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
            if payload:
                offsets.append(raw.index(payload))
                assert offsets[-1] % schema.ALIGNMENT == 0, key
        assert offsets == sorted(offsets)


def test_aligned_decoding_at_every_header_size_and_the_date_limit():
    # The aligned reader tabulates the entry headers: check series whose sizes cross the
    # varint lengths (the table's first and last rows included), then the limit of dates.
    s = 2  # 80 bytes per date of sentinel/data: 2 to 3 byte varints between these lengths
    spec = schema.RecordSpec("flair2", P, s, byte_layout="aligned64")
    rng = np.random.default_rng(8)
    for t in (0, 1, 204, 205, 2047):
        ex = _example(rng, t=3)
        ex["sentinel_data"] = rng.integers(0, 65536, (t, s, s, 10), dtype=np.uint16)
        ex["sentinel_masks"] = rng.integers(0, 101, (t, s, s, 2), dtype=np.uint8)
        ex["sentinel_dates"] = np.full([t], 20210101)
        got = schema.decode(tf.constant(bytes(schema.serialize(ex))), spec)
        for key in ("aerial", "label", "sentinel_data", "sentinel_masks"):
            np.testing.assert_array_equal(got[key].numpy(), ex[key], err_msg=f"{key}, T={t}")
    ex["sentinel_data"] = np.zeros((schema.MAX_SENTINEL_DATES + 1, s, s, 10), np.uint16)
    ex["sentinel_masks"] = np.zeros((schema.MAX_SENTINEL_DATES + 1, s, s, 2), np.uint8)
    ex["sentinel_dates"] = np.full([schema.MAX_SENTINEL_DATES + 1], 20210101)
    with pytest.raises(ValueError, match=r"IMG_\d{6}: 2048 Sentinel-2 dates; a record holds at most 2047"):
        schema.serialize(ex)


def test_sentinel_bytes_are_little_endian():
    ex = _example(np.random.default_rng(2), t=1)
    ex["sentinel_data"][:] = 0
    ex["sentinel_data"][0, 0, 0, 0] = 0x0102
    proto = schema.encode(ex)
    raw = proto.features.feature["sentinel/data"].bytes_list.value[0]
    assert raw[:2] == b"\x02\x01"


def test_encode_rejects_wrong_shapes_and_dtypes_naming_the_patch():
    rng = np.random.default_rng(3)
    ex = _example(rng)
    ex["aerial"] = ex["aerial"][..., :3]
    with pytest.raises(ValueError, match=r"IMG_\d{6}: aerial has shape"):
        schema.encode(ex)
    ex = _example(rng)
    ex["label"] = ex["label"].astype(np.int32)
    with pytest.raises(ValueError, match="label has dtype int32"):
        schema.encode(ex)
    ex = _example(rng)
    del ex["metadata"]["camera"]
    with pytest.raises(ValueError, match="bad metadata record"):
        schema.encode(ex)


@pytest.mark.parametrize("t", [None, 3])
def test_in_place_arrays_give_the_same_bytes_and_their_views(t):
    """`InPlace` features are written by their fill into the record: the bytes of plain arrays."""
    ex = _example(np.random.default_rng(5), t=t)
    slots = {}
    for key in ("aerial", "elevation", "label", "sentinel_data"):
        if key in ex:
            value = ex[key]
            slots[key] = schema.InPlace(value.shape, value.dtype, lambda dst, v=value: np.copyto(dst, v))
    record = schema.serialize({**ex, **slots})
    assert record == schema.serialize(ex)
    for key, slot in slots.items():
        np.testing.assert_array_equal(slot.array, ex[key])
        assert np.shares_memory(slot.array, np.frombuffer(record, np.uint8))  # the record's own bytes
    bad = schema.InPlace((P, P, 3), np.uint8, lambda dst: None)
    with pytest.raises(ValueError, match=r"IMG_\d{6}: aerial has shape \(16, 16, 3\)"):
        schema.serialize({**ex, "aerial": bad})
    with pytest.raises(ValueError, match="label has dtype int16"):
        schema.serialize({**ex, "label": schema.InPlace((P, P), np.int16, lambda dst: None)})


def test_spec_from_info_and_version_check():
    info = {"schema_version": schema.SCHEMA_VERSION, "task": "flair2", "patch_size": 64, "sentinel_size": 40}
    assert schema.RecordSpec.from_info(info) == schema.RecordSpec("flair2", 64, 40, byte_layout="protobuf")
    assert schema.RecordSpec.from_info(dict(info, byte_layout="aligned64")).byte_layout == "aligned64"
    with pytest.raises(ValueError, match="byte_layout"):
        schema.RecordSpec.from_info(dict(info, byte_layout="aligned32"))
    with pytest.raises(ValueError, match="schema version"):
        schema.RecordSpec.from_info(dict(info, schema_version=schema.SCHEMA_VERSION + 1))
    with pytest.raises(ValueError, match="sentinel_size"):
        schema.RecordSpec("flair2", 64)


def test_shard_pattern_matches_shards_not_temp_files(tmp_path):
    names = [schema.shard_name("flair1", "train", i, 3) for i in range(3)]
    assert names[1] == "flair1-train.tfrecord-00001-of-00003"
    for n in names + [names[0] + ".incomplete", "flair1-val.tfrecord-00000-of-00001"]:
        (tmp_path / n).write_bytes(b"")
    found = sorted(tf.io.gfile.glob(schema.shard_pattern(str(tmp_path), "flair1", "train")))
    assert [f.split("/")[-1] for f in found] == names
