"""``regions.region_max``: the same numbers as scipy's labelled maximum."""

import numpy as np
from NoduleDetectionLib.regions import region_max
from scipy import ndimage


def test_region_max_matches_scipy_on_labelled_voxels_only():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(20, 30, 40)).astype(np.float32)
    regions = np.zeros(values.shape, np.int32)
    regions[2:5, 3:9, 4:6] = 1
    regions[10, 10, 10] = 2
    regions[12:18, 20:29, 30:39] = 4
    ids = np.array([4, 1, 2, 3])  # any order; 3 labels no voxel
    expected = np.asarray(ndimage.maximum(values, regions, ids), float)
    np.testing.assert_array_equal(region_max(values, regions, ids), expected)
    assert region_max(values, regions, np.array([], int)).shape == (0,)
    assert region_max(values, regions, [2])[0] == values[10, 10, 10]
