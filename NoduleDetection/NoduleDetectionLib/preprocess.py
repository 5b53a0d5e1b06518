"""Preprocessing: lung mask, crop to the lungs, resampling to the working spacing, HU normalisation.

All arrays are indexed ``[k, j, i]`` (z, y, x); spacings are ``(x, y, z)`` mm; geometry is LPS.

The lung mask is computed on a coarse (about 2 mm) grid for speed, then brought back to the input grid:

1. air-like voxels (< -400 HU, scanner padding counted as air) form connected regions;
2. regions touching the in-plane border of the image (air outside the body) are removed;
3. the large remaining regions are the lungs (and the central airways);
4. each axial slice of each lung is replaced by its convex hull when the hull is not much larger
   than the lung itself (the approach of the DSB 2017 winners): this puts juxtapleural nodules, which
   bite into the lung outline from the chest wall, back inside the mask; holes (vessels, solid nodules)
   are filled, and a closing plus a small dilation add a safety margin.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import convex_hull_image

from .geometry import Geometry
from .volume import AIR_HU, CTVolume

log = logging.getLogger(__name__)

#: Volume (mL) of lung under which a scan is reported as having a partial or missing lung field.
MIN_LUNG_VOLUME_ML = 2000.0


@dataclass
class LungMask:
    """A lung mask on the input grid and what was learned while computing it.

    Attributes:
        mask: ``bool [k, j, i]`` on the input grid.
        volume_ml: lung volume in mL.
        warnings: human-readable notes (e.g. partial lung field).
    """

    mask: np.ndarray
    volume_ml: float
    warnings: list[str] = field(default_factory=list)


def _block_factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer down-sampling factors in ``[k, j, i]`` order so that voxels get about ``target_mm``."""
    sx, sy, sz = spacing
    return tuple(max(1, int(round(target_mm / s))) for s in (sz, sy, sx))


