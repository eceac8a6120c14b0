"""A synthetic FLAIR #1 / #2 tree in the exact released format, with learnable labels.

Real FLAIR rasters are tens of gigabytes and not redistributable in tests, so the
tests, the demo and the benchmarks run on trees written by `make_tree`. Format
(spec flair1 §1, flair2 §1): 5-band uint8 Lambert-93 GeoTIFF patches covering
102.4 m at any pixel count, 1-band masks with codes 1..19, the metadata JSON,
and for FLAIR #2 one Sentinel-2 super-area per zone (T x 10 x H x W uint16,
T x 2 x H x W uint8 snow/cloud probabilities, the product names) plus the
centroid JSON.

Each zone is a vector scene in metres (`synthetic_scene.Scene`: parcels, roads,
a river, buildings, yards, pools, rare objects), rasterised at the aerial
resolution for the patches (`synthetic_scene.render_aerial` gives each class its
colour, NIR, elevation and texture, plus noise and per-domain radiometric
shifts) and, supersampled, at 10 m for the Sentinel-2 class fractions, so both
modalities agree everywhere. Each class has a Sentinel-2 temporal (phenology)
signature over the ten bands (`class_temporal_signature`); parcels get their
own spectral gain; some dates are cloudy or snowy, with high probabilities in
the masks and visibly perturbed reflectance. Class frequencies approximate
`nomenclature.TRAIN_FREQUENCY_PERCENT`; codes 13-19 are present but rare.

Everything is vectorised numpy and every random draw comes from a generator
seeded by (seed, domain, zone), so a seed always produces byte-identical files.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import zlib
from typing import Any

import numpy as np
from absl import logging

from flair_tf import progress
from flair_tf.data import layout, synthetic_scene
from flair_tf.data.synthetic_scene import value_noise

PATCH_METRES = 102.4  # the real footprint: 512 px at 0.2 m
SENTINEL_PIXEL_M = 10.0

# Train-only domains of FLAIR #1/#2 (the 40 train+val domains minus the 8 official val ones).
TRAIN_DOMAINS = (
    "D006_2020", "D007_2020", "D008_2019", "D009_2019", "D013_2020", "D016_2020", "D017_2018",
    "D021_2020", "D023_2020", "D030_2021", "D032_2019", "D033_2021", "D034_2021", "D035_2020",
    "D038_2021", "D041_2021", "D044_2020", "D046_2019", "D049_2020", "D051_2019", "D052_2019",
    "D055_2018", "D060_2021", "D063_2019", "D072_2019", "D074_2020", "D077_2021", "D078_2021",
    "D080_2021", "D081_2020", "D086_2020", "D091_2021",
)
# Rough base altitude (m) of mountainous departements; others get 20..400 m.
_MOUNTAIN_ALTITUDE = {"004": 1450, "005": 1500, "006": 1000, "009": 900, "038": 1100,
                      "066": 1200, "073": 1500, "074": 1300, "063": 800, "015": 900}
_CAMERAS = ("UCE-M3-f120-s06", "UCE-M3-f120-s07", "UCE-M3-f120-s08", "UCE-M3-f120",
            "UCE-M3-f100", "CAMERA#017", "CAMERA#020", "CAMERA#030", "CAMERA#034")
_TILES = ("30TXT", "30TYP", "31TCJ", "31TDJ", "31TFK", "31TGL", "31UDP", "31UEQ", "32TLQ",
          "32ULU", "30UXV", "31TEN")

# Sentinel-2 end-member spectra (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12), reflectance x 10^4.
_S2 = {
    "veg": [300, 620, 340, 1050, 2800, 3450, 3800, 3900, 1950, 900],
    "conifer": [220, 420, 260, 720, 1800, 2250, 2450, 2550, 1200, 560],
    "dry": [620, 900, 1150, 1450, 1900, 2150, 2350, 2450, 3050, 2250],
    "soil": [950, 1250, 1550, 1850, 2050, 2200, 2300, 2400, 3250, 2650],
    "plowed": [620, 860, 1060, 1300, 1480, 1640, 1750, 1850, 2620, 2120],
    "urban": [820, 960, 1060, 1160, 1260, 1350, 1420, 1460, 1720, 1520],
    "roof": [950, 1050, 1250, 1350, 1420, 1480, 1520, 1580, 1950, 1720],
    "water": [620, 560, 360, 260, 210, 180, 150, 140, 80, 60],
    "snow": [9100, 9000, 8900, 8700, 8500, 8300, 8100, 8000, 900, 700],
    "pool": [1550, 1350, 820, 620, 500, 420, 360, 340, 150, 100],
    "plastic": [2250, 2350, 2450, 2550, 2650, 2700, 2800, 2800, 2600, 2200],
    "cloud": [7600, 7500, 7400, 7350, 7250, 7200, 7150, 7100, 5600, 4100],
}
_S2 = {k: np.asarray(v, np.float32) for k, v in _S2.items()}



def _bump(doy: np.ndarray, up: float, down: float, width: float = 12.0) -> np.ndarray:
    """Smooth 0..1 window: rises around `up`, falls around `down` (days of year)."""
    return 1.0 / (1.0 + np.exp(-(doy - up) / width)) / (1.0 + np.exp((doy - down) / width))


def class_temporal_signature(doy: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Sentinel-2 reflectance of each code over the dates: float32 (T, 20, 10).

    Args:
      doy: day of year of each date, shape (T,).
      shift: phenology shift in days (domain-to-domain variation).
    """
    t = np.asarray(doy, np.float32)[:, None] - shift
    s = _S2
    leaf = _bump(t, 110, 295)                                  # deciduous leaf-on
    herb = 0.45 + 0.45 * _bump(t, 60, 175, 15) + 0.2 * _bump(t, 250, 320, 15)
    crop = _bump(t, 75, 185, 10)                               # sown in spring, harvested in July
    ripe = _bump(t, 170, 205, 6)                               # yellow before harvest
    vine = _bump(t, 130, 275)
    winter = 1.0 - _bump(t, 115, 320, 8)                       # snow season for class 14
    sig = np.zeros((t.shape[0], 20, 10), np.float32)
    sig[:, 1] = s["roof"]
    sig[:, 2] = (0.35 + 0.3 * herb) * s["veg"] + (0.65 - 0.3 * herb) * s["urban"]
    sig[:, 3] = s["urban"]
    sig[:, 4] = 0.9 * s["soil"] + 0.1 * _bump(t, 80, 150) * s["veg"]
    sig[:, 5] = s["water"] + 0.03 * _bump(t, 160, 250) * s["veg"]  # summer algae
    sig[:, 6] = 0.9 * s["conifer"] + 0.1 * leaf * s["veg"]
    sig[:, 7] = leaf * s["veg"] + (1 - leaf) * (0.6 * s["dry"] + 0.4 * s["conifer"] * 0.6)
    sig[:, 8] = 0.7 * (leaf * s["veg"] + (1 - leaf) * s["dry"]) + 0.3 * s["dry"]
    sig[:, 9] = 0.65 * vine * s["veg"] + (1 - 0.65 * vine) * s["soil"]
    sig[:, 10] = herb * s["veg"] + (1 - herb) * s["dry"]
    sig[:, 11] = crop * s["veg"] + ripe * s["dry"] + np.clip(1 - crop - ripe, 0, 1) * s["soil"]
    sig[:, 12] = 0.8 * s["plowed"] + 0.2 * (_bump(t, 290, 400) + _bump(t, -80, 40)) * s["veg"]
    sig[:, 13] = s["pool"]
    sig[:, 14] = winter * s["snow"] + (1 - winter) * (0.5 * s["dry"] + 0.5 * s["soil"])
    sig[:, 15] = 0.5 * s["soil"] + 0.3 * s["dry"] + 0.2 * _bump(t, 100, 250) * s["veg"]
    sig[:, 16] = 0.5 * sig[:, 6] + 0.5 * sig[:, 7]
    sig[:, 17] = 0.5 * leaf * s["veg"] + (1 - 0.5 * leaf) * s["dry"]
    sig[:, 18] = s["plastic"]
    sig[:, 19] = 0.6 * s["urban"] + 0.4 * s["dry"]
    return sig


