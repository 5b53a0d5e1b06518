"""Per-region statistics of label maps that mark a small part of a volume (candidate regions on the working grid)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def region_max(values: np.ndarray, regions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The highest of ``values`` in each region ``ids`` (positive labels) of the label map ``regions`` (both
    ``[k, j, i]``, same shape); ``float64 (len(ids),)``.

    The same numbers as ``scipy.ndimage.maximum(values, regions, ids)``, read from the labelled voxels only: on a
    working grid of millions of voxels with a few thousand labelled, about a thousand times faster.
    """
    ids = np.asarray(ids, int).reshape(-1)
    if ids.size == 0:
        return np.zeros(0)
    labelled = regions > 0
    return np.asarray(ndimage.maximum(values[labelled], regions[labelled], ids), float).reshape(-1)


def region_sums(values: np.ndarray, regions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The sum of ``values`` over each region ``ids`` of ``regions`` (as ``region_max``); ``float64 (len(ids),)``.

    Bit for bit ``scipy.ndimage.sum_labels(values, regions, ids)``: the same additions in the same (raster) order,
    over the labelled voxels only.
    """
    ids = np.asarray(ids, int).reshape(-1)
    labelled = regions > 0
    return _bincount(regions[labelled], values[labelled], ids)


def region_counts(regions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The number of voxels of each region ``ids`` of ``regions``; ``float64 (len(ids),)`` (``region_sums`` of ones,
    without a full-grid array of ones)."""
    ids = np.asarray(ids, int).reshape(-1)
    return _bincount(regions[regions > 0], None, ids).astype(float)


def region_centroids(values: np.ndarray, regions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The ``values``-weighted centre of each region ``ids`` of ``regions``, in array index units ``(k, j, i)``;
    ``float64 (len(ids), 3)``. Bit for bit ``scipy.ndimage.center_of_mass(values, regions, ids)``, over the labelled
    voxels only."""
    ids = np.asarray(ids, int).reshape(-1)
    labelled = regions > 0
    labels, weights = regions[labelled], values[labelled]
    total = _bincount(labels, weights, ids)
    axes = [_bincount(labels, weights * index.astype(float), ids) / total for index in np.nonzero(labelled)]
    return np.stack(axes, axis=1).reshape(-1, 3)


def _bincount(labels: np.ndarray, weights: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    if ids.size == 0:
        return np.zeros(0)
    length = max(int(ids.max()), int(labels.max()) if labels.size else 0) + 1
    return np.bincount(labels, weights=weights, minlength=length)[ids]
