"""PyTorch state_dict <-> Keras weights for the FLAIR models.

Every weighted Keras layer is named with its PyTorch module path, so the
PyTorch key of a Keras variable is ``f"{layer.name}.{param}"``; `torch_key`
and `_PARAMS` below are the ONE mapping table. Layouts:

* Conv2D kernel (kh, kw, in, out) <- weight (out, in, kh, kw): ``transpose(2, 3, 1, 0)``;
* Conv2DTranspose kernel (kh, kw, out, in) <- weight (in, out, kh, kw): same transpose;
* Dense kernel (in, out) <- Linear weight (out, in) ``.T`` (Conv1d k=1: (out, in, 1));
* BatchNorm gamma/beta/moving_mean/moving_variance <- weight/bias/running_mean/running_var
  (``num_batches_tracked`` ignored);
* GroupNorm gamma/beta <- weight/bias; L-TAE query ``Q`` as is.

Supported sources (`read_state_dict`): ``.safetensors`` (a numpy reader, no
package needed), ``.npz``, and ``.pth``/``.pt``/``.ckpt`` when torch is
importable. Checkpoint key prefixes are normalised by `canonical_key`:
Lightning ``state_dict`` keys lose ``model.`` (FLAIR #1 and #2) and then
``seg_model.`` (FLAIR #1's ``SMP_Unet_meta``); ``criterion.*`` buffers (loss
class weights) are dropped.

Loading is strict: one `WeightMappingError` lists every unmapped checkpoint
tensor, every model tensor left without a value, and every shape mismatch.
"""

from __future__ import annotations

import io
import json
import struct

import keras
import numpy as np
import tensorflow as tf
from absl import logging

# Keras class name -> {Keras variable name: PyTorch parameter name}.
_PARAMS = {
    "Conv2D": {"kernel": "weight", "bias": "bias"},
    "Conv2DTranspose": {"kernel": "weight", "bias": "bias"},
    "Dense": {"kernel": "weight", "bias": "bias"},
    "BatchNormalization": {
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
    },
    "GroupNormalization": {"gamma": "weight", "beta": "bias"},
    "SequenceGroupNorm": {"gamma": "weight", "beta": "bias"},
    "LTAEAttention": {"Q": "Q"},
}
# Dense layers that are Conv1d(kernel_size=1) in the reference (weight (out, in, 1)).
_CONV1D_SUFFIXES = ("temporal_encoder.inconv",)
# Keys of a checkpoint that hold no model weight.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("criterion.",)


class WeightMappingError(ValueError):
    """A checkpoint does not match a model (unmapped, missing or mis-shaped tensors)."""


def torch_key(layer_name: str, var_name: str, class_name: str) -> str:
    """PyTorch state_dict key of a Keras variable (``encoder.conv1`` + ``kernel`` -> ``encoder.conv1.weight``)."""
    return f"{layer_name}.{_PARAMS[class_name][var_name]}"


def canonical_key(key: str) -> str | None:
    """Maps a checkpoint key to the model's module path, or None if it holds no weight.

    ``model.seg_model.encoder.conv1.weight`` (FLAIR #1 Lightning) ->
    ``encoder.conv1.weight``; ``model.enc.enc_mlp.0.weight`` -> ``enc.enc_mlp.0.weight``;
    ``model.arch_vhr.encoder.conv1.weight`` (FLAIR #2) -> ``arch_vhr.encoder.conv1.weight``.
    """
    if key.startswith("model."):
        key = key[len("model.") :]
    if key.startswith("seg_model."):
        key = key[len("seg_model.") :]
    if key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
        return None
    return key


def _var_name(variable) -> str:
    return variable.path.rsplit("/", 1)[-1]


def _to_keras(class_name: str, layer_name: str, var: str, value: np.ndarray) -> np.ndarray:
    if var == "kernel" and class_name in ("Conv2D", "Conv2DTranspose"):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if var == "kernel" and class_name == "Dense":
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        return value.T if value.ndim == 2 else value
    return value


def _to_torch(class_name: str, layer_name: str, var: str, value: np.ndarray) -> np.ndarray:
    if var == "kernel" and class_name in ("Conv2D", "Conv2DTranspose"):
        return value.transpose(3, 2, 0, 1)
    if var == "kernel" and class_name == "Dense":
        value = value.T
        if layer_name.endswith(_CONV1D_SUFFIXES):
            value = value[..., None]
        return value
    return value


def model_tensors(model: keras.Model) -> dict[str, tuple[keras.layers.Layer, keras.Variable]]:
    """PyTorch key -> (layer, variable) for every weight of ``model``.

    Raises:
      WeightMappingError: a layer with weights has no entry in the mapping table.
    """
    table = {}
    for layer in _flat_layers(model):
        class_name = type(layer).__name__
        variables = [v for v in layer.weights if "seed_generator" not in v.path]
        if not variables:
            continue
        if class_name not in _PARAMS:
            raise WeightMappingError(f"Layer {layer.name!r} ({class_name}) has weights but no PyTorch mapping.")
        for v in variables:
            table[torch_key(layer.name, _var_name(v), class_name)] = (layer, v)
    return table


