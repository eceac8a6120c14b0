"""Training-run folders (contract E) for the evaluation tests, without training.

Not a conftest.py: tests/training imports its own ``conftest`` module by name,
and a second conftest.py would shadow it. Test modules import the fixtures
(``from eval_runs import unet13_run``); the folders are built once per session.

A randomly initialised U-Net is saved exactly as ``flair_tf.train`` saves a run
(``model_config.json``, ``data_config.json``, ``checkpoints/best.weights.h5``), so
evaluate/predict/export are tested on the real model and file layout. The
BatchNorm statistics are perturbed so the predictions vary from pixel to pixel.
"""

import json
import os

import numpy as np
import pytest


def make_run(root: str, num_classes: int, patch_size: int = 64, seed: int = 0) -> str:
    """Writes a contract-E run folder with a random U-Net; returns its path."""
    import keras

    from flair_tf.data import pipeline
    from flair_tf.models import build_model

    keras.utils.set_random_seed(seed)
    model_config = {"arch": "unet", "num_classes": num_classes, "in_channels": 5, "input_size": patch_size,
                    "use_metadata": False, "norm_mean": None, "norm_std": None}
    model = build_model(model_config)
    rng = np.random.default_rng(seed)
    head = [w for w in model.weights if "segmentation_head" in w.path and w.path.endswith("bias")]
    for w in head:  # spread the classes so that every class gets some pixels
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    os.makedirs(os.path.join(root, "checkpoints"), exist_ok=True)
    model.save_weights(os.path.join(root, "checkpoints", "best.weights.h5"))
    data_config = pipeline.PipelineConfig(task="flair1", num_classes=num_classes).to_dict()
    with open(os.path.join(root, "model_config.json"), "w") as f:
        json.dump(model_config, f)
    with open(os.path.join(root, "data_config.json"), "w") as f:
        json.dump(data_config, f)
    return root


_RUNS: dict[int, str] = {}


def _cached_run(tmp_path_factory, num_classes: int, seed: int) -> str:
    # Each importing module gets its own fixture object; the folder is shared.
    if num_classes not in _RUNS:
        _RUNS[num_classes] = make_run(str(tmp_path_factory.mktemp(f"unet{num_classes}_run")), num_classes, seed=seed)
    return _RUNS[num_classes]


@pytest.fixture(scope="session")
def unet13_run(tmp_path_factory):
    """A 13-class U-Net run folder (64 px patches)."""
    return _cached_run(tmp_path_factory, 13, seed=0)


@pytest.fixture(scope="session")
def unet19_run(tmp_path_factory):
    """A 19-class U-Net run folder (64 px patches)."""
    return _cached_run(tmp_path_factory, 19, seed=1)
