"""Voxel ↔ LPS ↔ RAS conversions, checked against SimpleITK on identity, flipped and oblique grids."""

import numpy as np
import pytest
import SimpleITK as sitk
from NoduleDetectionLib.geometry import Geometry, lps_to_ras, ras_to_lps
from scipy.spatial.transform import Rotation

DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": Rotation.from_euler("xyz", [12, -25, 40], degrees=True).as_matrix(),
    "oblique-flipped": Rotation.from_euler("zx", [33, 8], degrees=True).as_matrix() @ np.diag([1.0, -1.0, 1.0]),
}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_index_to_lps_matches_simpleitk(name):
    direction = DIRECTIONS[name]
    geo = Geometry((0.7, 0.8, 2.5), (-166.0, -171.7, -340.0), direction)
    img = sitk.Image(10, 12, 14, sitk.sitkInt16)
    img.SetSpacing(geo.spacing)
    img.SetOrigin(geo.origin)
    img.SetDirection(direction.ravel().tolist())
    rng = np.random.default_rng(0)
    for ijk in rng.uniform(-2, 15, size=(20, 3)):
        expected = img.TransformContinuousIndexToPhysicalPoint(ijk.tolist())
        np.testing.assert_allclose(geo.index_to_lps(ijk), expected, atol=1e-9)
        np.testing.assert_allclose(geo.lps_to_index(expected), ijk, atol=1e-9)


@pytest.mark.parametrize("name", DIRECTIONS)
def test_round_trips_and_slicer_matrix(name):
    geo = Geometry((0.6, 0.6, 1.25), (10.0, -20.0, 30.0), DIRECTIONS[name])
    pts = np.random.default_rng(1).uniform(-50, 50, size=(7, 3))
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(pts)), pts)
    np.testing.assert_allclose(lps_to_ras(pts)[:, :2], -pts[:, :2])
    np.testing.assert_allclose(geo.index_to_lps(geo.lps_to_index(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(geo.ras_to_index(geo.index_to_ras(pts)), pts, atol=1e-9)
    # Slicer's IJKToRASMatrix = diag(-1,-1,1,1) · [direction·diag(spacing) | origin]
    m = geo.ijk_to_ras
    hom = np.c_[pts, np.ones(len(pts))]
    np.testing.assert_allclose((hom @ m.T)[:, :3], geo.index_to_ras(pts), atol=1e-9)
    assert Geometry.from_ijk_to_ras(m) == geo


def test_crop_keeps_world_positions():
    geo = Geometry((0.7, 0.8, 2.5), (1.0, 2.0, 3.0), DIRECTIONS["oblique"])
    sub = geo.cropped((5, 6, 7))
    np.testing.assert_allclose(sub.index_to_lps([0, 0, 0]), geo.index_to_lps([5, 6, 7]))
    np.testing.assert_allclose(sub.index_to_lps([1, 2, 3]), geo.index_to_lps([6, 8, 10]))


@pytest.mark.parametrize("spacing", [(0, 1, 1), (1, -1, 1), (1, 1, float("nan"))])
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match="spacing"):
        Geometry(spacing, (0, 0, 0))
