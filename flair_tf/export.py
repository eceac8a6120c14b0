"""Exports a trained model as a TensorFlow SavedModel: ``python -m flair_tf.export``.

The SavedModel needs neither this package nor Keras to run::

    import tensorflow as tf
    model = tf.saved_model.load("exported")
    out = model.signatures["serving_default"](aerial=tf.constant(batch_uint8))
    out["class_map"]       # uint8 [B, H, W], 0-based class indices
    out["probabilities"]   # float32 [B, H, W, num_classes], softmax of the logits

Serving signature ``serving_default``: ``aerial`` uint8 [B, H, W, C] (the raw
channels the model was trained on, e.g. R,G,B,NIR,E; normalisation is inside
the graph). Models trained with metadata also take ``metadata`` float32
[B, 45]; U-T&T also takes ``sentinel`` float32 [B, T, S, S, 10],
``sentinel_dates`` float32 [B, T] and ``sentinel_pad_mask`` bool [B, T], already
preprocessed as :mod:`flair_tf.data.pipeline` does (cloud filtering, monthly
averaging, padding) -- that preprocessing is not part of the graph.

Example:
  python -m flair_tf.export --model_dir=runs/flair1_unet --output_dir=runs/flair1_unet/export
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags, logging

SERVING_KEY = "serving_default"
INFO_FILE = "flair_export.json"


def _input_specs(model):
    """TensorSpecs of the serving inputs, keyed like the model's input dict."""
    import tensorflow as tf

    from flair_tf.inference import model_io

    struct = model.input if isinstance(model.input, dict) else {"aerial": model.input}
    specs = {}
    for name in model_io.input_names(model) or ["aerial"]:
        tensor = struct[name]
        shape = [None] + list(tensor.shape[1:])
        if name == "aerial":
            specs[name] = tf.TensorSpec(shape, tf.uint8, name=name)
        elif name == "sentinel_pad_mask":
            specs[name] = tf.TensorSpec(shape, tf.bool, name=name)
        else:
            specs[name] = tf.TensorSpec(shape, tf.float32, name=name)
    return specs


def export_saved_model(model, output_dir: str) -> dict:
    """Writes ``model`` as a SavedModel with the ``serving_default`` signature.

    Args:
      model: a contract-D Keras model (dict inputs, dict of logits with ``aerial``).
      output_dir: destination (local or ``gs://``; remote exports are written
        locally first, then copied).

    Returns:
      A description of the signature (also written to ``flair_export.json``).
    """
    import keras
    import tensorflow as tf

    from flair_tf.inference import model_io

    specs = _input_specs(model)
    names = list(specs)
    dict_input = isinstance(model.input, dict)
    dtypes = {n: (model.input[n].dtype if dict_input else model.input.dtype) for n in names}

    def serve(*args):
        # Serving dtypes are the pipeline's (uint8 aerial, bool mask); the graph casts to the model's.
        inputs = {n: tf.cast(a, dtypes[n]) for n, a in zip(names, args)}
        out = model(inputs if dict_input else inputs["aerial"], training=False)
        logits = tf.cast(model_io.aerial_logits(model, out), tf.float32)
        probs = tf.nn.softmax(logits, axis=-1)
        return {"class_map": tf.cast(tf.argmax(probs, axis=-1), tf.uint8), "probabilities": probs}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name=SERVING_KEY, fn=serve, input_signature=[specs[n] for n in names])
    remote = "://" in output_dir
    local = tempfile.mkdtemp(prefix="flair_tf_export_") if remote else output_dir
    archive.write_out(local, verbose=False)
    info = {
        "signature": SERVING_KEY,
        "inputs": {n: {"dtype": s.dtype.name, "shape": [d for d in s.shape.as_list()]} for n, s in specs.items()},
        "outputs": {
            "class_map": {"dtype": "uint8", "shape": [None, None, None]},
            "probabilities": {"dtype": "float32", "shape": [None, None, None, int(model.output["aerial"].shape[-1])
                                                            if isinstance(model.output, dict) else None]},
        },
    }
    with open(os.path.join(local, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if remote:
        for root, _, files in tf.io.gfile.walk(local):
            rel = os.path.relpath(root, local)
            dest = output_dir if rel == "." else os.path.join(output_dir, rel)
            tf.io.gfile.makedirs(dest)
            for name in files:
                tf.io.gfile.copy(os.path.join(root, name), os.path.join(dest, name), overwrite=True)
    logging.info("Exported SavedModel to %s (inputs %s)", output_dir, names)
    return info


# ------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Flags of ``python -m flair_tf.export``."""
    from flair_tf.inference import define_flag

    define_flag(flags.DEFINE_string, "model_dir", None, "Training run folder (model_config.json, checkpoints/).", fv)
    define_flag(flags.DEFINE_string, "weights", None, "Weights file; default <model_dir>/checkpoints/best.weights.h5.",
                        fv)
    define_flag(flags.DEFINE_string, "output_dir", None, "SavedModel destination; default <model_dir>/export.", fv)
    define_flag(flags.DEFINE_boolean, "any_size", True,
                         "U-Net without metadata: the signature accepts any H, W (multiple of 32), not only the "
                         "training patch size.",
                         fv)


def main(argv) -> None:
    del argv
    from flair_tf.inference import model_io

    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required (a training run folder)")
    output_dir = FLAGS.output_dir or os.path.join(FLAGS.model_dir, "export")
    # Winograd convolutions suit CPUs only; a SavedModel may be served anywhere.
    loaded = model_io.load_model(FLAGS.model_dir, FLAGS.weights, any_size=FLAGS.any_size, winograd=False)
    info = export_saved_model(loaded.model, output_dir)
    inputs = ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in info["inputs"].items())
    print(f"SavedModel written to {output_dir}\n  signature '{SERVING_KEY}': {inputs} -> class_map uint8, "
          f"probabilities float32\n  load it with tf.saved_model.load({output_dir!r})", file=sys.stdout)


def run() -> None:
    """Console script ``flair-tf-export``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
