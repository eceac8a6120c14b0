"""flair_tf: TensorFlow/Keras reimplementation of IGN's FLAIR #1 and FLAIR #2 baselines."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

# TensorFlow is deliberately NOT a base requirement: a TPU VM ships its own
# `tensorflow-tpu` build, and listing `tensorflow` here would make pip install
# the plain wheel on top of it. Pick the extra that matches the machine.
TF_RANGE = ">=2.16,<2.22"

setup(
    name="flair_tf",
    version="0.1.0",
    description=(
        "FLAIR #1 / FLAIR #2 land-cover segmentation (U-Net/ResNet34, U-TAE, "
        "U-T&T) in TensorFlow/Keras 3: TFRecord conversion, tf.data pipelines, "
        "tf.distribute training, official mIoU, georeferenced prediction."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flair_tf", "flair_tf.*"]),
    install_requires=[
        "absl-py>=1.0",
        "keras>=3.0",
        "numpy>=1.26",
        "rasterio>=1.3",
        "tensorboard>=2.16",
        "h5py>=3.8",
        "pillow>=9.0",
        # hardware CRC32C for writing TFRecords (TensorFlow's own is portable code)
        "google-crc32c>=1.5",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu{TF_RANGE}"],
        "gpu": [f"tensorflow[and-cuda]{TF_RANGE}"],
        # tensorflow-tpu has no 2.21 release; TPU VMs run 2.20 (spec/stack.md section 2).
        "tpu": ["tensorflow-tpu>=2.16,<2.21"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.1",
            "psutil>=5.9",
            # Reference parity (tests only; the package never imports torch).
            # torch 2.13.0's CPU build cannot import torchvision (operator
            # torchvision::nms does not exist), which smp and timm need, so the
            # parity stack is the torch/torchvision pair that lies on this disk.
            "torch==2.14.1",
            "torchvision==0.29.1",
            "segmentation-models-pytorch==0.6.0",
            "safetensors>=0.4",
        ],
    },
    entry_points={
        "console_scripts": [
            "flair-tf-train=flair_tf.train:run",
            "flair-tf-evaluate=flair_tf.evaluate:run",
            "flair-tf-predict=flair_tf.predict:run",
            "flair-tf-export=flair_tf.export:run",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: GIS",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
