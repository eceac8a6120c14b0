"""`--encoder_weights` and `--init_checkpoint` initialise the model that `train` trains."""

import json

import numpy as np

from flair_tf import train as train_lib
from flair_tf.models import build_model
from flair_tf.models import weights as weights_lib


def _run(tmp_path, name, records, **extra):
    # lr 0: trainable weights after one step equal the initial ones.
    cfg = {"model_dir": str(tmp_path / name), "data_dir": records, "task": "flair1", "arch": "unet",
           "epochs": 1, "steps_per_epoch": 1, "validation_steps": 1, "batch_size": 2,
           "optimizer": "sgd", "learning_rate": 0.0, "lr_schedule": "none", "tensorboard_images": 0,
           "verbose": "0", **extra}
    train_lib.train(cfg)
    model = build_model(json.loads((tmp_path / name / "model_config.json").read_text()))
    model.load_weights(str(tmp_path / name / "checkpoints" / "last.weights.h5"))
    return model


def test_init_checkpoint_and_encoder_weights(tmp_path, flair1_records):
    rng = np.random.default_rng(0)
    source = build_model({"arch": "unet", "num_classes": 13, "input_size": 64})
    state = {k: rng.normal(0, 0.05, v.shape).astype(np.float32)
             for k, v in weights_lib.export_state_dict(source).items()}
    weights_lib.load_state_dict(source, state)
    full = str(tmp_path / "full.safetensors")
    weights_lib.write_safetensors(full, state)

    model = _run(tmp_path, "init", flair1_records, init_checkpoint=full)
    got = weights_lib.export_state_dict(model)
    for key, value in state.items():
        if "running_" in key:  # BN statistics move during the training step
            continue
        np.testing.assert_allclose(got[key], value, atol=1e-7, err_msg=key)

    # torchvision-style ImageNet encoder (3 input channels) through smp's 5-channel rule.
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder["conv1.weight"] = rng.normal(0, 0.05, (64, 3, 7, 7)).astype(np.float32)
    enc_file = str(tmp_path / "resnet34.safetensors")
    weights_lib.write_safetensors(enc_file, encoder)
    model = _run(tmp_path, "enc", flair1_records, encoder_weights=enc_file)
    got = weights_lib.export_state_dict(model)
    expected_conv1 = encoder["conv1.weight"][:, [0, 1, 2, 0, 1]] * 3 / 5
    np.testing.assert_allclose(got["encoder.conv1.weight"], expected_conv1, atol=1e-7)
    np.testing.assert_allclose(got["encoder.layer4.2.conv2.weight"], encoder["layer4.2.conv2.weight"], atol=1e-7)
