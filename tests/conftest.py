"""Shared pytest setup: quiet TensorFlow, deterministic seeds, shared synthetic data fixtures."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN stays as TensorFlow sets it (on for x86 CPUs): the suite tests the kernels users and
# `make demo` run, including the oneDNN fusions that BatchNorm folding enables. (Turning it off
# also made the suite slower: 676 s against 533 s on 2 cores, the learning test 219 s against 109 s.)

# Reference-parity tests (tests/models) use torch + torchvision (via smp). Importing
# torchvision AFTER TensorFlow segfaults the process (its C++ ops library clashes with
# TF 2.21's), so when the test extra is installed import it first, once per session.
try:
    import torchvision  # noqa: F401,E402
except ImportError:
    pass

import pytest  # noqa: E402

# Small synthetic trees shared by the whole session (real domain names; D004_2021 is the
# official validation domain; ids 000001..000032 train+val, 000033..000040 test).
SYNTHETIC_TREE_KWARGS = dict(num_domains=4, zones_per_domain=2, patches_per_zone=4,
                             num_test_domains=1, patch_size=64, seed=0)


@pytest.fixture(scope="session")
def flair1_tree(tmp_path_factory):
    """Root of a synthetic FLAIR #1 tree: 64 px patches, 3 train + 1 val + 1 test domain."""
    from flair_tf.data import synthetic

    root = tmp_path_factory.mktemp("flair1_tree")
    synthetic.make_tree(str(root), task="flair1", show_progress=False, **SYNTHETIC_TREE_KWARGS)
    return str(root)


@pytest.fixture(scope="session")
def flair2_tree(tmp_path_factory):
    """Root of a synthetic FLAIR #2 tree: as `flair1_tree` plus Sentinel-2 super-areas
    (6..12 dates per zone, margin for crops up to 40 px) and the centroid JSON."""
    from flair_tf.data import synthetic

    root = tmp_path_factory.mktemp("flair2_tree")
    synthetic.make_tree(str(root), task="flair2", show_progress=False, num_dates=(6, 12),
                        max_sentinel_crop=40, **SYNTHETIC_TREE_KWARGS)
    return str(root)


# --- converted records (tests/data/test_convert.py, pipeline tests) ----------------------------

def _convert_tree(tree, tmp_path_factory, task):
    from flair_tf.data import convert

    out = tmp_path_factory.mktemp(f"{task}_records")
    convert.convert(convert.ConvertOptions(
        task=task, data_root=tree, output_dir=str(out), patch_size=SYNTHETIC_TREE_KWARGS["patch_size"],
        sentinel_size=40, num_workers=1, min_shards=2, show_progress=False,
        command_line=f"conftest {task}_records"))
    return str(out)


@pytest.fixture(scope="session")
def flair1_records(flair1_tree, tmp_path_factory):
    """Directory of `flair1_tree` converted to TFRecords (train/val/test, 2 shards each) with
    its dataset_info.json; read it with `schema.load_dataset_info` / `schema.shard_pattern`."""
    return _convert_tree(flair1_tree, tmp_path_factory, "flair1")


@pytest.fixture(scope="session")
def flair2_records(flair2_tree, tmp_path_factory):
    """As `flair1_records` for `flair2_tree` (Sentinel-2 crops of 40 px, 6..12 dates)."""
    return _convert_tree(flair2_tree, tmp_path_factory, "flair2")
