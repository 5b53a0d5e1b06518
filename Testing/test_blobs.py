"""The blob filter's small-nodule proposals, alone and as the detector's extra candidates."""

import numpy as np
import pytest
from NoduleDetectionLib import blobs
from NoduleDetectionLib.blobs import ShapeFilter, blob_outline, find_blobs, symmetric_eigenvalues
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.preprocess import prepare
from NoduleDetectionLib.synthetic import make_phantom


def test_closed_form_eigenvalues_match_lapack():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3, 3))
    a = a + a.transpose(0, 2, 1)
    a[:5] = np.eye(3) * rng.normal(size=(5, 1, 1))  # repeated eigenvalues: the formula's special case
    ref = np.linalg.eigvalsh(a)
    smallest, largest = symmetric_eigenvalues(np.array([a[:, 0, 0], a[:, 1, 1], a[:, 2, 2],
                                                        a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]]))
    np.testing.assert_allclose(smallest, ref[:, 0], atol=1e-9)
    np.testing.assert_allclose(largest, ref[:, 2], atol=1e-9)


def _ball(shape, spacing_kji, centre_kji, radius_mm):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre_kji, spacing_kji)) <= radius_mm**2


@pytest.fixture(scope="module")
def lung_scene():
    """Normalised intensities on a 1.5 mm grid ``[k, j, i]``: lung (0.1) and, from i = 60 on, chest wall (0.7); a
    5 mm nodule touching the wall, a free 4 mm nodule, and a 3 mm vessel along k through the whole volume."""
    shape, sp = (40, 48, 72), np.array([1.5, 1.5, 1.5])
    image = np.full(shape, 0.1, np.float32)
    image[:, :, 60:] = 0.7
    pleural = (20, 16, 60 - 1.5)  # centre 2.25 mm from the wall: the nodule sits on it
    free = (14, 34, 20)
    for centre, radius in ((pleural, 2.5), (free, 2.0)):
        image[_ball(shape, sp, centre, radius)] = 0.65
    j, i = np.ogrid[:shape[1], :shape[2]]
    image[:, ((j - 30) * 1.5) ** 2 + ((i - 42) * 1.5) ** 2 <= 1.5**2] = 0.6
    image += np.random.default_rng(1).normal(0, 0.01, shape).astype(np.float32)
    lung = np.zeros(shape, bool)
    lung[:, :, :63] = True  # the lung mask reaches a little into the wall, as ``lung_mask`` does
    geometry = Geometry(tuple(sp[::-1]), (0.0, 0.0, 0.0))
    return image, lung, geometry, [np.array(pleural), np.array(free)]


def test_both_nodules_outrank_the_vessel_and_the_wall(lung_scene):
    image, lung, geometry, nodules = lung_scene
    blobs = find_blobs(image, lung, geometry, count=10)
    assert len(blobs.kji) >= 2 and np.all(np.diff(blobs.strength) <= 0)
    top_two = blobs.kji[:2].astype(float)
    for centre in nodules:
        assert np.min(np.linalg.norm((top_two - centre) * 1.5, axis=1)) <= 2.0, (centre, top_two)


def test_wider_filter_finds_a_large_nodule(lung_scene):
    """The detector's filter (9 mm top-hat, scales for 3-8 mm) does not see a free 20 mm nodule as a blob; with a
    wider top-hat and larger scales (the classical baseline's) it is the strongest spot."""
    image, lung, geometry, _ = lung_scene
    image = image.copy()
    centre = np.array([20.0, 24.0, 30.0])
    image[_ball(image.shape, np.array([1.5, 1.5, 1.5]), centre, 10.0)] = 0.65

    def nearest_mm(found):
        return float(np.min(np.linalg.norm((found.kji.astype(float) - centre) * 1.5, axis=1))) if len(found.kji) \
            else np.inf

    assert nearest_mm(find_blobs(image, lung, geometry, count=10)) > 5.0
    wide = ShapeFilter(image, geometry, tophat_mm=33.0, scales_mm=(1.0, 2.2, 4.6, 6.5))
    found = find_blobs(image, lung, geometry, count=10, shapes=wide)
    assert np.linalg.norm((found.kji[0] - centre) * 1.5) <= 3.0


def test_proposals_avoid_excluded_voxels(lung_scene):
    image, lung, geometry, nodules = lung_scene
    exclude = _ball(image.shape, np.full(3, 1.5), nodules[1], 6.0)
    blobs = find_blobs(image, lung, geometry, count=10, exclude=exclude)
    assert not exclude[tuple(blobs.kji.T)].any()
    assert np.min(np.linalg.norm((blobs.kji[:1] - nodules[0]) * 1.5, axis=1)) <= 2.0


def test_outline_covers_the_nodule_not_the_wall(lung_scene):
    image, lung, geometry, nodules = lung_scene
    blobs = find_blobs(image, lung, geometry, count=2)
    n = int(np.argmin(np.linalg.norm(blobs.kji - nodules[0], axis=1)))
    box, mask = blob_outline(blobs, n, geometry, np.ones(image.shape, bool))
    volume_mm3 = mask.sum() * 1.5**3
    assert 0.3 * (np.pi / 6 * 5.0**3) <= volume_mm3 <= 3.0 * (np.pi / 6 * 5.0**3)
    assert (np.nonzero(mask)[2] + box[2].start).max() <= 62  # never more than a voxel or two into the wall
    only_peak = np.zeros(image.shape, bool)
    only_peak[tuple(blobs.kji[n])] = True
    assert blob_outline(blobs, n, geometry, only_peak)[1].sum() == 1
    assert not blob_outline(blobs, n, geometry, ~only_peak)[1].any()  # its peak taken: no outline


