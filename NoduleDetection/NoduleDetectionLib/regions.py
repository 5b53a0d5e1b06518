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
