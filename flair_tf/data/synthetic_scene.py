"""The land-cover scene of a synthetic FLAIR zone, and its aerial rendering.

A zone is a small vector scene in metres (`Scene`): Voronoi parcels (fields,
meadows, woods, ponds, urban blocks) drawn from a mixture that depends on the
zone's letters (U urban, A agricultural, F forest, N natural), rare objects
(clear cuts, mixed stands, ligneous clumps, snow, greenhouses, "other"), a
river, roads, buildings, paved yards and swimming pools. `Scene.rasterize`
draws the labels (and object ids) at any pixel grid, so the same scene gives the
aerial patches and, supersampled, the 10 m Sentinel-2 class fractions.

`render_aerial` turns labels into a 5-band image: per-class (R, G, B, NIR,
elevation) signatures, per-object tones (roof colours, building heights),
textures (tree crowns, vine rows, furrows, greenhouse tunnels), white noise and
the domain's radiometric gain and offset. Used by `flair_tf.data.synthetic`.
"""

from __future__ import annotations

import math

import numpy as np

# Class signatures. Index = FLAIR code (row 0 unused).
# Aerial (R, G, B, NIR, elevation) means on the 0..255 scale.
_AERIAL_MEAN = np.array([
    [0, 0, 0, 0, 0],
    [150, 95, 85, 100, 150],   # 1 building (per-roof colour below)
    [114, 136, 90, 176, 6],    # 2 pervious surface
    [92, 93, 98, 78, 2],       # 3 impervious surface
    [188, 162, 132, 170, 2],   # 4 bare soil
    [42, 72, 88, 22, 0],       # 5 water
    [48, 74, 54, 148, 160],    # 6 coniferous
    [70, 112, 64, 196, 140],   # 7 deciduous
    [116, 124, 78, 170, 30],   # 8 brushwood
    [152, 114, 134, 136, 44],  # 9 vineyard (distinct at any resolution: rows alias below ~1 m)
    [98, 156, 72, 212, 4],     # 10 herbaceous vegetation
    [182, 176, 104, 180, 3],   # 11 agricultural land
    [138, 104, 80, 104, 1],    # 12 plowed land
    [70, 185, 205, 40, 0],     # 13 swimming pool
    [236, 240, 246, 226, 6],   # 14 snow
    [150, 128, 100, 128, 12],  # 15 clear cut
    [58, 90, 58, 160, 155],    # 16 mixed
    [96, 124, 52, 176, 80],    # 17 ligneous
    [206, 210, 218, 192, 45],  # 18 greenhouse
    [165, 68, 145, 92, 20],    # 19 other
], dtype=np.float32)
# Texture amplitude (2 m-scale value noise) per band.
_AERIAL_TEXTURE = np.array([
    [0] * 5, [6, 6, 6, 6, 10], [12, 12, 10, 20, 5], [6, 6, 6, 5, 1], [10, 9, 8, 10, 1],
    [3, 3, 3, 3, 0], [14, 16, 12, 30, 45], [16, 20, 14, 35, 40], [14, 14, 10, 22, 18],
    [8, 8, 8, 10, 6], [8, 10, 7, 14, 2], [6, 6, 5, 10, 1], [8, 7, 6, 8, 1], [4, 5, 5, 3, 0],
    [4, 4, 3, 4, 2], [16, 14, 12, 16, 8], [15, 18, 14, 32, 42], [12, 14, 10, 22, 20],
    [6, 6, 6, 6, 6], [12, 10, 12, 10, 8],
], dtype=np.float32)
# Periodic rows: (period m, amplitude per band) for vineyard, crops, furrows, tunnels.
_STRIPES = {
    9: (2.2, np.array([26, 22, 20, 38, 14], np.float32)),
    11: (3.0, np.array([7, 7, 5, 12, 0], np.float32)),
    12: (1.5, np.array([16, 13, 11, 16, 0], np.float32)),
    18: (8.0, np.array([18, 18, 18, 16, 14], np.float32)),
}
# Per-object tone spread (std per band) and white noise std.
_TONE_STD = np.array([9, 9, 8, 11, 8], np.float32)
_NOISE_STD = np.array([18, 18, 17, 20, 16], np.float32)
_ROOFS = np.array([[168, 88, 72, 96], [120, 118, 122, 104], [92, 90, 96, 82], [150, 130, 110, 120]],
                  np.float32)

