#!/usr/bin/env python
"""Scores a folder of PRED_<id>.tif against a folder of MSK_<id>.tif, as the FLAIR challenges did.

Any tool's predictions work: single-band TIFFs of 0-based class indices named
``PRED_<id>.tif`` (challenge) or ``PRED_IMG_<id>.tif`` (IGN's later library).
Both folders are searched recursively and paired by patch id; a missing or
extra file is an error that names it.

Examples:
  # The Codalab number (13 classes, mIoU over the first 12):
  python tools/compute_miou.py --pred_dir=predictions_unet --mask_dir=flair_labels_test
  # A 19-class model in the later 19-class convention, with a report:
  python tools/compute_miou.py --pred_dir=preds --mask_dir=labels --nomenclature=19 \
      --output_dir=scores
  # The same 19-class predictions in the challenge convention (index >= 12 -> 12):
  python tools/compute_miou.py --pred_dir=preds --mask_dir=labels --pred_num_classes=19
"""

import json

from absl import app, flags

from flair_tf.inference import report, score_folders

FLAGS = flags.FLAGS
flags.DEFINE_string("pred_dir", None, "Folder of PRED_<id>.tif (uint8 class indices); searched recursively.")
flags.DEFINE_string("mask_dir", None, "Folder of MSK_<id>.tif (raw codes 1..19); searched recursively.")
flags.DEFINE_enum(
    "nomenclature", "13", ["13", "19"],
    "13: challenge convention (13x13 matrix, mIoU over the first 12 classes). "
    "19: IGN's later library (19x19, clear cut/mixed/ligneous/other removed, mean over 15).",
)
flags.DEFINE_integer(
    "pred_num_classes", None,
    "Classes the predictions use (13 or 19); defaults to --nomenclature. 19-class predictions "
    "scored with --nomenclature=13 have indices >= 12 merged into 12 ('other').",
)
flags.DEFINE_string("output_dir", None, "If set, write metrics.json, metrics.md and the confusion matrix there.")
flags.DEFINE_integer("num_workers", 4, "Reader threads.")
flags.DEFINE_bool("json", False, "Print the scores as one JSON line instead of a table.")
flags.mark_flags_as_required(["pred_dir", "mask_dir"])


def main(argv):
    del argv
    result = score_folders.score_folders(
        FLAGS.pred_dir,
        FLAGS.mask_dir,
        convention=FLAGS.nomenclature,
        pred_num_classes=FLAGS.pred_num_classes,
        num_workers=FLAGS.num_workers,
        output_dir=FLAGS.output_dir,
    )
    if FLAGS.json:
        print(json.dumps(report.json_safe({k: v for k, v in result.items() if k != "confusion_matrix"})))
    else:
        print(report.markdown_table(result))
        print(f"{result['num_patches']} patches; mIoU = {result['miou']:.4f}")
        if FLAGS.output_dir:
            print(f"Report written to {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