# ---------------------------------------------------------------------------------------
# Domains, zones, Sentinel-2 series.

def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


class _Domain:
    """Per-domain constants: location, year, camera, radiometric shift, S2 tile."""

    def __init__(self, name: str, group: str, seed: int):
        rng = np.random.default_rng([seed, _crc(name)])
        self.name, self.group = name, group
        self.year = int(name.split("_")[1])
        dep = name[1:4]
        self.altitude = float(_MOUNTAIN_ALTITUDE.get(dep, rng.uniform(20, 400)))
        self.mountain = self.altitude > 700
        self.x0 = float(np.round(rng.uniform(180_000, 1_000_000), -1))
        self.y0 = float(np.round(rng.uniform(6_200_000, 7_000_000), -1))
        self.camera = _CAMERAS[rng.integers(len(_CAMERAS))]
        self.tile = _TILES[rng.integers(len(_TILES))]
        self.orbit = int(rng.integers(1, 144))
        self.gain = (1.0 + rng.normal(0, 0.06) + rng.normal(0, 0.025, 4)).astype(np.float32)
        self.offset = rng.normal(0, 6, 4).astype(np.float32)
        self.pheno_shift = float(rng.normal(0, 10))
        self.s2_gain = (1.0 + rng.normal(0, 0.04) + rng.normal(0, 0.02, 10)).astype(np.float32)
        self.zone_rng = np.random.default_rng([seed, _crc(name), 1])


