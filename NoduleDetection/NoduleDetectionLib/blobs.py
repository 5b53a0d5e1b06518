"""Small-nodule proposals by a classical blob filter, beside stage 1.

Stage 1 finds few nodules under 6 mm, and almost none of those touching the pleura (see the model card), while
stage 2, shown such a nodule's centre, mostly recognises it. This filter proposes bright compact spots of the
lungs for stage 2 to judge (``Stage1Config.blob_candidates`` per scan, strongest first):

1. white top-hat: the working-grid image minus its grey opening by a cube of ``TOPHAT_SIZE_MM``, which removes
   whatever is wider than the cube (chest wall, mediastinum, diaphragm) and keeps what is narrower, so a small
   nodule on the pleura stands alone like a free one;
2. Hessian dot filter (Li, Sone and Doi, Med. Phys. 2003): at each scale ``σ`` of ``SCALES_MM``, where the three
   eigenvalues ``λ1 ≤ λ2 ≤ λ3`` of the scale-normalised Hessian are all negative, ``λ3² / |λ1|``: high at the centre
   of a sphere of radius about ``σ√3``, low on a vessel (``λ3 ≈ 0`` along it) or a fissure; the highest over scales;
3. local maxima (over ``PEAK_SPACING_MM``) inside the lung mask and outside the regions already proposed.

The same dot filter also rates every candidate's shape (``ShapeFilter.region_dotness``): a compact ball keeps a high
value, a vessel, a branch point or a fissure a low one. ``Stage1Config.dot_weight`` scales a finding's probability
by it (``detect.shape_prior``; ``calibrate`` chooses the weight). One ``ShapeFilter`` per scan serves both uses and
smooths the image once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Geometry
from .regions import region_max

#: Side of the cube (mm) of the top-hat's opening: nodules up to about this size stay, the chest wall goes.
TOPHAT_SIZE_MM = 9.0
#: Scales (Gaussian σ, mm) of the dot filter: spheres of about 3-8 mm diameter.
SCALES_MM = (1.0, 1.5, 2.2)
#: Only voxels at least this bright in the top-hat image (normalised units, 0.05 = 70 HU) are filtered.
MIN_TOPHAT = 0.05
#: Two proposals are at least about this far apart (mm): the size of the local-maximum window.
PEAK_SPACING_MM = 4.5
#: A proposal's outline: its top-hat at least half the peak's, within this radius (mm) of the peak.
OUTLINE_RADIUS_MM = 4.0


@dataclass
class Blobs:
    """Proposals on the working grid: ``kji`` peak indices ``int (N, 3)`` (strongest first), ``strength``
    (dot filter), and ``tophat``, the top-hat image ``float32 [k, j, i]`` (for outlines)."""

    kji: np.ndarray
    strength: np.ndarray
    tophat: np.ndarray


def _odd_voxels(size_mm: float, spacing_kji: np.ndarray) -> tuple[int, ...]:
    return tuple(int(max(3, 2 * round(size_mm / s / 2) + 1)) for s in spacing_kji)


def symmetric_eigenvalues(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest eigenvalues of symmetric 3×3 matrices given by their six entries ``h`` ``(6, N)``
    (``xx, yy, zz, xy, xz, yz``), in closed form (Smith, Comm. ACM 1961)."""
    a, b, c, d, e, f = h
    q = (a + b + c) / 3.0
    p1 = d * d + e * e + f * f
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * p1) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    ba, bb, bc, bd, be, bf = (a - q) / safe, (b - q) / safe, (c - q) / safe, d / safe, e / safe, f / safe
    r = np.clip((ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)) / 2.0, -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return smallest, largest


def smoothings(image: np.ndarray, spacing_kji: np.ndarray,
               scales_mm: tuple[float, ...] = SCALES_MM) -> list[np.ndarray]:
    """``image`` ``[k, j, i]`` (voxel size ``spacing_kji`` mm) smoothed by a Gaussian of each scale ``σ`` (mm)."""
    spacing_kji = np.asarray(spacing_kji, float)
    return [ndimage.gaussian_filter(image, s_mm / spacing_kji, truncate=3.0) for s_mm in scales_mm]


