"""Joint flips / rot90 (reference albumentations Compose), stateless and graph-safe."""

import numpy as np
import pytest
import tensorflow as tf

from flair_tf.data import augment

P = 16


def coordinate_image(size=P):
    """uint8 [P, P, 3]: channel 0 = row, 1 = column, 2 = a band that must follow them."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([rows, cols, (rows * size + cols) % 251], axis=-1).astype(np.uint8)


def numpy_transform(x, vflip, hflip, k, axes=(0, 1)):
    """The reference: albumentations VerticalFlip, HorizontalFlip, then np.rot90(x, k)."""
    if vflip:
        x = np.flip(x, axes[0])
    if hflip:
        x = np.flip(x, axes[1])
    return np.rot90(x, k, axes=axes)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("vflip,hflip", [(False, False), (True, False), (False, True), (True, True)])
def test_apply_transform_matches_numpy(vflip, hflip, k):
    x = coordinate_image()
    t = augment.Transform(tf.constant(vflip), tf.constant(hflip), tf.constant(k))
    np.testing.assert_array_equal(augment.apply_transform(tf.constant(x), t).numpy(),
                                  numpy_transform(x, vflip, hflip, k))
    series = np.stack([x, x + 1, x + 2])  # [T, S, S, C]
    np.testing.assert_array_equal(
        augment.apply_transform(tf.constant(series), t, spatial_axes=(1, 2)).numpy(),
        numpy_transform(series, vflip, hflip, k, axes=(1, 2)))


def test_label_moves_exactly_like_the_image_eager_and_in_tf_data():
    image = coordinate_image()
    label = (np.arange(P * P).reshape(P, P) % 19 + 1).astype(np.uint8)
    seeds = np.stack([np.full(160, 7), np.arange(160)], axis=1).astype(np.int64)

    def fn(seed):
        img, lab = augment.augment([tf.constant(image), tf.constant(label)], seed)
        return img, lab

    graph = list(tf.data.Dataset.from_tensor_slices(seeds).map(fn).as_numpy_iterator())
    seen = set()
    for seed, (g_img, g_lab) in zip(seeds, graph):
        e_img, e_lab = (t.numpy() for t in fn(tf.constant(seed)))
        np.testing.assert_array_equal(e_img, g_img)
        np.testing.assert_array_equal(e_lab, g_lab)
        # Every output pixel says where it came from; the label must come from there too.
        src_r, src_c = g_img[..., 0].astype(int), g_img[..., 1].astype(int)
        np.testing.assert_array_equal(g_lab, label[src_r, src_c])
        np.testing.assert_array_equal(g_img[..., 2], image[src_r, src_c, 2])
        seen.add(g_img[..., :2].tobytes())
    assert len(seen) == 8  # all 8 elements of the dihedral group show up in 160 draws (P(one missing) ~ 1e-4)


def test_same_seed_same_transform():
    a = augment.sample_transform(tf.constant([3, 11]))
    b = augment.sample_transform(tf.constant([3, 11], tf.int32))
    assert [x.numpy() for x in a] == [x.numpy() for x in b]


def test_draw_is_the_same_eagerly_in_a_graph_and_under_xla():
    seeds = tf.stack([tf.fill([300], 2022), tf.range(300)], axis=1)
    eager = [tuple(int(x) for x in augment.sample_transform(s)) for s in seeds]
    xla = tf.function(lambda s: tf.stack([tf.cast(x, tf.int32) for x in augment.sample_transform(s)]),
                      jit_compile=True)
    graph = tf.data.Dataset.from_tensor_slices(seeds).map(augment.sample_transform)
    assert [tuple(xla(s).numpy()) for s in seeds] == eager
    assert [tuple(int(x) for x in t) for t in graph] == eager
    assert len(set(eager)) == 16  # every (vflip, hflip, k) combination shows up


def test_probabilities_match_the_reference():
    n = 4000
    seeds = tf.stack([tf.fill([n], 2022), tf.range(n)], axis=1)
    draws = tf.data.Dataset.from_tensor_slices(seeds).map(augment.sample_transform).batch(n)
    vflip, hflip, k = (t.numpy() for t in next(iter(draws)))
    # binomial standard errors: 0.5 -> 0.0079, 0.125 -> 0.0052, 0.625 -> 0.0077 (n = 4000)
    tol = 4.5
    assert abs(vflip.mean() - 0.5) < tol * 0.0079
    assert abs(hflip.mean() - 0.5) < tol * 0.0079
    assert abs((k == 0).mean() - 0.625) < tol * 0.0077
    for r in (1, 2, 3):
        assert abs((k == r).mean() - 0.125) < tol * 0.0052
    # independence of the two flips
    assert abs((vflip & hflip).mean() - 0.25) < tol * 0.0069


def test_rectangle_is_rejected():
    t = augment.Transform(tf.constant(False), tf.constant(False), tf.constant(1))
    with pytest.raises(ValueError, match="square"):
        augment.apply_transform(tf.zeros([4, 6, 1]), t)


def test_move_index_of_drawn_vectors_equals_the_scalar_draws():
    seeds = np.stack([np.full(64, 3), np.arange(64)], axis=1).astype(np.int64)
    vector = augment.move_index(augment.sample_transform(tf.constant(seeds))).numpy()
    scalar = [int(augment.move_index(augment.sample_transform(tf.constant(s)))) for s in seeds]
    np.testing.assert_array_equal(vector, scalar)
    assert set(scalar) == set(range(8))


@pytest.mark.parametrize("jit_compile", [None, True])
def test_apply_moves_moves_each_example_like_apply_move(jit_compile):
    # A batch of the 8 moves (twice, shuffled): each example must come out as the
    # per-example `apply_move` (the pipeline's host path) makes it, for uint8 images,
    # labels and float Sentinel series (spatial axes 2, 3).
    image = coordinate_image()
    moves = np.random.default_rng(0).permutation(np.arange(16) % 8).astype(np.int32)
    images = np.stack([image + i for i in range(16)]).astype(np.uint8)  # examples differ
    labels = images[..., 2]
    series = np.stack([np.stack([image, image + 1]) for _ in range(16)]).astype(np.float32) + \
        np.arange(16, dtype=np.float32)[:, None, None, None, None]

    fn = lambda i, l, s, m: (augment.apply_moves(i, m), augment.apply_moves(l, m),  # noqa: E731
                             augment.apply_moves(s, m, spatial_axes=(2, 3)))
    if jit_compile:
        fn = tf.function(fn, jit_compile=True)
    got = fn(tf.constant(images), tf.constant(labels), tf.constant(series), tf.constant(moves))
    for b, m in enumerate(moves):
        for x, axes, out in zip((images, labels, series), ((0, 1), (0, 1), (1, 2)), got):
            want = augment.apply_move(tf.constant(x[b]), tf.constant(int(m)), spatial_axes=axes).numpy()
            assert out.dtype == x.dtype
            np.testing.assert_array_equal(out[b].numpy(), want)
    t, r, c = augment.MOVES[int(moves[0])]
    np.testing.assert_array_equal(got[0][0].numpy(), augment._move_numpy(images[0], t, r, c))


def test_apply_moves_rejects_bad_axes():
    with pytest.raises(ValueError, match="after the batch axis"):
        augment.apply_moves(tf.zeros([2, 4, 4]), tf.zeros([2], tf.int32), spatial_axes=(0, 1))
    with pytest.raises(ValueError, match="square"):
        augment.apply_moves(tf.zeros([2, 4, 6]), tf.zeros([2], tf.int32))
