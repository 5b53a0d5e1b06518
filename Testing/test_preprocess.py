"""Lung mask, cropping, resampling and patch sampling."""

import csv

import numpy as np
import pytest
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.preprocess import (
    bounding_box,
    lung_mask,
    lungs_only,
    normalize_hu,
    resample,
    sample_patches,
)
from NoduleDetectionLib.synthetic import make_phantom


def _ball_fraction(mask, geometry, centre_lps, radius_mm):
    """Fraction of the voxels of a ball (LPS centre, mm radius) that lie inside ``mask``."""
    c = geometry.lps_to_index(centre_lps)
    sp = np.array(geometry.spacing)
    r = np.ceil(radius_mm / sp).astype(int)
    ii, jj, kk = (np.arange(int(c[a]) - r[a], int(c[a]) + r[a] + 2) for a in range(3))
    gi, gj, gk = np.meshgrid(ii, jj, kk, indexing="ij")
    pts = np.stack([gi.ravel(), gj.ravel(), gk.ravel()], 1)
    inside = np.linalg.norm((pts - c) * sp, axis=1) <= radius_mm
    pts = pts[inside]
    ok = np.all((pts >= 0) & (pts < np.array(mask.shape[::-1])), axis=1)
    return mask[pts[ok, 2], pts[ok, 1], pts[ok, 0]].mean()


def _nodules(shared_data, scan):
    with open(shared_data / "annotations.csv") as f:
        return [r for r in csv.DictReader(f) if r["scan"] == scan and r["status"] in ("nodule", "mass")]


@pytest.mark.parametrize("scan", ["LIDC-IDRI-0001", "LIDC-IDRI-0003.nrrd"])
def test_lung_mask_covers_annotated_nodules(shared_data, scan):
    """The whole of every annotated nodule lies in the mask, juxtapleural ones (0003) included."""
    volume = read_ct(shared_data / "ct" / scan)
    lungs = lung_mask(volume)
    assert 3000 < lungs.volume_ml < 10000 and not lungs.warnings
    rows = _nodules(shared_data, scan)
    assert rows
    for row in rows:
        centre = np.array([float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])])
        frac = _ball_fraction(lungs.mask, volume.geometry, centre, float(row["diameter_mm"]) / 2)
        assert frac == 1.0, (row["coordX"], frac)
    # The mask is not the whole body: the mediastinum and the air outside the body are excluded.
    assert lungs.mask.mean() < 0.5
    assert not lungs.mask[:, 0, :].any() and not lungs.mask[:, :, 0].any()


def test_abdomen_scan_warns_of_partial_lung_field(shared_data):
    volume = read_ct(shared_data / "ct" / "totalsegmentator-example-abdomen.nii.gz")
    lungs = lung_mask(volume)
    assert any("lung field partial or missing" in w for w in lungs.warnings)


def test_resample_keeps_world_positions():
    """A bright voxel stays at the same LPS position after resampling to another spacing and direction."""
    geo = Geometry((0.7, 0.7, 2.5), (5.0, -3.0, 10.0), np.diag([-1.0, 1.0, 1.0]))
    array = np.zeros((20, 60, 50), np.float32)
    array[10, 30, 20] = 1.0
    out, new_geo = resample(array, geo, 1.0)
    assert new_geo.spacing == pytest.approx((0.7 * 50 / 35, 0.7 * 60 / 42, 2.5 * 20 / 50))
    peak = np.array(np.unravel_index(np.argmax(out), out.shape))[::-1]
    np.testing.assert_allclose(new_geo.index_to_lps(peak), geo.index_to_lps([20, 30, 10]), atol=1.0)
    centroid = (np.argwhere(out > 0) * out[out > 0][:, None]).sum(0) / out.sum()
    np.testing.assert_allclose(new_geo.index_to_lps(centroid[::-1]), geo.index_to_lps([20, 30, 10]), atol=0.25)


def test_sample_patches_centred_on_lps_point():
    rng = np.random.default_rng(3)
    ph = make_phantom(rng, n_nodules=1, n_vessels=0, noise_hu=0.0, direction=np.diag([1.0, -1.0, -1.0]))
    centre, diameter = ph.nodules[0]
    patch = sample_patches(ph.volume.array, ph.volume.geometry, centre[None], 15, 1.0)[0]
    assert patch.shape == (15, 15, 15)
    assert patch[7, 7, 7] > 0  # nodule tissue at the centre
    assert patch[0, 0, 0] < -500  # lung around it
    # symmetric about the centre (a sphere): opposite corners agree within noise-free tolerance
    assert abs(float(patch[7, 7, 7 - 5]) - float(patch[7, 7, 7 + 5])) < 60


def test_bounding_box_and_normalisation():
    mask = np.zeros((10, 20, 30), bool)
    mask[3:5, 6:9, 10:20] = True
    box = bounding_box(mask, Geometry((1.0, 1.0, 2.0), (0, 0, 0)), margin_mm=2.0)
    assert box == (slice(2, 6), slice(4, 11), slice(8, 22))
    assert normalize_hu(np.array([-3000, -1000, 400, 2000])).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_lungs_only_fills_outside_the_lung():
    rng = np.random.default_rng(0)
    image = rng.random((6, 7, 8)).astype(np.float32)
    lung = rng.random(image.shape) > 0.5
    masked = lungs_only(image, lung, 0.0, (-1000.0, 400.0))
    assert masked.dtype == np.float32 and masked.shape == image.shape
    np.testing.assert_array_equal(masked[lung], image[lung])
    np.testing.assert_allclose(masked[~lung], 1000.0 / 1400.0)  # water on the [-1000, 400] HU window
    assert lungs_only(image, lung, None) is image
    with pytest.raises(ValueError, match="shape"):
        lungs_only(image, lung[:-1], 0.0)