#: Voxels filtered at a time (``_dot_values``): bounds its index arrays to some tens of MB.
DOT_CHUNK = 1 << 17


def _dot_values(idx: np.ndarray, smoothed: Sequence[np.ndarray], spacing_kji: np.ndarray,
                scales_mm: tuple[float, ...] = SCALES_MM) -> np.ndarray:
    """The dot filter at the voxels ``idx`` ``int (3, N)``, N > 0 (``k, j, i``), of images smoothed at each scale
    (``smoothings``), ``DOT_CHUNK`` voxels at a time; ``float32 (N,)``."""
    spacing_kji = np.asarray(spacing_kji, float)
    return np.concatenate([_dot_at(idx[:, start:start + DOT_CHUNK], smoothed, spacing_kji, scales_mm)
                           for start in range(0, idx.shape[1], DOT_CHUNK)])


def hessian_entries(idx: np.ndarray, smoothed: np.ndarray, spacing_kji: np.ndarray, scale_mm: float) -> np.ndarray:
    """The scale-normalised Hessian (``σ²`` times central differences) of ``smoothed``, the image smoothed at scale
    ``σ = scale_mm``, at the voxels ``idx`` ``int (3, N)`` (``k, j, i``); its six entries ``(6, N)`` in the order
    of ``symmetric_eigenvalues`` (``xx, yy, zz, xy, xz, yz`` with x = i, y = j, z = k)."""
    top = np.array(smoothed.shape)[:, None] - 1
    step = np.eye(3, dtype=int)[:, :, None]
    centre = smoothed[tuple(idx)]
    second = [(smoothed[tuple(np.minimum(idx + step[a], top))] - 2.0 * centre
               + smoothed[tuple(np.maximum(idx - step[a], 0))]) / spacing_kji[a] ** 2 for a in range(3)]
    mixed = []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        c = [smoothed[tuple(np.clip(idx + sa * step[a] + sb * step[b], 0, top))] for sa in (1, -1) for sb in (1, -1)]
        mixed.append((c[0] - c[1] - c[2] + c[3]) / (4.0 * spacing_kji[a] * spacing_kji[b]))
    return np.array([second[2], second[1], second[0], mixed[2], mixed[1], mixed[0]]) * scale_mm**2


def _dot_at(idx: np.ndarray, smoothed: Sequence[np.ndarray], spacing_kji: np.ndarray,
            scales_mm: tuple[float, ...]) -> np.ndarray:
    """The dot filter at the voxels ``idx`` ``int (3, N)`` (``k, j, i``), highest over the scales; ``float32 (N,)``."""
    best = np.zeros(idx.shape[1], np.float32)
    for s_mm, g in zip(scales_mm, smoothed):
        smallest, largest = symmetric_eigenvalues(hessian_entries(idx, g, spacing_kji, s_mm))
        dot = np.where(largest < 0, largest * largest / np.maximum(-smallest, 1e-6), 0.0)
        np.maximum(best, dot.astype(np.float32), out=best)
    return best


