"""Masses (over 30 mm) are found by morphology inside the lungs, and nothing else is."""

import numpy as np
import pytest
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.masses import find_masses
from NoduleDetectionLib.preprocess import prepare
from NoduleDetectionLib.synthetic import make_phantom
from NoduleDetectionLib.volume import CTVolume
from scipy import ndimage

WINDOW = (-1000.0, 400.0)


def _phantom_with_ball(diameter_mm: float) -> tuple[CTVolume, np.ndarray]:
    """A phantom chest (no nodules) with one solid ball of ``diameter_mm`` inside its right lung."""
    ph = make_phantom(np.random.default_rng(3), shape=(80, 128, 160), spacing=(2.0, 2.0, 2.0), n_nodules=0,
                      n_vessels=6)
    vol = ph.volume
    lung = prepare(vol, 2.0).lungs.mask
    # Deepest point of the lung half with the smaller i (LPS x): inside one lung, away from its walls.
    depth = ndimage.distance_transform_edt(lung)
    depth[:, :, vol.array.shape[2] // 2:] = 0
    k, j, i = np.unravel_index(np.argmax(depth), depth.shape)
    kk, jj, ii = np.ogrid[: vol.array.shape[0], : vol.array.shape[1], : vol.array.shape[2]]
    ball = ((kk - k) ** 2 + (jj - j) ** 2 + (ii - i) ** 2) * 4.0 <= (diameter_mm / 2) ** 2
    array = vol.array.copy()
    array[ball] = 40.0
    return CTVolume(array, vol.geometry, name="ball"), ball


def _masses(vol: CTVolume) -> list[tuple]:
    prep = prepare(vol, 1.5, WINDOW)
    return [(prep, m) for m in find_masses(prep.image, prep.lung, prep.geometry, WINDOW, 30.0)]


def test_a_40mm_ball_in_the_lung_is_a_mass():
    vol, ball = _phantom_with_ball(40.0)
    found = _masses(vol)
    assert len(found) == 1
    prep, mask = found[0]
    centre = prep.geometry.index_to_lps(np.argwhere(mask).mean(axis=0)[::-1])
    truth = vol.geometry.index_to_lps(np.argwhere(ball).mean(axis=0)[::-1])
    assert np.linalg.norm(centre - truth) < 3.0
    diameter = (6 * mask.sum() * 1.5**3 / np.pi) ** (1 / 3)
    assert 34.0 < diameter < 44.0


def test_a_20mm_ball_is_not_a_mass():
    vol, _ = _phantom_with_ball(20.0)
    assert _masses(vol) == []


@pytest.mark.parametrize("scan, expected", [
    ("pyradiomics-lung2.nrrd", [(52.6, -95.9, -256.5)]),  # the annotated 45 mm mass
    ("LIDC-IDRI-0002.nrrd", []),                            # heart, aortic arch, hila: not masses
])
def test_real_scans(shared_data, scan, expected):
    vol = read_ct(shared_data / "ct" / scan)
    found = _masses(vol)
    assert len(found) == len(expected)
    for (prep, mask), truth in zip(found, expected):
        centre = prep.geometry.index_to_lps(np.argwhere(mask).mean(axis=0)[::-1])
        assert np.linalg.norm(centre - np.array(truth)) < 10.0


def test_detector_reports_the_mass_with_its_outline(tiny_model_path):
    vol, ball = _phantom_with_ball(40.0)
    result = Detector.load(tiny_model_path, device="cpu").detect(vol)
    masses = [n for n in result.nodules if n.kind == "mass"]
    assert len(masses) == 1 and masses[0].probability == 1.0
    outline = result.label_map == masses[0].label
    assert (outline & ball).sum() / ball.sum() > 0.8 and (outline & ~ball).sum() / ball.sum() < 0.2