def _flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def export_state_dict(model: keras.Model, num_batches_tracked: bool = False) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-named, PyTorch-laid-out numpy state_dict.

    Args:
      model: a model built by `flair_tf.models`.
      num_batches_tracked: also emit BatchNorm ``num_batches_tracked`` (int64
        0) so that ``torch.nn.Module.load_state_dict(strict=True)`` accepts it.

    Returns:
      dict of float32 numpy arrays keyed like the reference state_dict
      (without Lightning's ``model.`` prefix).
    """
    out = {}
    for key, (layer, v) in model_tensors(model).items():
        class_name = type(layer).__name__
        out[key] = _to_torch(class_name, layer.name, _var_name(v), np.asarray(keras.ops.convert_to_numpy(v)))
        if num_batches_tracked and class_name == "BatchNormalization" and key.endswith(".running_var"):
            out[f"{layer.name}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def load_state_dict(
    model: keras.Model,
    state_dict: dict[str, np.ndarray],
    prefix: str = "",
    allow_missing: bool = False,
    source: str = "state_dict",
) -> list[str]:
    """Assigns a PyTorch state_dict to ``model``, strictly.

    Args:
      model: the Keras model.
      state_dict: PyTorch key -> array (keys go through `canonical_key`).
      prefix: prepended to every (canonical) key, e.g. ``"arch_vhr."`` to load
        an smp U-Net into U-T&T's aerial branch.
      allow_missing: accept model weights absent from ``state_dict`` (partial
        initialisation); every checkpoint tensor must still map.
      source: name of the file, for error messages.

    Returns:
      the list of model keys that were assigned.

    Raises:
      WeightMappingError: listing all unmapped, missing and mis-shaped tensors.
    """
    table = model_tensors(model)
    unexpected, mismatched, assignments = [], [], []
    for raw_key, value in state_dict.items():
        key = canonical_key(raw_key)
        if key is None:
            continue
        key = prefix + key
        if key not in table:
            unexpected.append(raw_key)
            continue
        layer, v = table[key]
        value = _to_keras(type(layer).__name__, layer.name, _var_name(v), np.asarray(value))
        if tuple(value.shape) != tuple(v.shape):
            mismatched.append(f"{raw_key}: checkpoint {tuple(np.shape(value))} (Keras layout) vs model {tuple(v.shape)}")
            continue
        assignments.append((key, v, value))
    assigned = {k for k, _, _ in assignments}
    missing = [] if allow_missing else sorted(set(table) - assigned)
    if unexpected or mismatched or missing:
        parts = [f"{source} does not match model {model.name!r}:"]
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensors have no model weight: {', '.join(sorted(unexpected))}")
        if missing:
            parts.append(f"{len(missing)} model weights are not in the checkpoint: {', '.join(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched)}")
        parts.append(
            "Check that the checkpoint and the model configuration (architecture, num_classes, "
            "in_channels, use_metadata) agree."
        )
        raise WeightMappingError("\n  ".join(parts))
    for _, v, value in assignments:
        v.assign(np.asarray(value, dtype=v.dtype))
    logging.info("Loaded %d tensors from %s into %s.", len(assignments), source, model.name)
    return sorted(assigned)


# ----------------------------------------------------------------------------
# ImageNet ResNet34 encoder weights.


def patch_first_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """smp's rule to adapt a 3-channel first conv (out, 3, kh, kw) to ``in_channels``.

    ``in_channels == 1``: sum over the RGB kernels. Otherwise
    ``new[:, i] = w[:, i % 3] * 3 / in_channels`` (for 5 channels: R, G, B, R, G
    kernels, all x 3/5).
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise WeightMappingError(f"First conv has {weight.shape[1]} input channels; only 3-channel weights can be adapted.")
    if in_channels == 1:
        return weight.sum(axis=1, keepdims=True)
    idx = np.arange(in_channels) % 3
    return (weight[:, idx] * (3.0 / in_channels)).astype(weight.dtype)


def encoder_prefix(model: keras.Model) -> str:
    """Module path of the ResNet34 encoder inside ``model`` (``encoder.`` or ``arch_vhr.encoder.``)."""
    names = {layer.name for layer in _flat_layers(model)}
    for prefix in ("encoder.", "arch_vhr.encoder."):
        if f"{prefix}conv1" in names:
            return prefix
    raise WeightMappingError(f"Model {model.name!r} has no ResNet34 encoder (no layer 'encoder.conv1').")


def load_encoder_weights(model: keras.Model, state_dict: dict[str, np.ndarray], source: str = "encoder weights") -> int:
    """Loads torchvision/timm/smp ResNet34 ImageNet weights into the model's encoder.

    The classifier (``fc.*``) is dropped, keys may carry an ``encoder.`` prefix
    (smp), and the first conv is adapted with `patch_first_conv`. Every encoder
    weight must be present; the rest of the model is left untouched.

    Returns:
      the number of tensors assigned.
    """
    prefix = encoder_prefix(model)
    in_channels = model.get_layer(f"{prefix}conv1").kernel.shape[2]
    cleaned = {}
    for key, value in state_dict.items():
        key = key[len("encoder.") :] if key.startswith("encoder.") else key
        if key.startswith("fc.") or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "conv1.weight":
            value = patch_first_conv(np.asarray(value), in_channels)
        cleaned[key] = value
    encoder_keys = {k for k in model_tensors(model) if k.startswith(prefix)}
    missing = sorted(k for k in encoder_keys if k[len(prefix) :] not in cleaned)
    if missing:
        raise WeightMappingError(
            f"{source} lacks {len(missing)} ResNet34 encoder tensors: {', '.join(missing)}. "
            "Expected torchvision/timm 'resnet34' keys (conv1.weight, bn1.*, layer1.0.conv1.weight, ...)."
        )
    return len(load_state_dict(model, cleaned, prefix=prefix, allow_missing=True, source=source))


# ----------------------------------------------------------------------------
# Files.

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file with numpy (8-byte header length, JSON header, raw data)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    buffer = memoryview(data)[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = info["dtype"]
        if dtype == "BF16":
            raw = np.frombuffer(buffer[start:end], np.uint16).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        elif dtype in _ST_DTYPES:
            arr = np.frombuffer(buffer[start:end], _ST_DTYPES[dtype])
        else:
            raise WeightMappingError(f"{path}: tensor {key!r} has unsupported dtype {dtype}.")
        out[key] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes numpy arrays as a ``.safetensors`` file (readable by the safetensors package and torch)."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        arr = np.asarray(tensors[key], order="C")  # ascontiguousarray would make scalars 1-D
        if arr.dtype not in names:
            raise WeightMappingError(f"Cannot write {key!r} of dtype {arr.dtype} to safetensors.")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _read_torch(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 (optional dependency, imported lazily)
    except ImportError as e:
        raise WeightMappingError(
            f"{path} is a PyTorch pickle and torch is not installed. Install torch (CPU build), or convert the "
            "file to .safetensors/.npz on a machine that has it."
        ) from e
    with tf.io.gfile.GFile(path, "rb") as f:
        buffer = io.BytesIO(f.read())
    try:
        obj = torch.load(buffer, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 (torch raises many types here)
        raise WeightMappingError(
            f"Cannot read {path} with torch.load(weights_only={not allow_pickle}): {e}. If the file comes from a "
            "source you trust (e.g. an IGN Lightning checkpoint with hyper-parameters), retry with allow_pickle=True "
            "(--allow_pickle)."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightMappingError(f"{path} holds a {type(obj).__name__}, expected a state_dict (dict of tensors).")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in obj.items()
            if hasattr(v, "detach")}


def read_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a PyTorch-named state_dict from ``.safetensors``, ``.npz``, or ``.pth``/``.pt``/``.ckpt`` (torch).

    Lightning checkpoints are unwrapped (their ``state_dict`` entry).
    """
    lower = path.lower()
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Weights file {path} does not exist.")
    if lower.endswith(".safetensors"):
        return read_safetensors(path)
    if lower.endswith(".npz"):
        with tf.io.gfile.GFile(path, "rb") as f:
            with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    if lower.endswith((".pth", ".pt", ".ckpt", ".bin")):
        return _read_torch(path, allow_pickle)
    raise WeightMappingError(f"{path}: unknown weights format; expected .safetensors, .npz, .pth, .pt or .ckpt.")


def load_checkpoint(model: keras.Model, path: str, prefix: str = "", allow_missing: bool = False,
                    allow_pickle: bool = False) -> None:
    """Initialises ``model`` from a file: a Keras ``.weights.h5`` or any `read_state_dict` format.

    Args:
      model: the Keras model.
      path: weights file (local or gs://).
      prefix: see `load_state_dict`.
      allow_missing: see `load_state_dict`.
      allow_pickle: let torch unpickle arbitrary objects (trusted files only).
    """
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return
    load_state_dict(model, read_state_dict(path, allow_pickle), prefix, allow_missing, source=path)


def load_encoder_file(model: keras.Model, path: str, allow_pickle: bool = False) -> int:
    """`load_encoder_weights` from a file (``.safetensors``, ``.npz``, ``.pth``)."""
    return load_encoder_weights(model, read_state_dict(path, allow_pickle), source=path)
