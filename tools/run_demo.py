r"""The whole flair_tf job on synthetic data, step by step (what `make demo` runs).

1. write a synthetic FLAIR #1 and FLAIR #2 tree (64 px patches, released layout);
2. convert both to sharded TFRecords and verify every record;
3. train the U-Net on FLAIR #1 under MirroredStrategy over 2 logical CPUs (configs/demo.flags);
4. evaluate it on the test split (official mIoU), write PRED_*.tif files and score them with
   tools/compute_miou.py exactly as the challenge did;
5. map a synthetic georeferenced raster several patches wide (sliding window, blended tiles);
6. export a SavedModel.

Each step is the project's own command line, run as a subprocess and printed first, so the
demo doubles as a worked example. Usage:

  python tools/run_demo.py --output_dir=demo_output
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "demo_output", "Folder for everything the demo writes.")
flags.DEFINE_integer("patch_size", 64, "Patch size of the synthetic tree (the real one is 512).")
flags.DEFINE_integer("epochs", None, "Override the number of training epochs of configs/demo.flags.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")


class Demo:
    """Runs and times the steps, and keeps a summary."""

    def __init__(self, out: str):
        self.out = out
        self.rows: list[tuple[str, float, str]] = []
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))

    def run(self, title: str, args: list[str], result: str = "") -> float:
        cmd = [sys.executable] + args
        print(f"\n=== {title}\n$ {' '.join(shlex.quote(a) for a in ['python'] + args)}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            print(f"\nDemo step failed ({title}, exit code {proc.returncode}); see the output above.",
                  file=sys.stderr)
            sys.exit(proc.returncode)
        self.rows.append((title, seconds, result))
        return seconds

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


def main(argv):
    del argv
    out = os.path.abspath(FLAGS.output_dir)
    os.makedirs(out, exist_ok=True)
    demo = Demo(out)
    p = str(FLAGS.patch_size)
    data, records = demo.path("data"), demo.path("records")
    run_dir = demo.path("train_flair1")
    t0 = time.monotonic()

    # Tree size matches the note at the top of configs/demo.flags.
    demo.run("1. synthetic FLAIR #1 and #2 trees", [
        "tools/make_synthetic_flair.py", "--task=both", f"--output_dir={data}", f"--patch_size={p}",
        "--num_domains=12", "--zones_per_domain=2", "--patches_per_zone=6", "--num_test_domains=2",
        "--max_sentinel_crop=40", f"--seed={FLAGS.seed}", "--overwrite"], data)
    for task in ("flair1", "flair2"):
        demo.run(f"2. convert {task} to TFRecords", [
            "tools/convert_to_tfrecords.py", f"--task={task}", f"--data_root={data}/{task}",
            f"--output_dir={records}/{task}", f"--patch_size={p}", "--min_shards=2", "--num_workers=2"],
            f"{records}/{task}")
        demo.run(f"2. verify {task} records", [
            "tools/verify_tfrecords.py", f"--records_dir={records}/{task}"])

    train_args = ["-m", "flair_tf.train", "--flagfile=configs/demo.flags",
                  f"--data_dir={records}/flair1", f"--model_dir={run_dir}"]
    if FLAGS.epochs:
        train_args.append(f"--epochs={FLAGS.epochs}")
    demo.run("3. train U-Net/ResNet34 (MirroredStrategy, 2 logical CPUs)", train_args, run_dir)

    eval_dir = demo.path("evaluation")
    demo.run("4. evaluate on the test split (official mIoU)", [
        "-m", "flair_tf.evaluate", f"--model_dir={run_dir}", f"--data_dir={records}/flair1",
        "--split=test", f"--output_dir={eval_dir}"], eval_dir)
    pred_dir = demo.path("predictions")
    demo.run("4. write PRED_*.tif for the test split", [
        "-m", "flair_tf.predict", f"--model_dir={run_dir}", f"--data_dir={records}/flair1",
        "--split=test", f"--output_dir={pred_dir}"], pred_dir)
    demo.run("4. score the PRED files like the challenge (tools/compute_miou.py)", [
        "tools/compute_miou.py", f"--pred_dir={pred_dir}",
        f"--mask_dir={data}/flair1/flair_1_labels_test"])

    # A scene 4.5 patches wide, with a nodata strip, mapped with the reference overlap ratio
    # (tile = patch, margin = tile / 4 as 128 is to 512).
    from flair_tf.data import synthetic  # pylint: disable=g-import-not-at-top

    size = int(FLAGS.patch_size * 4.5)
    scene = demo.path("raster", "scene.tif")
    os.makedirs(os.path.dirname(scene), exist_ok=True)
    synthetic.make_raster(scene, size, size, patch_size=FLAGS.patch_size,
                          label_path=demo.path("raster", "scene_labels.tif"),
                          nodata_rows=FLAGS.patch_size // 4, seed=FLAGS.seed)
    landcover = demo.path("raster", "landcover.tif")
    demo.run(f"5. map a {size}x{size} georeferenced raster (sliding window, blended tiles)", [
        "-m", "flair_tf.predict", f"--model_dir={run_dir}", f"--input={scene}", f"--output={landcover}",
        f"--tile_size={p}", f"--margin={FLAGS.patch_size // 4}", "--nodata=0", "--preview"], landcover)
    export_dir = demo.path("savedmodel")
    demo.run("6. export a SavedModel", [
        "-m", "flair_tf.export", f"--model_dir={run_dir}", f"--output_dir={export_dir}"], export_dir)

    total = time.monotonic() - t0
    print("\n" + "=" * 78 + "\nflair_tf demo: what it did\n")
    for title, seconds, result in demo.rows:
        print(f"  {seconds:7.1f} s  {title}" + (f"\n             -> {result}" if result else ""))
    metrics_file = os.path.join(eval_dir, "metrics.json")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            metrics = json.load(f)
        scores = metrics["conventions"]["13"]
        print(f"\n  test mIoU (official 13-class convention): {scores['miou']:.4f}, "
              f"overall accuracy {scores['overall_accuracy']:.4f} "
              f"on {metrics['run']['num_patches']} synthetic test patches")
    print(f"\n  total {total / 60:.1f} min.  TensorBoard:  tensorboard --logdir={run_dir}/logs")


if __name__ == "__main__":
    app.run(main)