class ShapeFilter:
    """The white top-hat of a normalised working-grid image ``[k, j, i]`` (``geometry``: the grid's, LPS) and its
    dot filter, for one scan.

    ``tophat`` is the image minus its grey opening by a cube of ``tophat_mm`` (what is narrower than the cube;
    ``float32``). The dot filter (at the Gaussian scales ``scales_mm``) of it: its smoothings, and its value at each
    voxel asked for, are made on first use and kept for later calls (a voxel's value does not depend on which others
    are asked for). The defaults are the detector's; wider ones find larger blobs.
    """

    def __init__(self, image: np.ndarray, geometry: Geometry, tophat_mm: float = TOPHAT_SIZE_MM,
                 scales_mm: tuple[float, ...] = SCALES_MM) -> None:
        self.spacing_kji = np.array(geometry.spacing, float)[::-1]
        self.scales_mm = tuple(scales_mm)
        img = image.astype(np.float32, copy=False)
        self.tophat = img - ndimage.grey_opening(img, size=_odd_voxels(tophat_mm, self.spacing_kji))
        self._smoothed: list[np.ndarray] | None = None
        self._dot = np.zeros(img.shape, np.float32)
        self._known = np.zeros(img.shape, bool)

    def smoothed(self) -> list[np.ndarray]:
        """The top-hat image smoothed at each scale of ``scales_mm`` (``smoothings``; made on first use)."""
        if self._smoothed is None:
            self._smoothed = smoothings(self.tophat, self.spacing_kji, self.scales_mm)
        return self._smoothed

    def candidate_voxels(self, lung: np.ndarray) -> np.ndarray:
        """The voxels where blobs are sought: inside ``lung`` (``bool [k, j, i]``) and at least ``MIN_TOPHAT`` in
        the top-hat image."""
        return lung & (self.tophat >= MIN_TOPHAT)

    def dot(self, where: np.ndarray) -> np.ndarray:
        """The multi-scale Hessian dot filter of the top-hat image at the voxels of ``where`` (``bool [k, j, i]``; 0
        elsewhere; ``float32``): at each scale of ``scales_mm`` the Hessian of the smoothed image (central
        differences, scaled by ``σ²``), its highest value over the scales."""
        missing = where & ~self._known
        idx = np.array(np.nonzero(missing))
        if idx.shape[1]:
            self._dot[tuple(idx)] = _dot_values(idx, self.smoothed(), self.spacing_kji, self.scales_mm)
            self._known |= missing
        return np.where(where, self._dot, np.float32(0.0))

    def region_dotness(self, regions: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The highest dot filter value in each region ``ids`` of the label map ``regions`` ``int [k, j, i]``;
        ``float64 (len(ids),)``."""
        ids = np.asarray(ids, int).reshape(-1)
        if ids.size == 0:
            return np.zeros(0)
        return region_max(self.dot(np.isin(regions, ids)), regions, ids)


def find_blobs(image: np.ndarray, lung: np.ndarray, geometry: Geometry, count: int,
               exclude: np.ndarray | None = None, shapes: ShapeFilter | None = None) -> Blobs:
    """The ``count`` strongest blob proposals of a normalised working-grid image ``[k, j, i]`` inside ``lung``
    and outside ``exclude`` (both ``bool [k, j, i]``); ``geometry``: the working grid's (LPS). ``shapes``: the
    image's ``ShapeFilter``, if already made."""
    shapes = ShapeFilter(image, geometry) if shapes is None else shapes
    where = shapes.candidate_voxels(lung)
    if exclude is not None:
        where &= ~exclude
    dot = shapes.dot(where)
    peaks = (dot > 0) & (dot == ndimage.maximum_filter(dot, size=_odd_voxels(PEAK_SPACING_MM, shapes.spacing_kji)))
    kji = np.argwhere(peaks)
    strength = dot[peaks]
    order = np.argsort(-strength, kind="stable")[: max(count, 0)]
    return Blobs(kji[order], strength[order], shapes.tophat)


def blob_outline(blobs: Blobs, n: int, geometry: Geometry, free: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Outline of proposal ``n``: the voxels within ``OUTLINE_RADIUS_MM`` of its peak whose top-hat is at least
    half the peak's, connected to the peak, and ``free`` (``bool [k, j, i]``). Returns the box and a mask over it:
    empty when the peak itself is not free, else holding the peak."""
    spacing_kji = np.array(geometry.spacing, float)[::-1]
    centre = blobs.kji[n]
    r = np.ceil(OUTLINE_RADIUS_MM / spacing_kji).astype(int)
    lo = np.maximum(centre - r, 0)
    hi = np.minimum(centre + r + 1, blobs.tophat.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    if not free[tuple(centre)]:
        return box, np.zeros(tuple(hi - lo), bool)
    grid = np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, centre))]
    ball = sum((g * s) ** 2 for g, s in zip(grid, spacing_kji)) <= OUTLINE_RADIUS_MM**2
    peak = tuple(centre - lo)
    mask = ball & free[box] & (blobs.tophat[box] >= 0.5 * blobs.tophat[tuple(centre)])
    mask[peak] = True
    labels, _ = ndimage.label(mask)
    return box, labels == labels[peak]