def block_mean(array: np.ndarray, factors: tuple[int, int, int], slab_voxels: int = 2**25) -> np.ndarray:
    """Mean over non-overlapping blocks of ``factors`` voxels ``[k, j, i]`` (a block cut by the array's end:
    the mean of the voxels it has). ``float32 [k, j, i]`` out.

    Works through slabs of whole blocks along k of about ``slab_voxels`` voxels and reduces one axis at a time,
    so no float copy of the whole input is ever made (a whole 1024 × 1024 × 1000
    scan would need 4 GiB as float32).
    """
    step = factors[0] * max(1, slab_voxels // (factors[0] * array.shape[1] * array.shape[2]))
    means = []
    for start in range(0, array.shape[0], step):
        a = array[start : start + step]
        for axis in (2, 1, 0):  # the contiguous axis first: the later passes see fewer voxels
            a = _axis_block_mean(a, factors[axis], axis)
        means.append(a)
    return np.concatenate(means)


def _axis_block_mean(a: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Means of consecutive runs of ``factor`` elements along ``axis`` (the last run may be shorter)."""
    if factor == 1:
        return a.astype(np.float32, copy=False)
    n = a.shape[axis]
    whole = n // factor * factor
    lead = (slice(None),) * axis
    out = a[lead + (slice(0, whole, factor),)].astype(np.float32)
    for offset in range(1, factor):  # strided adds: several times faster than a sum over a reshaped axis
        out += a[lead + (slice(offset, whole, factor),)]
    out /= factor
    if whole < n:
        tail = a[(slice(None),) * axis + (slice(whole, n),)].sum(axis=axis, keepdims=True, dtype=np.float32)
        out = np.concatenate([out, tail / (n - whole)], axis=axis)
    return out


def _hull_slices(mask: np.ndarray, max_ratio: float = 1.5) -> np.ndarray:
    """Per axial slice and per 2D component: its convex hull when hull area <= ``max_ratio`` × area."""
    out = mask.copy()
    for z in range(mask.shape[0]):
        labels, n = ndimage.label(mask[z])
        if n == 0:
            continue
        for sl_index, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == sl_index
            area = comp.sum()
            if area < 10:
                continue
            hull = convex_hull_image(comp)
            if hull.sum() <= max_ratio * area:
                out[z][sl] |= hull
    return out


def lung_mask(volume: CTVolume, coarse_mm: float = 2.0, margin_mm: float = 4.0) -> LungMask:
    """Segment both lungs, keeping juxtapleural nodules inside the mask.

    Args:
        volume: CT in HU; padding already replaced by air.
        coarse_mm: working voxel size of the morphology (mm).
        margin_mm: dilation added around the lungs (mm).

    Returns:
        ``LungMask`` with a ``bool [k, j, i]`` mask on the input grid.
    """
    factors = _block_factors(volume.geometry.spacing, coarse_mm)
    coarse = block_mean(volume.array, factors)
    voxel_mm = np.array([volume.geometry.spacing[2], volume.geometry.spacing[1], volume.geometry.spacing[0]])
    voxel_mm = voxel_mm * np.array(factors)
    voxel_ml = float(np.prod(voxel_mm)) / 1000.0

    air = coarse < -400
    labels, n = ndimage.label(air)
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel(),
    ]))
    sizes = ndimage.sum_labels(air, labels, index=np.arange(n + 1))
    sizes[border] = 0
    sizes[0] = 0
    warnings: list[str] = []
    if n == 0 or sizes.max() == 0:
        mask_c = np.zeros_like(air)
    else:
        # Lungs: the largest inner air region and any other region at least 10% of it (the other lung).
        keep = sizes >= max(0.1 * sizes.max(), 20.0 / voxel_ml)
        mask_c = keep[labels]
    if mask_c.any():
        mask_c = _hull_slices(mask_c)
        radius = max(1, int(round(6.0 / voxel_mm[1])))
        ball = _ball(radius, voxel_mm)
        mask_c = ndimage.binary_closing(np.pad(mask_c, radius), structure=ball)[
            radius:-radius, radius:-radius, radius:-radius]
        for z in range(mask_c.shape[0]):
            mask_c[z] = ndimage.binary_fill_holes(mask_c[z])
        grow = max(1, int(round(margin_mm / voxel_mm[1])))
        mask_c = ndimage.binary_dilation(mask_c, structure=_ball(grow, voxel_mm))
    volume_ml = float(mask_c.sum()) * voxel_ml
    if volume_ml < MIN_LUNG_VOLUME_ML:
        warnings.append(
            f"lung field partial or missing: only {volume_ml:.0f} mL of lung found "
            f"(a chest CT has several litres); detections are unreliable"
        )
    mask = _upsample_blocks(mask_c, factors, volume.array.shape)
    return LungMask(mask=mask, volume_ml=volume_ml, warnings=warnings)


def _ball(radius: int, voxel_mm: np.ndarray) -> np.ndarray:
    """An ellipsoidal structuring element of ``radius`` voxels in-plane, scaled for anisotropic voxels."""
    r = np.maximum(1, np.round(radius * voxel_mm[1] / voxel_mm)).astype(int)
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    return (zz / r[0]) ** 2 + (yy / r[1]) ** 2 + (xx / r[2]) ** 2 <= 1.0


def _upsample_blocks(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour inverse of ``block_mean``: repeat each coarse voxel, cut to ``shape``.

    In-plane first, cut, then along k: the only full-size array made is the result.
    """
    fz, fy, fx = factors
    planes = np.repeat(np.repeat(mask, fy, axis=1), fx, axis=2)[:, : shape[1], : shape[2]]
    return np.ascontiguousarray(np.repeat(planes, fz, axis=0)[: shape[0]])


def bounding_box(mask: np.ndarray, geometry: Geometry, margin_mm: float) -> tuple[slice, slice, slice]:
    """Bounding box ``[k, j, i]`` slices of ``mask`` grown by ``margin_mm`` (whole image if empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    sx, sy, sz = geometry.spacing
    box = []
    for axis, s in zip(range(3), (sz, sy, sx)):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        pad = int(np.ceil(margin_mm / s))
        box.append(slice(max(0, idx[0] - pad), min(mask.shape[axis], idx[-1] + pad + 1)))
    return tuple(box)  # type: ignore[return-value]


def resample(
    array: np.ndarray, geometry: Geometry, spacing_mm: float, mode: str = "trilinear"
) -> tuple[np.ndarray, Geometry]:
    """Resample ``array [k, j, i]`` to an isotropic grid of about ``spacing_mm``.

    The grid keeps the input's direction and extent; each axis gets ``round(n · s / spacing_mm)`` voxels,
    so the exact spacing (returned in the geometry) differs from ``spacing_mm`` by under half a voxel over
    the extent. Voxel centres follow ``align_corners=False``: new index ``m`` sits at old continuous index
    ``(m + 0.5) · n / n' - 0.5``.

    Args:
        array: image or mask ``[k, j, i]``.
        geometry: its geometry.
        spacing_mm: target voxel size in mm.
        mode: ``"trilinear"`` (images) or ``"nearest"`` (labels).

    Returns:
        ``(float32 array [k, j, i], geometry)`` of the resampled grid.
    """
    old = np.array(array.shape)
    sp_kji = np.array(geometry.spacing[::-1])
    new = np.maximum(1, np.round(old * sp_kji / spacing_mm)).astype(int)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    out = F.interpolate(t, size=tuple(int(n) for n in new), mode=mode, **kwargs)[0, 0].numpy()
    scale_kji = old / new
    new_spacing = tuple((sp_kji * scale_kji)[::-1])
    offset_ijk = tuple((0.5 * scale_kji - 0.5)[::-1])
    return out, geometry.with_spacing(new_spacing, offset_ijk)


def normalize_hu(array: np.ndarray, hu_min: float = -1000.0, hu_max: float = 400.0) -> np.ndarray:
    """Clip HU to ``[hu_min, hu_max]`` and scale to ``[0, 1]`` (a new float32 array, same shape).

    Works in place on one float32 copy, so a large crop costs one float32 array, not three.
    """
    a = np.array(array, dtype=np.float32)
    np.clip(a, hu_min, hu_max, out=a)
    a -= hu_min
    a /= hu_max - hu_min
    return a


def lungs_only(image: np.ndarray, lung: np.ndarray, fill_hu: float | None,
               hu_window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """A normalised working-grid image ``[k, j, i]`` with every voxel outside ``lung`` (same shape) set to
    ``fill_hu`` (HU, normalised by ``hu_window``); ``fill_hu`` ``None``: ``image`` itself, unchanged."""
    if fill_hu is None:
        return image
    if lung.shape != image.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from the image's {image.shape}")
    fill = normalize_hu(np.float32(fill_hu), *hu_window)
    return np.where(lung, image, fill).astype(np.float32, copy=False)


@dataclass
class Prepared:
    """A scan ready for stage 1: cropped to the lungs, resampled, normalised.

    Attributes:
        image: normalised intensities ``float32 [k, j, i]`` on the working grid.
        lung: lung mask ``bool [k, j, i]`` on the working grid.
        geometry: the working grid's geometry (LPS).
        crop: the input-grid box ``[k, j, i]`` that the working grid covers.
        lungs: the lung mask on the input grid.
    """

    image: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    crop: tuple[slice, slice, slice]
    lungs: LungMask


def prepare(volume: CTVolume, spacing_mm: float, hu_window: tuple[float, float] = (-1000.0, 400.0),
            crop_margin_mm: float = 10.0) -> Prepared:
    """Lung mask → crop to the lungs (plus ``crop_margin_mm``) → resample → normalise HU."""
    lungs = lung_mask(volume)
    crop = bounding_box(lungs.mask, volume.geometry, crop_margin_mm)
    start = (crop[2].start, crop[1].start, crop[0].start)
    geometry = volume.geometry.cropped(start)
    image, work_geometry = resample(normalize_hu(volume.array[crop], *hu_window), geometry, spacing_mm)
    lung, _ = resample(lungs.mask[crop].astype(np.float32), geometry, spacing_mm)
    return Prepared(image=image, lung=lung > 0.5, geometry=work_geometry, crop=crop, lungs=lungs)


def crop_patches(arrays: Sequence[np.ndarray], centre: np.ndarray, size: int) -> list[np.ndarray]:
    """``size``³ patches centred at ``centre`` ``[k, j, i]`` from same-shape arrays (zero outside)."""
    shape = np.array(arrays[0].shape)
    lo = np.round(centre).astype(int) - size // 2
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + size, shape)
    d_lo = src_lo - lo
    d_hi = d_lo + np.maximum(src_hi - src_lo, 0)
    out = []
    for a in arrays:
        p = np.zeros((size, size, size), np.float32)
        if np.all(src_hi > src_lo):
            p[d_lo[0]:d_hi[0], d_lo[1]:d_hi[1], d_lo[2]:d_hi[2]] = a[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1],
                                                                  src_lo[2]:src_hi[2]]
        out.append(p)
    return out


def sample_patches(
    array: np.ndarray, geometry: Geometry, centers_lps: np.ndarray, size: int, spacing_mm: float,
    fill: float = AIR_HU,
) -> np.ndarray:
    """Extract cubic patches centred on LPS points by trilinear interpolation.

    Patches are axis-aligned with the image's index axes (so a flip of the image direction flips the
    patch), with isotropic ``spacing_mm`` voxels; outside the image ``fill`` is used.

    Args:
        array: image ``[k, j, i]``.
        geometry: its geometry.
        centers_lps: ``(N, 3)`` LPS mm.
        size: patch edge in voxels.
        spacing_mm: patch voxel size in mm.

    Returns:
        ``float32 (N, size, size, size)`` patches, indexed ``[k, j, i]``.
    """
    centers_lps = np.asarray(centers_lps, dtype=float).reshape(-1, 3)
    if len(centers_lps) == 0:
        return np.zeros((0, size, size, size), np.float32)
    offs = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    sp = np.asarray(geometry.spacing)
    centers_ijk = geometry.lps_to_index(centers_lps)
    out = np.empty((len(centers_lps), size, size, size), np.float32)
    zz, yy, xx = np.meshgrid(offs / sp[2], offs / sp[1], offs / sp[0], indexing="ij")
    for n, (ci, cj, ck) in enumerate(centers_ijk):
        coords = np.stack([zz + ck, yy + cj, xx + ci])
        out[n] = ndimage.map_coordinates(array, coords, output=np.float32, order=1, mode="constant", cval=fill,
                                         prefilter=False)
    return out