# Parcel land-use mixtures per zone letter (code -> weight; 0 = urban block).
_MIX = {
    "U": {0: 0.58, 2: 0.03, 3: 0.12, 10: 0.12, 7: 0.09, 4: 0.02, 8: 0.02, 5: 0.02},
    "A": {11: 0.32, 12: 0.17, 10: 0.20, 9: 0.09, 0: 0.07, 7: 0.08, 3: 0.03, 4: 0.03, 8: 0.02},
    "F": {7: 0.56, 6: 0.12, 8: 0.13, 10: 0.09, 0: 0.03, 11: 0.03, 5: 0.03},
    "N": {10: 0.31, 8: 0.22, 7: 0.17, 6: 0.04, 4: 0.10, 5: 0.08, 2: 0.03, 3: 0.02, 0: 0.03},
}
LETTER_PROB = {"U": 0.3, "A": 0.3, "F": 0.2, "N": 0.2}
# Rare objects: code -> (density per hectare, shape 0 rect / 1 ellipse, half-size range m, allowed).
_RARE = {
    15: (0.10, 1, (8.0, 18.0), (6, 7, 8, 16)),
    16: (0.10, 1, (6.0, 14.0), (6, 7)),
    17: (0.25, 1, (2.0, 4.5), (8, 10, 2, 4)),
    19: (0.90, 0, (1.5, 4.0), (2, 4, 10, 11, 12)),
    18: (0.25, 0, (3.0, 12.0), (11, 12, 4, 10, 2)),
    14: (0.50, 1, (5.0, 16.0), (10, 8, 4, 6, 7, 2)),  # mountain domains only
}

# ---------------------------------------------------------------------------------------
# Deterministic value noise in metric coordinates (continuous across patches).

