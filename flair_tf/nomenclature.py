"""The FLAIR land-cover nomenclature: codes, names, colours, remaps, class weights.

Masks (`MSK_*.tif`) hold raw codes 1..19. Two model-side conventions exist:

* **13 classes (the challenges, FLAIR #1 and #2):** codes 1..12 -> indices 0..11,
  codes 13..19 -> index 12 "other" (`a[a > 13] = 13; a - 1` in the reference).
* **19 classes (IGN's later library):** code c -> index c - 1.

Class weights are those of the reference code (spec flair1 §4.1, flair2 §4.3).
"""

from __future__ import annotations

import numpy as np

# code: (name, colour) -- colours from the reference `data_display.py`.
CODES: dict[int, tuple[str, str]] = {
    1: ("building", "#db0e9a"),
    2: ("pervious surface", "#938e7b"),
    3: ("impervious surface", "#f80c00"),
    4: ("bare soil", "#a97101"),
    5: ("water", "#1553ae"),
    6: ("coniferous", "#194a26"),
    7: ("deciduous", "#46e483"),
    8: ("brushwood", "#f3a60d"),
    9: ("vineyard", "#660082"),
    10: ("herbaceous vegetation", "#55ff00"),
    11: ("agricultural land", "#fff30d"),
    12: ("plowed land", "#e4df7c"),
    13: ("swimming pool", "#3de6eb"),
    14: ("snow", "#ffffff"),
    15: ("clear cut", "#8ab3a0"),
    16: ("mixed", "#6b714f"),
    17: ("ligneous", "#c5dc42"),
    18: ("greenhouse", "#9999ff"),
    19: ("other", "#000000"),
}
NUM_CODES = 19
VALID_CODES = tuple(range(1, NUM_CODES + 1))

# Share of train pixels per code, in percent (FLAIR #1 table, spec flair1 §1.3).
TRAIN_FREQUENCY_PERCENT: dict[int, float] = {
    1: 8.14, 2: 8.25, 3: 13.72, 4: 3.47, 5: 4.88, 6: 2.74, 7: 15.38, 8: 6.95,
    9: 3.13, 10: 17.84, 11: 10.98, 12: 3.88, 13: 0.03, 14: 0.15, 15: 0.15,
    16: 0.05, 17: 0.01, 18: 0.12, 19: 0.14,
}

SUPPORTED_NUM_CLASSES = (13, 19)

# Index 12 of the 13-class convention: codes 13..19 merged.
OTHER_INDEX_13 = 12

# Reference class weights.
# FLAIR #1 challenge (legacy-torch config): "other" ignored.
FLAIR1_CLASS_WEIGHTS_13 = (1.0,) * 12 + (0.0,)
# FLAIR #1 main lib (19 classes): 0 for clear cut, mixed, ligneous, other.
FLAIR1_CLASS_WEIGHTS_19 = tuple(0.0 if c in (15, 16, 17, 19) else 1.0 for c in VALID_CODES)
# FLAIR #2 `weights_aerial_satellite`: aerial ignores "other", satellite also ignores plowed land.
FLAIR2_AERIAL_WEIGHTS_13 = (1.0,) * 12 + (0.0,)
FLAIR2_SENTINEL_WEIGHTS_13 = (1.0,) * 11 + (0.0, 0.0)


def _check_num_classes(num_classes: int) -> None:
    if num_classes not in SUPPORTED_NUM_CLASSES:
        raise ValueError(
            f"num_classes must be 13 (challenge remap) or 19 (full nomenclature). "
            f"Received: num_classes={num_classes}"
        )


def code_to_index_lut(num_classes: int = 13) -> np.ndarray:
    """Look-up table of 256 entries mapping a raw mask code to a model class index.

    Codes outside 1..19 (0, 20..255) map to 255, which no model class uses, so an
    invalid code can never silently become a valid class.
    """
    _check_num_classes(num_classes)
    lut = np.full(256, 255, dtype=np.uint8)
    codes = np.arange(1, NUM_CODES + 1)
    if num_classes == 13:
        lut[codes] = np.minimum(codes, 13) - 1
    else:
        lut[codes] = codes - 1
    return lut


def remap(codes: np.ndarray, num_classes: int = 13) -> np.ndarray:
    """Maps raw FLAIR codes (1..19) to 0-based class indices.

    Args:
      codes: integer array of raw mask codes.
      num_classes: 13 (challenge remap, codes >= 13 -> 12) or 19 (code - 1).

    Returns:
      uint8 array of the same shape.

    Raises:
      ValueError: if a code is outside 1..19.
    """
    codes = np.asarray(codes)
    bad = (codes < 1) | (codes > NUM_CODES)
    if bad.any():
        raise ValueError(
            f"Mask codes must be in 1..19; found {sorted(np.unique(codes[bad]).tolist())[:10]}"
        )
    return code_to_index_lut(num_classes)[codes.astype(np.int64)]


def class_names(num_classes: int = 13) -> list[str]:
    """Names of the model classes, index order."""
    _check_num_classes(num_classes)
    names = [CODES[c][0] for c in VALID_CODES]
    return names[:12] + ["other"] if num_classes == 13 else names


def _hex_to_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def palette(num_classes: int = 13) -> np.ndarray:
    """RGB colours of the model classes, uint8 array (num_classes, 3).

    For 13 classes, index 12 ("other") is black, as in the reference display code.
    """
    _check_num_classes(num_classes)
    colours = [_hex_to_rgb(CODES[c][1]) for c in VALID_CODES]
    if num_classes == 13:
        colours = colours[:12] + [(0, 0, 0)]
    return np.asarray(colours, dtype=np.uint8)


def code_palette() -> np.ndarray:
    """RGB colours indexed by raw code, uint8 (256, 3); index 0 and >19 are black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for code in VALID_CODES:
        pal[code] = _hex_to_rgb(CODES[code][1])
    return pal


def colorize(indices: np.ndarray, num_classes: int = 13) -> np.ndarray:
    """Renders a class-index map (H, W) as an RGB uint8 image (H, W, 3)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:num_classes] = palette(num_classes)
    return pal[np.asarray(indices, dtype=np.uint8)]


def gdal_colormap(num_classes: int = 13) -> dict[int, tuple[int, int, int, int]]:
    """The palette as a GDAL colour table ({index: (r, g, b, a)}) for rasterio."""
    return {i: (*map(int, rgb), 255) for i, rgb in enumerate(palette(num_classes))}


def class_weights(task: str, num_classes: int = 13, branch: str = "aerial") -> tuple[float, ...]:
    """The reference CE class weights.

    Args:
      task: "flair1" or "flair2".
      num_classes: 13 or 19 (19 only exists for FLAIR #1's later library).
      branch: for FLAIR #2, "aerial" (U-Net) or "sentinel" (U-TAE auxiliary head).
    """
    _check_num_classes(num_classes)
    if num_classes == 19:
        return FLAIR1_CLASS_WEIGHTS_19
    if task == "flair1":
        return FLAIR1_CLASS_WEIGHTS_13
    if task == "flair2":
        if branch == "aerial":
            return FLAIR2_AERIAL_WEIGHTS_13
        if branch == "sentinel":
            return FLAIR2_SENTINEL_WEIGHTS_13
        raise ValueError(f"branch must be 'aerial' or 'sentinel'. Received: branch={branch!r}")
    raise ValueError(f"task must be 'flair1' or 'flair2'. Received: task={task!r}")
