"""``regions``: per-region maxima, sums and centres, the same numbers as scipy's labelled statistics."""

import numpy as np
from NoduleDetectionLib.regions import region_centroids, region_counts, region_max, region_sums
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


def test_region_sums_and_centroids_match_scipy_bit_for_bit():
    rng = np.random.default_rng(3)
    values = rng.random((30, 40, 50), dtype=np.float32)
    regions, n = ndimage.label(values > 0.93)
    ids = np.array([n, 1, 5, n // 2])
    assert np.array_equal(region_sums(values, regions, ids), ndimage.sum_labels(values, regions, ids))
    assert np.array_equal(region_sums(values >= 0.95, regions, ids), ndimage.sum_labels(values >= 0.95, regions, ids))
    assert np.array_equal(region_centroids(values, regions, ids),
                          np.array(ndimage.center_of_mass(values, regions, ids)))
    assert region_sums(values, regions, np.array([], int)).shape == (0,)
    assert region_centroids(values, regions, np.array([], int)).shape == (0, 3)


def test_region_counts_match_scipy():
    rng = np.random.default_rng(4)
    regions, n = ndimage.label(rng.random((20, 30, 40)) > 0.9)
    ids = np.array([n, 1, n // 2, n + 3])  # n + 3 labels no voxel
    expected = ndimage.sum_labels(np.ones(regions.shape), regions, ids)
    assert np.array_equal(region_counts(regions, ids), expected)
    assert region_counts(regions, np.array([], int)).shape == (0,)