def _hash01(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    h = (ix.astype(np.int64).astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (
        iy.astype(np.int64).astype(np.uint32) * np.uint32(0xD8163841)) ^ np.uint32(key & 0xFFFFFFFF)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0x5BD1E995)
    h = h ^ (h >> np.uint32(15))
    return h.astype(np.float32) * np.float32(1.0 / 4294967296.0)


def value_noise(u: np.ndarray, v: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth noise in [-1, 1] at points (u, v) metres (broadcast), feature size `scale` m."""
    x, y = np.asarray(u, np.float64) / scale, np.asarray(v, np.float64) / scale
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    n00, n10 = _hash01(x0, y0, key), _hash01(x0 + 1, y0, key)
    n01, n11 = _hash01(x0, y0 + 1, key), _hash01(x0 + 1, y0 + 1, key)
    top = n00 + (n10 - n00) * fx
    bottom = n01 + (n11 - n01) * fx
    return 2.0 * (top + (bottom - top) * fy) - 1.0


# ---------------------------------------------------------------------------------------

class Scene:
    """The vector land-cover scene of one zone, in local metres (u east, v south)."""

    GRID = 64.0  # mean parcel size (m)

    def __init__(self, rng: np.random.Generator, width: float, height: float, letters: str,
                 mountain: bool, key: int):
        self.key = key
        g = self.GRID
        self.gx, self.gy = int(math.ceil(width / g)) + 1, int(math.ceil(height / g)) + 1
        jj, ii = np.meshgrid(np.arange(self.gx), np.arange(self.gy))
        self.seed_u = ((jj + 0.5 + rng.uniform(-0.4, 0.4, jj.shape)) * g).astype(np.float32)
        self.seed_v = ((ii + 0.5 + rng.uniform(-0.4, 0.4, ii.shape)) * g).astype(np.float32)
        mix: dict[int, float] = {}
        for letter in letters:
            for code, w in _MIX[letter].items():
                mix[code] = mix.get(code, 0.0) + w / len(letters)
        codes = np.array(sorted(mix))
        probs = np.array([mix[c] for c in codes])
        pclass = rng.choice(codes, size=jj.shape, p=probs / probs.sum())
        self.parcel_urban = (pclass == 0).ravel()
        parcel_code = np.where(pclass == 0, 2, pclass).astype(np.uint8).ravel()
        n_parcels = parcel_code.size
        parcel_angle = rng.uniform(0, np.pi, n_parcels).astype(np.float32)

        # River and roads: lines across the extent.
        area_km2 = width * height / 1e6
        urban = sum(_MIX[l].get(0, 0) for l in letters) / len(letters)
        n_roads = rng.poisson(area_km2 * (1.5 + 18.0 * urban)) + 1
        self.roads = np.stack([
            rng.uniform(0, width, n_roads), rng.uniform(0, height, n_roads),
            rng.uniform(0, np.pi, n_roads), rng.uniform(5.0, 8.0, n_roads) + 5.0 * urban,
        ], axis=1).astype(np.float32)
        self.river = None
        if rng.random() < 0.3:
            self.river = (rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, np.pi),
                          rng.uniform(10, 35), rng.uniform(15, 60), rng.uniform(150, 500),
                          rng.uniform(0, 2 * np.pi))
        # Objects, in paint order: rare blobs and greenhouses, buildings, yards, pools.
        objs: list[np.ndarray] = []  # rows: code, cu, cv, half_len, half_wid, angle, shape, allowed_id, height
        self.allowed: list[np.ndarray] = []

        def allowed_id(codes_: tuple[int, ...]) -> int:
            lut = np.zeros(256, bool)
            lut[list(codes_)] = True
            self.allowed.append(lut)
            return len(self.allowed) - 1

        for code, (density, shape, (lo, hi), allowed) in _RARE.items():
            if code == 14 and not mountain:
                continue
            n = rng.poisson(density * width * height / 1e4)
            if n == 0:
                continue
            a = rng.uniform(lo, hi, n)
            b = a * rng.uniform(0.4, 1.0, n) if code != 18 else np.full(n, rng.uniform(3.0, 5.0))
            objs.append(np.stack([np.full(n, code), rng.uniform(0, width, n), rng.uniform(0, height, n),
                                  a, b, rng.uniform(0, np.pi, n), np.full(n, shape),
                                  np.full(n, allowed_id(allowed)), np.zeros(n)], axis=1))
        # Buildings on a jittered grid, kept in urban parcels (and a few isolated farms).
        step = 20.0
        bu, bv = np.meshgrid(np.arange(step / 2, width, step), np.arange(step / 2, height, step))
        bu = (bu + rng.uniform(-4, 4, bu.shape)).ravel()
        bv = (bv + rng.uniform(-4, 4, bv.shape)).ravel()
        parcel = self._nearest_parcel(bu[None, :], bv[None, :])[0]
        keep = np.where(self.parcel_urban[parcel], rng.random(bu.size) < 0.9,
                        rng.random(bu.size) < 0.01)
        bu, bv, parcel = bu[keep], bv[keep], parcel[keep]
        n = bu.size
        if n:
            ang = parcel_angle[parcel] + rng.integers(0, 2, n) * np.pi / 2
            a, b = rng.uniform(5.0, 10.5, n), rng.uniform(4.0, 7.5, n)
            only_pervious = allowed_id((2, 4, 10, 11, 12, 8, 7, 6))
            objs.append(np.stack([np.full(n, 1), bu, bv, a, b, ang, np.zeros(n),
                                  np.full(n, only_pervious), rng.uniform(90, 230, n)], axis=1))
            yard = rng.random(n) < 0.7
            off = (b + rng.uniform(2.5, 5.0, n))[yard]
            ca, sa = np.cos(ang[yard]), np.sin(ang[yard])
            ny = int(yard.sum())
            garden = allowed_id((2,))
            objs.append(np.stack([np.full(ny, 3), bu[yard] - sa * off, bv[yard] + ca * off,
                                  rng.uniform(4.0, 9.0, ny), rng.uniform(2.5, 4.5, ny), ang[yard],
                                  np.zeros(ny), np.full(ny, garden), np.zeros(ny)], axis=1))
            pool = rng.random(n) < 0.10
            off = (b + rng.uniform(5.0, 8.0, n))[pool]
            ca, sa = np.cos(ang[pool]), np.sin(ang[pool])
            npl = int(pool.sum())
            objs.append(np.stack([np.full(npl, 13), bu[pool] + sa * off, bv[pool] - ca * off,
                                  rng.uniform(2.5, 4.5, npl), rng.uniform(1.5, 2.5, npl), ang[pool],
                                  np.zeros(npl), np.full(npl, garden), np.zeros(npl)], axis=1))
        self.objects = (np.concatenate(objs, 0) if objs else np.zeros((0, 9))).astype(np.float32)

        # Instance tables: parcels, roads, river, objects.
        self.n_parcels = n_parcels
        self.road_base = n_parcels
        self.river_id = n_parcels + n_roads
        self.obj_base = self.river_id + 1
        n_inst = self.obj_base + len(self.objects)
        self.inst_code = np.concatenate([parcel_code, np.full(n_roads, 3), [5],
                                         self.objects[:, 0]]).astype(np.uint8)
        self.inst_angle = np.concatenate([parcel_angle, self.roads[:, 2], [0.0],
                                          self.objects[:, 5]]).astype(np.float32)
        tone = rng.normal(0, 1, (n_inst, 5)).astype(np.float32) * _TONE_STD
        roads = slice(self.road_base, self.road_base + n_roads)
        tone[roads, :4] = -14.0 + rng.normal(0, 3, (n_roads, 1))  # asphalt is darker than yards
        obj = self.objects
        bld = np.nonzero(obj[:, 0] == 1)[0]
        roof = _ROOFS[rng.integers(0, len(_ROOFS), bld.size)]
        tone[self.obj_base + bld, :4] = roof - _AERIAL_MEAN[1, :4] + rng.normal(0, 4, roof.shape)
        tone[self.obj_base + bld, 4] = obj[bld, 8] - _AERIAL_MEAN[1, 4]
        self.inst_tone = tone

    def _nearest_parcel(self, u: np.ndarray, v: np.ndarray, tile: int = 128) -> np.ndarray:
        """Index of the nearest parcel seed for points (u, v) (broadcast 2-D arrays).

        Works tile by tile, each against the seeds near it: every point has a seed
        within 1.3 grid cells (jitter <= 0.4 cell), so seeds farther than 2 cells
        from a tile's bounding box can never be the nearest.
        """
        u, v = np.broadcast_arrays(np.asarray(u, np.float32), np.asarray(v, np.float32))
        seed_u, seed_v = self.seed_u.ravel(), self.seed_v.ravel()
        reach = 2 * self.GRID
        out = np.empty(u.shape, np.int64)
        for r in range(0, u.shape[0], tile):
            for c in range(0, u.shape[1], tile):
                tu, tv = u[r:r + tile, c:c + tile], v[r:r + tile, c:c + tile]
                near = np.nonzero((seed_u >= tu.min() - reach) & (seed_u <= tu.max() + reach)
                                  & (seed_v >= tv.min() - reach) & (seed_v <= tv.max() + reach))[0]
                dist = (seed_u[near, None, None] - tu) ** 2 + (seed_v[near, None, None] - tv) ** 2
                out[r:r + tile, c:c + tile] = near[np.argmin(dist, axis=0)]
        return out

    def rasterize(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (uint8 codes) and instance ids (int32) at pixel centres u (W,), v (H,)."""
        uu, vv = u[None, :].astype(np.float32), v[:, None].astype(np.float32)
        # Warping the coordinates makes parcel edges irregular rather than straight.
        warp_u = uu + 5.0 * value_noise(uu, vv, 24.0, self.key + 7)
        warp_v = vv + 5.0 * value_noise(uu, vv, 24.0, self.key + 8)
        inst = self._nearest_parcel(warp_u, warp_v).astype(np.int32)
        label = self.inst_code[inst]
        obj = self.objects
        step_u, step_v = float(u[1] - u[0]) if u.size > 1 else 1.0, float(v[1] - v[0]) if v.size > 1 else 1.0

        def paint(mask, code, iid, rows=slice(None), cols=slice(None)):
            label[rows, cols][mask] = code
            inst[rows, cols][mask] = iid

        if self.river is not None:
            pu, pv, ang, width, amp, wavelength, phase = self.river
            along = (uu - pu) * math.cos(ang) + (vv - pv) * math.sin(ang)
            across = -(uu - pu) * math.sin(ang) + (vv - pv) * math.cos(ang)
            mask = np.abs(across - amp * np.sin(2 * np.pi * along / wavelength + phase)) < width / 2
            paint(mask, 5, self.river_id)
        for k, (pu, pv, ang, width) in enumerate(self.roads):
            dist = np.abs(-(uu - pu) * math.sin(ang) + (vv - pv) * math.cos(ang))
            paint(dist < width / 2, 3, self.road_base + k)
        if len(obj):
            reach = np.hypot(obj[:, 3], obj[:, 4])
            hit = ((obj[:, 1] + reach >= u[0]) & (obj[:, 1] - reach <= u[-1])
                   & (obj[:, 2] + reach >= v[0]) & (obj[:, 2] - reach <= v[-1]))
            for k in np.nonzero(hit)[0]:
                code, cu, cv, a, b, ang, shape, allowed, _ = obj[k]
                r = reach[k]
                j0 = max(0, int(math.ceil((cu - r - u[0]) / step_u)))
                j1 = min(u.size, int(math.floor((cu + r - u[0]) / step_u)) + 1)
                i0 = max(0, int(math.ceil((cv - r - v[0]) / step_v)))
                i1 = min(v.size, int(math.floor((cv + r - v[0]) / step_v)) + 1)
                if j0 >= j1 or i0 >= i1:
                    continue
                du = uu[:, j0:j1] - cu
                dv = vv[i0:i1, :] - cv
                pa = du * math.cos(ang) + dv * math.sin(ang)
                pb = -du * math.sin(ang) + dv * math.cos(ang)
                if shape:
                    inside = (pa / a) ** 2 + (pb / b) ** 2 <= 1.0
                else:
                    inside = (np.abs(pa) <= a) & (np.abs(pb) <= b)
                rows, cols = slice(i0, i1), slice(j0, j1)
                inside &= self.allowed[int(allowed)][label[rows, cols]]
                paint(inside, int(code), self.obj_base + k, rows, cols)
        return label, inst


def render_aerial(scene: Scene, label, inst, u, v, gain, offset, rng, key) -> np.ndarray:
    """The 5-band uint8 image (H, W, 5) of a rasterised window."""
    uu, vv = u[None, :], v[:, None]
    img = _AERIAL_MEAN[label] + scene.inst_tone[inst]
    tex = value_noise(uu, vv, 2.0, key) * 0.65 + value_noise(uu, vv, 0.7, key + 1) * 0.35
    img += _AERIAL_TEXTURE[label] * tex[..., None]
    pixel = float(u[1] - u[0]) if u.size > 1 else 1.0
    across = None
    for code, (period, amp) in _STRIPES.items():
        m = label == code
        if m.any():
            if across is None:  # distance across the rows, along each object's own direction
                angle = scene.inst_angle[inst]
                across = uu * np.cos(angle) + vv * np.sin(angle)
            # Rows finer than ~3 pixels would alias into noise at small patch sizes.
            period = max(period, 3.1 * pixel)
            img[m] += np.sin(across[m] * (2 * np.pi / period))[:, None] * amp
    img += rng.normal(0, 1, img.shape).astype(np.float32) * _NOISE_STD
    img[..., :4] = img[..., :4] * gain + offset
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


