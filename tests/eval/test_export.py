"""python -m flair_tf.export: a SavedModel that runs in plain TensorFlow, without flair_tf."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from absl import flags
from absl.testing import flagsaver

from flair_tf import export
from flair_tf.inference import model_io
from eval_runs import unet13_run  # noqa: F401  (fixtures)

# Runs in a fresh interpreter where importing flair_tf is impossible.
LOAD_SNIPPET = textwrap.dedent("""
    import sys
    sys.modules["flair_tf"] = None  # any import of the package now raises ImportError
    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(sys.argv[1])
    serve = model.signatures["serving_default"]
    out = {}
    for name in ("a", "b"):
        x = np.load(f"{sys.argv[2]}/{name}.npy")
        res = serve(aerial=tf.constant(x))
        out[name + "_class_map"] = res["class_map"].numpy()
        out[name + "_probabilities"] = res["probabilities"].numpy()
    np.savez(f"{sys.argv[2]}/out.npz", **out)
    print(sorted(m for m in sys.modules if m.startswith("flair_tf") and sys.modules[m] is not None))
""")


def test_saved_model_reloads_without_flair_tf_and_matches_keras(unet13_run, tmp_path):
    out_dir = tmp_path / "exported"
    export.define_flags()
    with flagsaver.flagsaver():
        flags.FLAGS([sys.argv[0], f"--model_dir={unet13_run}", f"--output_dir={out_dir}"])
        export.main([])
    assert (out_dir / "saved_model.pb").exists()
    info = json.loads((out_dir / export.INFO_FILE).read_text())
    assert info["inputs"]["aerial"] == {"dtype": "uint8", "shape": [None, None, None, 5]}
    assert info["outputs"]["probabilities"]["shape"][-1] == 13

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 64, 64, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 96, 128, 5), dtype=np.uint8)  # another size: the U-Net is exported size-free
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    proc = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(out_dir), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path),
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    got = np.load(tmp_path / "out.npz")

    model = model_io.load_model(unet13_run, any_size=True, winograd=False).model  # what export saves
    for name, x in (("a", a), ("b", b)):
        logits = model({"aerial": x}, training=False)["aerial"].numpy()
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert got[f"{name}_class_map"].dtype == np.uint8 and got[f"{name}_class_map"].shape == x.shape[:3]
        assert got[f"{name}_probabilities"].dtype == np.float32
        assert got[f"{name}_probabilities"].shape == x.shape[:3] + (13,)
        np.testing.assert_allclose(got[f"{name}_probabilities"], probs, atol=1e-4)
        top2 = np.sort(probs, -1)[..., -2:]
        sure = top2[..., 1] - top2[..., 0] > 1e-4
        np.testing.assert_array_equal(got[f"{name}_class_map"][sure], probs.argmax(-1)[sure])