def _zone_names(domain: _Domain, count: int) -> list[str]:
    rng = domain.zone_rng
    numbers = np.sort(rng.choice(np.arange(1, 41), size=count, replace=count > 40))
    letters, probs = list(synthetic_scene.LETTER_PROB), np.array(list(synthetic_scene.LETTER_PROB.values()))
    names = []
    for n in numbers:
        pair = rng.choice(letters, size=2, p=probs / probs.sum())
        name = f"Z{int(n)}_{pair[0]}{pair[1]}"
        while name in names:  # only with more than 40 zones
            name = f"Z{int(n) + 40 * len(names)}_{pair[0]}{pair[1]}"
        names.append(name)
    return names


def _product_names(rng: np.random.Generator, dates: list[datetime.date], domain: _Domain) -> list[str]:
    baseline = {2018: "0206", 2019: "0213", 2020: "0214", 2021: "0300"}.get(domain.year, "0400")
    out = []
    for d in dates:
        sat = "A" if rng.random() < 0.5 else "B"
        sensed = f"{d:%Y%m%d}T10{rng.integers(30, 60):02d}{rng.integers(0, 60):02d}"
        proc_day = d + datetime.timedelta(days=int(rng.integers(0, 2)))
        proc = f"{proc_day:%Y%m%d}T{rng.integers(11, 18):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
        out.append(f"S2{sat}_MSIL2A_{sensed}_N{baseline}_R{domain.orbit:03d}_T{domain.tile}_{proc}")
    return out


_SPECTRAL_SLOPE = np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.32, 0.26, 0.25, 0.1, 0.05], np.float32)


