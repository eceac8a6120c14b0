"""Converts PyTorch weights to a Keras ``.weights.h5`` for a flair_tf model (and back).

Examples:

    # torchvision/timm ResNet34 ImageNet weights -> encoder of a 5-channel U-Net
    # (first conv adapted with smp's rule: R,G,B,R,G kernels x 3/5); the decoder
    # keeps its fresh initialisation.
    python tools/convert_weights.py --kind=encoder --arch=unet \
        --src=resnet34.safetensors --dst=unet_imagenet.weights.h5

    # An IGN FLAIR #1 Lightning checkpoint with the metadata MLP (needs torch).
    python tools/convert_weights.py --arch=unet --use_metadata \
        --src=flair1_unet_meta.ckpt --dst=flair1.weights.h5

    # An IGN FLAIR #2 U-T&T checkpoint (needs torch).
    python tools/convert_weights.py --arch=utt --src=flair2_utt.ckpt --dst=utt.weights.h5

    # Keras -> PyTorch names (safetensors), e.g. to load into smp.
    python tools/convert_weights.py --direction=to_torch --arch=unet \
        --src=model.weights.h5 --dst=unet.safetensors

The model is described by ``--model_config`` (a ``model_config.json`` written
by training) or by ``--arch`` and the builder flags below.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Source weights: .safetensors, .npz, .pth/.pt/.ckpt (torch), or .weights.h5 "
                    "with --direction=to_torch.", required=True)
flags.DEFINE_string("dst", None, "Output: a Keras .weights.h5 (to_keras) or .safetensors/.npz (to_torch).",
                    required=True)
flags.DEFINE_enum("direction", "to_keras", ["to_keras", "to_torch"], "Conversion direction.")
flags.DEFINE_enum("kind", "full", ["full", "encoder"],
                  "full: a whole-model state_dict (smp U-Net, FLAIR #1/#2 checkpoint); encoder: ResNet34 ImageNet "
                  "weights loaded into the encoder only.")
flags.DEFINE_string("model_config", None, "model_config.json; overrides --arch and the builder flags.")
flags.DEFINE_enum("arch", "unet", ["unet", "utt", "utae"], "Model architecture.")
flags.DEFINE_integer("num_classes", 13, "Output classes.")
flags.DEFINE_integer("in_channels", 5, "Aerial input channels (unet, utt).")
flags.DEFINE_bool("use_metadata", False, "Model has the metadata MLP (unet, utt).")
flags.DEFINE_string("prefix", "", "Prepended to every checkpoint key, e.g. 'arch_vhr.' to load an smp U-Net "
                    "state_dict into U-T&T's aerial branch (use with --allow_missing).")
flags.DEFINE_bool("allow_missing", False, "Accept model weights missing from the source (partial init).")
flags.DEFINE_bool("allow_pickle", False, "Let torch.load unpickle arbitrary objects (trusted files only).")


def model_config_from_flags() -> dict:
    """The `build_model` dict described by the flags."""
    if FLAGS.model_config:
        import tensorflow as tf  # noqa: PLC0415

        with tf.io.gfile.GFile(FLAGS.model_config) as f:
            return json.load(f)
    config = {"arch": FLAGS.arch, "num_classes": FLAGS.num_classes}
    if FLAGS.arch in ("unet", "utt"):
        config.update(in_channels=FLAGS.in_channels, use_metadata=FLAGS.use_metadata)
    return config


def main(argv):
    del argv
    from flair_tf.models import build_model  # noqa: PLC0415
    from flair_tf.models import weights as W  # noqa: PLC0415

    if FLAGS.direction == "to_keras" and not FLAGS.dst.endswith(".weights.h5"):
        raise app.UsageError(f"--dst must end with .weights.h5 (Keras 3 requirement). Received: --dst={FLAGS.dst}")
    config = model_config_from_flags()
    model = build_model(config)
    logging.info("Model %s: %s, %d parameters.", model.name, json.dumps(config), model.count_params())
    if FLAGS.direction == "to_torch":
        model.load_weights(FLAGS.src)
        state = W.export_state_dict(model, num_batches_tracked=True)
        if FLAGS.dst.endswith(".npz"):
            import io  # noqa: PLC0415

            import numpy as np  # noqa: PLC0415
            import tensorflow as tf  # noqa: PLC0415

            buffer = io.BytesIO()
            np.savez(buffer, **state)
            with tf.io.gfile.GFile(FLAGS.dst, "wb") as f:
                f.write(buffer.getvalue())
        else:
            W.write_safetensors(FLAGS.dst, state, metadata={"flair_tf_model_config": json.dumps(config)})
        logging.info("Wrote %d PyTorch-named tensors to %s.", len(state), FLAGS.dst)
        return
    if FLAGS.kind == "encoder":
        n = W.load_encoder_file(model, FLAGS.src, allow_pickle=FLAGS.allow_pickle)
    else:
        state = W.read_state_dict(FLAGS.src, allow_pickle=FLAGS.allow_pickle)
        n = len(W.load_state_dict(model, state, FLAGS.prefix, FLAGS.allow_missing, source=FLAGS.src))
    model.save_weights(FLAGS.dst)
    print(json.dumps({"dst": FLAGS.dst, "tensors": n, "model_config": config}))


if __name__ == "__main__":
    app.run(main)
