"""Synthetic chest phantoms: a body, two lungs, vessels and spherical nodules, with known truth.

Used by the tests (a tiny model is trained on phantoms in seconds) and as a sanity check of the whole
pipeline; never as evidence of accuracy on real scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Geometry
from .volume import CTVolume


@dataclass
class Phantom:
    """A phantom CT and its truth.

    Attributes:
        volume: the CT (HU, ``[k, j, i]``).
        label_map: ``uint16 [k, j, i]``, nodule ``n`` has value ``n``.
        nodules: ``(center_lps, diameter_mm)`` per nodule, in label order.
    """

    volume: CTVolume
    label_map: np.ndarray
    nodules: list[tuple[np.ndarray, float]]


def make_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (48, 96, 112),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    n_nodules: int = 3,
    diameters_mm: tuple[float, float] = (5.0, 14.0),
    n_vessels: int = 12,
    direction: np.ndarray | None = None,
    noise_hu: float = 20.0,
    name: str = "phantom",
) -> Phantom:
    """Build a chest-like phantom.

    Args:
        rng: random generator (the phantom is a function of its state).
        shape: array shape ``[k, j, i]``.
        spacing: voxel size ``(x, y, z)`` mm.
        n_nodules: number of spherical solid nodules (about +30 HU) placed inside the lungs.
        diameters_mm: range of nodule diameters.
        n_vessels: number of straight vessel segments (tubes of 1.5–3 mm radius, +40 HU) in the lungs;
            they are the hard negatives.
        direction: image direction (default identity).
        noise_hu: standard deviation of the added Gaussian noise.

    Returns:
        ``Phantom`` with the volume, label map and nodule list (centres in LPS mm).
    """
    nk, nj, ni = shape
    sx, sy, sz = spacing
    kk, jj, ii = np.meshgrid(np.arange(nk) * sz, np.arange(nj) * sy, np.arange(ni) * sx, indexing="ij")
    cz, cy, cx = (nk - 1) * sz / 2, (nj - 1) * sy / 2, (ni - 1) * sx / 2
    hu = np.full(shape, -1000.0, np.float32)
    body = ((ii - cx) / (0.46 * ni * sx)) ** 2 + ((jj - cy) / (0.40 * nj * sy)) ** 2 <= 1.0
    hu[body] = 40.0
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lung = (
            ((ii - (cx + side * 0.2 * ni * sx)) / (0.17 * ni * sx)) ** 2
            + ((jj - cy) / (0.28 * nj * sy)) ** 2
            + ((kk - cz) / (0.45 * nk * sz)) ** 2
        ) <= 1.0
        lungs |= lung
    hu[lungs] = -850.0
    lung_pts = np.argwhere(lungs)
    for _ in range(n_vessels):
        a = lung_pts[rng.integers(len(lung_pts))] * np.array([sz, sy, sx])
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        r = rng.uniform(1.5, 3.0)
        rel = np.stack([kk - a[0], jj - a[1], ii - a[2]], axis=-1)
        t = np.clip(rel @ d, -40.0, 40.0)
        dist = np.linalg.norm(rel - t[..., None] * d, axis=-1)
        hu[(dist <= r) & lungs] = 40.0
    labels = np.zeros(shape, np.uint16)
    nodules_kji: list[tuple[np.ndarray, float]] = []
    inside = ndimage.distance_transform_edt(lungs, sampling=(sz, sy, sx))
    for _ in range(n_nodules):
        d = float(rng.uniform(*diameters_mm))
        ok = np.argwhere((inside > d / 2 + 2.0) & (labels == 0))
        if len(ok) == 0:
            break
        for _attempt in range(20):
            c = ok[rng.integers(len(ok))] * np.array([sz, sy, sx])
            if all(np.linalg.norm(c - p) > (d + q) / 2 + 4.0 for p, q in nodules_kji):
                break
        else:
            continue
        ball = (kk - c[0]) ** 2 + (jj - c[1]) ** 2 + (ii - c[2]) ** 2 <= (d / 2) ** 2
        hu[ball] = 30.0
        labels[ball] = len(nodules_kji) + 1
        nodules_kji.append((c, d))
    hu = ndimage.gaussian_filter(hu, sigma=(0.7 / sz, 0.7 / sy, 0.7 / sx))
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    geometry = Geometry(spacing, (-cx, -cy, -cz), np.eye(3) if direction is None else direction)
    nodules = [(geometry.index_to_lps((c / np.array([sz, sy, sx]))[::-1]), d) for c, d in nodules_kji]
    volume = CTVolume(np.round(hu).astype(np.int16), geometry, name=name)
    return Phantom(volume, labels, nodules)