def _sentinel_series(scene: synthetic_scene.Scene, rng: np.random.Generator, domain: _Domain, height: int,
                     width: int, num_dates: int, key: int):
    """Renders one zone's super-area: data (T,10,H,W) uint16, masks (T,2,H,W) uint8, dates."""
    ss = 3  # supersampling: class fractions of each 10 m pixel
    u = (np.arange(width * ss) + 0.5) * (SENTINEL_PIXEL_M / ss)
    v = (np.arange(height * ss) + 0.5) * (SENTINEL_PIXEL_M / ss)
    label, inst = scene.rasterize(u, v)
    cells = ((np.arange(height * ss)[:, None] // ss) * width
             + np.arange(width * ss)[None, :] // ss)
    frac = np.bincount((cells * 20 + label).ravel(), minlength=height * width * 20)
    frac = frac.reshape(height * width, 20).astype(np.float32) / (ss * ss)
    # Each parcel/object has its own brightness and spectral tilt (crop variety, soil, roof
    # material): a per-instance gain, averaged over the 10 m pixel.
    n_inst = len(scene.inst_code)
    inst_gain = (1.0 + 0.12 * rng.standard_normal((n_inst, 1), dtype=np.float32)
                 + 0.06 * rng.standard_normal((n_inst, 10), dtype=np.float32))
    pixel_gain = inst_gain[inst].reshape(height, ss, width, ss, 10).mean(axis=(1, 3))

    days = 366 if domain.year % 4 == 0 else 365
    doy = np.sort(rng.choice(np.arange(1, days + 1), size=num_dates, replace=False))
    dates = [datetime.date(domain.year, 1, 1) + datetime.timedelta(days=int(d) - 1) for d in doy]
    sig = class_temporal_signature(doy, domain.pheno_shift) * domain.s2_gain  # (T, 20, 10)
    # One GEMM (P, 20) x (20, T*10), then (T, H, W, 10).
    data = frac @ sig.astype(np.float32).transpose(1, 0, 2).reshape(20, num_dates * 10)
    data = data.reshape(height, width, num_dates, 10).transpose(2, 0, 1, 3)
    uu = ((np.arange(width) + 0.5) * SENTINEL_PIXEL_M)[None, :]
    vv = ((np.arange(height) + 0.5) * SENTINEL_PIXEL_M)[:, None]
    texture = 1.0 + 0.05 * value_noise(uu, vv, 30.0, key + 11)[..., None] \
        + 0.04 * rng.standard_normal((height, width, 10), dtype=np.float32)
    data *= texture * pixel_gain
    data *= 1.0 + 0.04 * rng.standard_normal((num_dates, height, width, 1), dtype=np.float32)
    data += rng.uniform(0, 250, (num_dates, 1, 1, 1)).astype(np.float32) * _SPECTRAL_SLOPE

    masks = np.zeros((num_dates, 2, height, width), np.float32)
    winter = (doy < 95) | (doy > 320)
    for t in range(num_dates):
        for channel, chance, target in ((0, 0.6 if domain.mountain else 0.05, _S2["snow"]),
                                        (1, 0.3, _S2["cloud"])):
            if channel == 0 and not winter[t]:
                continue
            if rng.random() >= chance:
                continue
            cover = rng.uniform(0.1, 1.0)
            field = 0.7 * value_noise(uu, vv, 400.0, key + 100 + 2 * t + channel) \
                + 0.3 * value_noise(uu, vv, 90.0, key + 1000 + 2 * t + channel)
            threshold = np.quantile(field, 1.0 - cover)
            proba = np.clip(55.0 + (field - threshold) * 450.0, 0.0, 100.0)
            alpha = np.clip((proba - 15.0) / 85.0, 0.0, 1.0)[..., None]
            data[t] = data[t] * (1 - alpha) + alpha * target * rng.uniform(0.85, 1.05)
            masks[t, channel] = proba
        # Snow-class pixels are snowy in winter; the snow mask agrees.
        if winter[t]:
            masks[t, 0] = np.maximum(masks[t, 0], 100.0 * frac[:, 14].reshape(height, width))
    # Clear pixels carry small spurious probabilities, as Sen2Cor's do.
    speckle = (rng.random(masks.shape, dtype=np.float32) < 0.02) \
        * (1 + 29 * rng.random(masks.shape, dtype=np.float32))
    masks = np.maximum(masks, speckle)
    data = np.clip(np.rint(data), 0, 20000).astype(np.uint16).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(data), np.rint(masks).astype(np.uint8), dates


# ---------------------------------------------------------------------------------------
# Writing.

def _write_tif(path: str, array: np.ndarray, transform: tuple, crs) -> None:
    import rasterio  # pylint: disable=g-import-not-at-top
    from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top

    bands = array.shape[0]
    profile = dict(driver="GTiff", height=array.shape[1], width=array.shape[2], count=bands,
                   dtype="uint8", crs=crs, transform=Affine(*transform), compress="lzw")
    if bands > 1:
        profile["photometric"] = "minisblack"
        profile["interleave"] = "pixel"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def _choose_domains(task: str, num_domains: int, num_val_domains: int | None,
                    num_test_domains: int) -> list[tuple[str, str]]:
    if num_val_domains is None:
        num_val_domains = 0 if num_domains < 2 else min(len(layout.OFFICIAL_VAL_DOMAINS),
                                                        max(1, num_domains // 4))
    num_train = num_domains - num_val_domains
    test_pool = layout.FLAIR1_TEST_DOMAINS if task == "flair1" else layout.FLAIR2_TEST_DOMAINS
    if num_val_domains > len(layout.OFFICIAL_VAL_DOMAINS) or num_train < 0 \
            or num_train > len(TRAIN_DOMAINS) or num_test_domains > len(test_pool):
        raise ValueError(
            f"at most {len(TRAIN_DOMAINS)} train, {len(layout.OFFICIAL_VAL_DOMAINS)} val and "
            f"{len(test_pool)} test domains exist. Received: num_domains={num_domains}, "
            f"num_val_domains={num_val_domains}, num_test_domains={num_test_domains}")
    trainval = sorted(TRAIN_DOMAINS[:num_train] + layout.OFFICIAL_VAL_DOMAINS[:num_val_domains])
    return [(d, "trainval") for d in trainval] + [(d, "test") for d in test_pool[:num_test_domains]]


def make_tree(
    root: str,
    task: str = "flair1",
    num_domains: int = 4,
    zones_per_domain: int = 2,
    patches_per_zone: int = 4,
    patch_size: int = 512,
    seed: int = 0,
    num_val_domains: int | None = None,
    num_test_domains: int = 1,
    num_dates: tuple[int, int] = (20, 40),
    max_sentinel_crop: int = 112,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Writes a synthetic FLAIR tree in the released format.

    Args:
      root: output folder (created).
      task: "flair1" or "flair2" (adds the Sentinel-2 super-areas and centroid JSON).
      num_domains: train + val domains (real names; the first `num_val_domains`
        official validation domains, D004_2021 first, and train domains).
      zones_per_domain: zones per domain (the same number in test domains).
      patches_per_zone: adjacent patches per zone, laid out on a near-square grid.
      patch_size: pixels per side; the footprint stays 102.4 m, so the pixel is
        102.4 / patch_size m (0.2 m at the real 512).
      seed: the same seed writes byte-identical files.
      num_val_domains: official validation domains among `num_domains`; None
        means a quarter (at least one when `num_domains` >= 2).
      num_test_domains: domains of the test folders (ids after all train ids).
      num_dates: (min, max) Sentinel-2 acquisitions per zone (FLAIR #2).
      max_sentinel_crop: the largest Sentinel crop (px) that must fit around every
        patch centroid; sets the super-area margin (40 for the baseline, up to 112).
      overwrite: replace an existing tree in `root` (otherwise refuse).
      show_progress: print a progress bar.

    Returns:
      A summary: counts per split, domains, zones, class histogram, seconds.
    """
    if task not in layout.TASKS:
        raise ValueError(f"task must be one of {layout.TASKS}. Received: task={task!r}")
    if patch_size < 8 or patch_size > 2048:
        raise ValueError(f"patch_size must be in 8..2048. Received: patch_size={patch_size}")
    if not 1 <= num_dates[0] <= num_dates[1] <= 365:
        raise ValueError(f"num_dates must be (min, max) with 1 <= min <= max <= 365. "
                         f"Received: num_dates={num_dates}")
    from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top

    start = time.monotonic()
    roles = ("aerial", "labels", "sen") if task == "flair2" else ("aerial", "labels")
    folders = {(r, g): layout.released_folder(task, r, g) for r in roles for g in ("trainval", "test")}
    existing = [f for f in folders.values() if os.path.exists(os.path.join(root, f))]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds {existing}; pass overwrite=True to replace")
    import shutil  # pylint: disable=g-import-not-at-top

    for f in existing:
        shutil.rmtree(os.path.join(root, f))
    os.makedirs(root, exist_ok=True)
    crs = CRS.from_epsg(2154)
    px = PATCH_METRES / patch_size
    margin = (max_sentinel_crop // 2 + 4) if task == "flair2" else 0
    domains = [_Domain(name, group, seed) for name, group in
               _choose_domains(task, num_domains, num_val_domains, num_test_domains)]
    plan = [(d, z) for d in domains for z in _zone_names(d, zones_per_domain)]
    metadata: dict[str, dict] = {}
    centroids: dict[str, list[int]] = {}
    histogram = {"trainval": np.zeros(20, np.int64), "test": np.zeros(20, np.int64)}
    counts = {"trainval": 0, "test": 0}
    sentinel_dates, cloudy = [], 0
    next_id = 1
    bar = progress.Progress(total=len(plan) * patches_per_zone, desc=f"synthetic {task}",
                            unit="patch", enabled=show_progress)
    for domain, zone in plan:
        key = _crc(f"{domain.name}-{zone}") ^ seed
        rng = np.random.default_rng([seed, _crc(domain.name), _crc(zone)])
        cols = int(math.ceil(math.sqrt(patches_per_zone)))
        rows = int(math.ceil(patches_per_zone / cols))
        s_h = int(math.ceil(rows * PATCH_METRES / SENTINEL_PIXEL_M)) + 2 * margin
        s_w = int(math.ceil(cols * PATCH_METRES / SENTINEL_PIXEL_M)) + 2 * margin
        extent_w = max(s_w * SENTINEL_PIXEL_M, cols * PATCH_METRES)
        extent_h = max(s_h * SENTINEL_PIXEL_M, rows * PATCH_METRES)
        scene = synthetic_scene.Scene(rng, extent_w, extent_h, zone.split("_")[1], domain.mountain, key)
        x0 = domain.x0 + float(np.round(rng.uniform(0, 30_000), -1))
        y_top = domain.y0 - float(np.round(rng.uniform(0, 30_000), -1))
        month = int(rng.integers(4, 11))
        day = int(rng.integers(1, 29))
        hour, minute = int(rng.integers(7, 14)), int(rng.integers(0, 60))
        z_zone = domain.altitude + rng.normal(0, 0.1 * domain.altitude + 20)
        group = domain.group
        aerial_dir = os.path.join(root, folders[("aerial", group)], domain.name, zone, "img")
        label_dir = os.path.join(root, folders[("labels", group)], domain.name, zone, "msk")
        os.makedirs(aerial_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for k in range(patches_per_zone):
            pid = f"{next_id:06d}"
            next_id += 1
            r, c = divmod(k, cols)
            left = margin * SENTINEL_PIXEL_M + c * PATCH_METRES
            top = margin * SENTINEL_PIXEL_M + r * PATCH_METRES
            u = (left + (np.arange(patch_size) + 0.5) * px).astype(np.float32)
            v = (top + (np.arange(patch_size) + 0.5) * px).astype(np.float32)
            label, inst = scene.rasterize(u, v)
            brightness = np.float32(rng.normal(0, 3))
            image = synthetic_scene.render_aerial(scene, label, inst, u, v, domain.gain,
                                   domain.offset + brightness, rng, key + 17 * k)
            transform = (px, 0.0, x0 + left, 0.0, -px, y_top - top)
            _write_tif(os.path.join(aerial_dir, f"IMG_{pid}.tif"), image.transpose(2, 0, 1),
                       transform, crs)
            _write_tif(os.path.join(label_dir, f"MSK_{pid}.tif"), label[None], transform, crs)
            histogram[group] += np.bincount(label.ravel(), minlength=20)
            counts[group] += 1
            minute_k = minute + k // 3
            metadata[f"IMG_{pid}"] = {
                "domain": domain.name,
                "zone": zone,
                "patch_centroid_x": round(x0 + left + PATCH_METRES / 2, 2),
                "patch_centroid_y": round(y_top - top - PATCH_METRES / 2, 2),
                "patch_centroid_z": round(float(max(z_zone + rng.normal(0, 4), -1.5)), 4),
                "date": f"{domain.year}-{month:02d}-{day:02d}",
                "time": f"{hour + minute_k // 60:02d}h{minute_k % 60:02d}",
                "camera": domain.camera,
            }
            centroids[f"IMG_{pid}.tif"] = [int((top + PATCH_METRES / 2) // SENTINEL_PIXEL_M),
                                           int((left + PATCH_METRES / 2) // SENTINEL_PIXEL_M)]
            bar.update()
        if task == "flair2":
            t = int(rng.integers(num_dates[0], num_dates[1] + 1))
            data, masks, dates = _sentinel_series(scene, rng, domain, s_h, s_w, t, key)
            sen_dir = os.path.join(root, folders[("sen", group)], domain.name, zone, "sen")
            os.makedirs(sen_dir, exist_ok=True)
            base = os.path.join(sen_dir, f"SEN2_sp_{domain.name}-{zone}")
            np.save(base + "_data.npy", data)
            np.save(base + "_masks.npy", masks)
            with open(base + "_products.txt", "w") as f:
                f.write("\n".join(_product_names(rng, dates, domain)) + "\n")
            sentinel_dates.append(t)
            cover = (masks >= 60).mean(axis=(2, 3)).sum(axis=1)
            cloudy += int((cover >= 0.5).sum())
    bar.close()
    meta_name = "flair-1_metadata_aerial.json" if task == "flair1" else "flair_aerial_metadata.json"
    with open(os.path.join(root, meta_name), "w") as f:
        json.dump(metadata, f)
    if task == "flair2":
        with open(os.path.join(root, "flair-2_centroids_sp_to_patch.json"), "w") as f:
            json.dump(centroids, f)
    trainval_domains = [d.name for d in domains if d.group == "trainval"]
    val = [d for d in trainval_domains if d in layout.OFFICIAL_VAL_DOMAINS]
    summary = {
        "task": task,
        "root": root,
        "patch_size": patch_size,
        "pixel_size_m": px,
        "seed": seed,
        "patches": {"trainval": counts["trainval"], "test": counts["test"]},
        "domains": {"train": [d for d in trainval_domains if d not in val], "val": val,
                    "test": [d.name for d in domains if d.group == "test"]},
        "zones": len(plan),
        "class_pixels": {g: {int(c): int(n) for c, n in enumerate(h) if n} for g, h in histogram.items()},
        "seconds": round(time.monotonic() - start, 2),
    }
    if task == "flair2":
        summary["sentinel"] = {"super_areas": len(sentinel_dates), "dates_min": min(sentinel_dates),
                               "dates_max": max(sentinel_dates), "cloudy_or_snowy_dates": cloudy,
                               "margin_px": margin}
    logging.info("wrote %s tree in %s: %s", task, root, summary["patches"])
    return summary


def make_raster(
    path: str,
    width: int,
    height: int,
    patch_size: int = 512,
    domain: str = "D004_2021",
    zone: str = "Z1_UA",
    seed: int = 0,
    label_path: str | None = None,
    nodata_rows: int = 0,
) -> dict[str, Any]:
    """Writes one large georeferenced 5-band scene, rendered like the tree's patches.

    The pixel size is that of a tree of the same `patch_size` (102.4 m / patch_size),
    so a model trained on that tree sees the same ground resolution: this is the
    "whole ortho-image" input of `flair_tf.predict` raster mode.

    Args:
      path: output GeoTIFF (5 bands uint8, EPSG:2154, LZW, tiled).
      width, height: raster size in pixels (any size, not a multiple of anything).
      patch_size: the tree patch size whose ground resolution is reproduced.
      domain, zone: names setting the radiometry and the landscape type (zone letters).
      seed: the same seed writes the same raster.
      label_path: if given, also write the 1-band label raster (raw codes 1..19).
      nodata_rows: this many rows at the bottom are set to 0 on every band (a
        nodata strip, as at the edge of a real ortho-mosaic); the label there is 0.

    Returns:
      dict with the path(s), size, pixel size and class histogram.
    """
    import rasterio  # pylint: disable=g-import-not-at-top
    from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top
    from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top

    dom = _Domain(domain, "trainval", seed)
    key = _crc(f"{domain}-{zone}-raster") ^ seed
    rng = np.random.default_rng([seed, _crc(domain), _crc(zone), 7])
    px = PATCH_METRES / patch_size
    scene = synthetic_scene.Scene(rng, width * px, height * px, zone.split("_")[1], dom.mountain, key)
    u = ((np.arange(width) + 0.5) * px).astype(np.float32)
    v = ((np.arange(height) + 0.5) * px).astype(np.float32)
    label, inst = scene.rasterize(u, v)
    image = synthetic_scene.render_aerial(scene, label, inst, u, v, dom.gain, dom.offset, rng, key)
    image = image.transpose(2, 0, 1).copy()
    label = label.copy()
    if nodata_rows:
        image[:, height - nodata_rows:, :] = 0
        label[height - nodata_rows:, :] = 0
    transform = Affine(px, 0.0, dom.x0, 0.0, -px, dom.y0)
    block = 256 if min(width, height) >= 256 else 16 * max(1, min(width, height) // 16)
    profile = dict(driver="GTiff", width=width, height=height, count=5, dtype="uint8",
                   crs=CRS.from_epsg(2154), transform=transform, compress="lzw", tiled=True,
                   blockxsize=block, blockysize=block, photometric="minisblack", interleave="pixel")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
    if label_path:
        with rasterio.open(label_path, "w", **{**profile, "count": 1}) as dst:
            dst.write(label[None])
    return {"path": path, "label_path": label_path, "width": width, "height": height,
            "pixel_size_m": px,
            "class_pixels": {int(c): int(n) for c, n in enumerate(np.bincount(label.ravel())) if n}}


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines describing what `make_tree` wrote."""
    from flair_tf import nomenclature  # pylint: disable=g-import-not-at-top

    doms = summary["domains"]
    lines = [
        f"{summary['task']}: wrote {summary['patches']['trainval']} train+val and "
        f"{summary['patches']['test']} test patches of {summary['patch_size']} px "
        f"({summary['pixel_size_m']:.3g} m/px) to {summary['root']} in {summary['seconds']} s",
        f"  domains: train {', '.join(doms['train']) or '-'} | val {', '.join(doms['val']) or '-'}"
        f" | test {', '.join(doms['test']) or '-'}  ({summary['zones']} zones)",
    ]
    pixels = summary["class_pixels"]["trainval"]
    total = sum(pixels.values()) or 1
    shares = ", ".join(f"{c} {nomenclature.CODES[c][0]} {100 * n / total:.2f}%"
                       for c, n in sorted(pixels.items()))
    lines.append(f"  train+val class shares: {shares}")
    if "sentinel" in summary:
        s = summary["sentinel"]
        lines.append(f"  sentinel: {s['super_areas']} super-areas, {s['dates_min']}..{s['dates_max']} "
                     f"dates each, {s['cloudy_or_snowy_dates']} cloudy/snowy dates, margin "
                     f"{s['margin_px']} px")
    return "\n".join(lines)
