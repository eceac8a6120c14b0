"""Writes synthetic FLAIR #1 / #2 trees in the released format.

Examples:
  # A small tree for a quick try (64 px patches, a few seconds):
  python tools/make_synthetic_flair.py --output_dir=/tmp/flair_synth --task=both --patch_size=64

  # Real-size patches (512 px, 0.2 m), 8 train+val domains, 2 test domains:
  python tools/make_synthetic_flair.py --output_dir=/data/synth --task=flair2 \
      --num_domains=8 --num_test_domains=2 --zones_per_domain=3 --patches_per_zone=9

With --task=both the trees go to <output_dir>/flair1 and <output_dir>/flair2;
with a single task, to <output_dir>/<task>. See docs/data.md for the layout.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from flair_tf.data import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write the tree(s) into.",
                                  required=True)
_TASK = flags.DEFINE_enum("task", "both", ["flair1", "flair2", "both"], "Which tree(s) to write.")
_PATCH_SIZE = flags.DEFINE_integer(
    "patch_size", 512, "Pixels per patch side; the footprint stays 102.4 m (0.2 m pixels at 512).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes byte-identical files.")
_NUM_DOMAINS = flags.DEFINE_integer(
    "num_domains", 4, "Train+val domains (real names; includes official validation domains).")
_NUM_VAL_DOMAINS = flags.DEFINE_integer(
    "num_val_domains", None, "Official validation domains among --num_domains "
    "(default: a quarter, at least 1 when --num_domains >= 2).")
_NUM_TEST_DOMAINS = flags.DEFINE_integer("num_test_domains", 1, "Domains in the test folders.")
_ZONES = flags.DEFINE_integer("zones_per_domain", 2, "Zones (areas) per domain.")
_PATCHES = flags.DEFINE_integer("patches_per_zone", 4, "Adjacent patches per zone.")
_MIN_DATES = flags.DEFINE_integer("min_dates", 20, "FLAIR #2: fewest Sentinel-2 dates per zone.")
_MAX_DATES = flags.DEFINE_integer("max_dates", 40, "FLAIR #2: most Sentinel-2 dates per zone.")
_MAX_CROP = flags.DEFINE_integer(
    "max_sentinel_crop", 112,
    "FLAIR #2: largest Sentinel crop (px) that must fit around every patch centroid.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing tree.")


def main(argv):
    del argv
    tasks = ["flair1", "flair2"] if _TASK.value == "both" else [_TASK.value]
    for task in tasks:
        root = os.path.join(_OUTPUT_DIR.value, task)
        summary = synthetic.make_tree(
            root,
            task=task,
            num_domains=_NUM_DOMAINS.value,
            zones_per_domain=_ZONES.value,
            patches_per_zone=_PATCHES.value,
            patch_size=_PATCH_SIZE.value,
            seed=_SEED.value,
            num_val_domains=_NUM_VAL_DOMAINS.value,
            num_test_domains=_NUM_TEST_DOMAINS.value,
            num_dates=(_MIN_DATES.value, _MAX_DATES.value),
            max_sentinel_crop=_MAX_CROP.value,
            overwrite=_OVERWRITE.value,
        )
        print(synthetic.format_summary(summary))
        with open(os.path.join(root, "synthetic_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    app.run(main)
