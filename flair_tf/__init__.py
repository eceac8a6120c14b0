"""flair_tf: IGN's FLAIR #1 and FLAIR #2 land-cover baselines in TensorFlow/Keras 3."""

__version__ = "0.1.0"
