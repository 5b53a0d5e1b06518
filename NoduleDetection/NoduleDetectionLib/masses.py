"""Lung masses (solid lesions over 30 mm) by morphology, beside the networks.

Both networks learn from lesions of 3-30 mm (the LUNA16 range), so a mass, whose centre is a large uniform
block of soft tissue, looks to them like neither a nodule nor lung. A mass is instead what survives a
morphological opening of the solid tissue inside the lung mask: tissue denser than ``MASS_HU`` whose core
is at least ``2 * CORE_RADIUS_MM`` thick (vessels and airway walls inside the lungs are thinner), grown
back to its outline, and larger than the model's mass diameter. The opening runs on a grid twice as coarse
as the working grid (3 mm for the default 1.5 mm): enough to outline lesions of 30 mm and more, and fast.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import Geometry
from .preprocess import block_mean

#: Solid tissue, HU.
MASS_HU = -300.0
#: A mass core is at least twice this thick (mm) everywhere; vessels inside the lung are thinner.
CORE_RADIUS_MM = 10.0
#: Pockets of the lung narrower than twice this (mm) belong to it (see ``find_masses``).
POCKET_RADIUS_MM = 25.0
#: A mass lies mostly (this fraction of its volume) in a lung's cavity; the heart and great vessels do not.
MIN_INSIDE = 0.5


def _downsample(mask: np.ndarray, factor: int) -> np.ndarray:
    """A boolean ``[k, j, i]`` mask coarsened by ``factor`` along each axis: block means above 1/2."""
    return block_mean(mask, (factor, factor, factor)) > 0.5


def _closing(mask: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Morphological closing of ``mask`` by a ball of ``POCKET_RADIUS_MM`` (exact, by distance transforms)."""
    pad = int(np.ceil(POCKET_RADIUS_MM / sampling.min())) + 1
    grown = ndimage.distance_transform_edt(np.pad(~mask, pad, constant_values=True), sampling=sampling)
    closed = ndimage.distance_transform_edt(grown <= POCKET_RADIUS_MM, sampling=sampling) > POCKET_RADIUS_MM
    return closed[pad:-pad, pad:-pad, pad:-pad]


def find_masses(image: np.ndarray, lung: np.ndarray, geometry: Geometry, hu_window: tuple[float, float],
                min_diameter_mm: float, factor: int = 2) -> list[np.ndarray]:
    """Masses inside the lungs of a prepared scan.

    Args:
        image: normalised intensities ``float32 [k, j, i]`` on the working grid (``preprocess.prepare``).
        lung: lung mask ``bool [k, j, i]`` on the same grid.
        geometry: the working grid's geometry (LPS; only its spacing is used).
        hu_window: the HU window that normalised ``image``.
        min_diameter_mm: report masses whose equivalent-sphere diameter exceeds this (mm).
        factor: coarsening of the working grid for the opening.

    Returns:
        One boolean mask ``[k, j, i]`` on the working grid per mass, largest first.
    """
    lo, hi = hu_window
    solid = image >= (MASS_HU - lo) / (hi - lo)
    sampling = np.asarray(geometry.spacing[::-1], float) * factor  # [k, j, i] mm
    tissue = _downsample(solid & lung, factor)
    core = ndimage.distance_transform_edt(tissue, sampling=sampling) > CORE_RADIUS_MM
    air = _downsample(~solid & lung, factor)
    if not core.any() or not air.any():
        return []
    opened = (ndimage.distance_transform_edt(~core, sampling=sampling) <= CORE_RADIUS_MM) & tissue
    labels, n = ndimage.label(opened)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(opened, labels, index) * float(np.prod(sampling))
    diameters = (6.0 * sizes / np.pi) ** (1.0 / 3.0)
    # Each lung's own cavity: its air closed by a ball of POCKET_RADIUS_MM, which fills the pocket a lesion
    # makes in the lung but not the mediastinum between the lungs nor the diaphragm's dome, which the lung
    # mask's hull may hold. The lungs are told apart by the sagittal plane through the middle of their air.
    # LPS x (mm, up to a constant) of every coarse voxel: direction row 0 · spacing · [i, j, k] index.
    steps = np.asarray(geometry.direction)[0] * np.asarray(geometry.spacing) * factor
    k, j, i = np.ogrid[: air.shape[0], : air.shape[1], : air.shape[2]]
    x = i * steps[0] + j * steps[1] + k * steps[2]
    right = x < np.median(np.broadcast_to(x, air.shape)[air])
    cavity = _closing(air & right, sampling) | _closing(air & ~right, sampling)
    inside = ndimage.sum_labels(cavity, labels, index) * float(np.prod(sampling)) / np.maximum(sizes, 1e-9)
    masses = []
    for region in np.argsort(-sizes, kind="stable") + 1:
        if diameters[region - 1] <= min_diameter_mm or inside[region - 1] < MIN_INSIDE:
            continue
        fine = (labels == region)
        for axis in range(3):
            fine = np.repeat(fine, factor, axis=axis)
        masses.append(fine[: image.shape[0], : image.shape[1], : image.shape[2]] & solid & lung)
    return masses