def test_region_dotness_rates_both_nodules_above_the_vessel_and_the_wall(lung_scene):
    image, lung, geometry, nodules = lung_scene
    regions = np.zeros(image.shape, np.int32)
    for n, centre in enumerate(nodules, start=1):
        regions[_ball(image.shape, np.full(3, 1.5), centre, 3.0)] = n
    regions[8:32, 28:33, 40:45] = 3  # a stretch of the vessel (along k at j = 30, i = 42)
    regions[8:32, 36:46, 57:63] = 4  # lung and wall on both sides of the pleura, away from the nodules
    shapes = ShapeFilter(image, geometry)
    dot = shapes.region_dotness(regions, np.array([1, 2, 3, 4]))
    assert dot.shape == (4,) and min(dot[:2]) > 3 * max(dot[2:]), dot
    assert shapes.region_dotness(regions, np.array([], int)).shape == (0,)
    # One filter serves the blob search too, with the same values as a fresh one.
    shared, fresh = find_blobs(image, lung, geometry, 5, shapes=shapes), find_blobs(image, lung, geometry, 5)
    assert np.array_equal(shared.kji, fresh.kji) and np.array_equal(shared.strength, fresh.strength)


def test_detector_adds_blob_candidates_outside_stage1_regions(tiny_model_path):
    phantom = make_phantom(np.random.default_rng(11), n_nodules=2, diameters_mm=(6.0, 10.0), n_vessels=4)
    detector = Detector.load(tiny_model_path, device="cpu")
    prep = prepare(phantom.volume, detector.config.stage1.spacing_mm, detector.config.hu_window)
    prob = detector.probability_map(prep.image)
    cands, regions = detector.candidates(prob, prep.lung, prep.geometry)
    assert detector.blob_candidates(prep, prob, regions) == []  # the tiny model proposes none
    before = regions.copy()
    detector.config.stage1.blob_candidates = 6
    try:
        extra = detector.blob_candidates(prep, prob, regions)
        assert 0 < len(extra) <= 6
        assert np.array_equal(regions[before > 0], before[before > 0])  # stage 1 regions are left as they were
        assert {c.region for c in extra} == set(np.unique(regions[before == 0])) - {0}
        assert min(c.region for c in extra) > before.max()
        for c in extra:
            k, j, i = np.round(prep.geometry.lps_to_index(c.center_lps)[::-1]).astype(int)
            assert regions[k, j, i] == c.region and prep.lung[k, j, i]
            assert c.score == pytest.approx(float(prob[regions == c.region].max()))
        first = detector.detect(phantom.volume, threshold=0.0)
        again = detector.detect(phantom.volume, threshold=0.0)
        assert len(first.nodules) >= len(cands) and "blobs" in first.timings
        assert [n.center_lps for n in first.nodules] == [n.center_lps for n in again.nodules]
        assert np.array_equal(first.label_map, again.label_map)
        assert set(np.unique(first.label_map)) == set(range(len(first.nodules) + 1))
        # Weighing the shape lowers probabilities (never raises them) and finds the same regions at threshold 0.
        detector.config.stage1.dot_weight = 1.0
        shaped = detector.detect(phantom.volume, threshold=0.0)
        assert "shape" in shaped.timings and len(shaped.nodules) == len(first.nodules)
        before = {tuple(np.round(n.center_lps, 3)): n.probability for n in first.nodules}
        for n in shaped.nodules:
            assert n.probability <= before[tuple(np.round(n.center_lps, 3))] + 1e-6
        assert any(n.probability < before[tuple(np.round(n.center_lps, 3))] for n in shaped.nodules)
    finally:
        detector.config.stage1.blob_candidates = 0
        detector.config.stage1.dot_weight = 0.0


def test_dot_values_do_not_depend_on_which_voxels_are_asked_for_or_in_what_chunks(lung_scene, monkeypatch):
    image, lung, geometry, _ = lung_scene
    whole = ShapeFilter(image, geometry).dot(lung)
    parts = ShapeFilter(image, geometry)  # asked in two overlapping halves, then for all: values kept, not recomputed
    first, second = lung.copy(), lung.copy()
    first[image.shape[0] // 2:] = False
    second[: image.shape[0] // 3] = False
    assert np.array_equal(parts.dot(first), np.where(first, whole, 0))
    assert np.array_equal(parts.dot(second), np.where(second, whole, 0))
    assert np.array_equal(parts.dot(lung), whole)
    monkeypatch.setattr(blobs, "DOT_CHUNK", 1000)  # many small chunks: the same values
    assert np.array_equal(ShapeFilter(image, geometry).dot(lung), whole)
    assert whole.dtype == np.float32 and (whole[~lung] == 0).all() and (whole > 0).any()
