"""Lesion synthesis and insertion on a small synthetic chest phantom (anisotropic, flipped geometry)."""

from __future__ import annotations

import numpy as np
import pytest
from NoduleDetectionLib.errors import InputError, OutputError
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.lesions import (
    AVOID_MARGIN_MM,
    LESION_GAP_MM,
    GalleryItem,
    LesionSpec,
    estimate_noise_std,
    insert_distractors,
    insert_lesions,
    sample_lesion_specs,
    save_example_grid,
)
from NoduleDetectionLib.volume import CTVolume
from scipy import ndimage

SPACING = (0.8, 0.8, 1.5)  # x, y, z mm
NOISE_HU = 20.0


def _phantom(seed: int = 0) -> tuple[CTVolume, np.ndarray]:
    """Body ellipse (40 HU) with two lung ellipsoids (-850 HU) crossed by vessel tubes, correlated noise."""
    rng = np.random.default_rng(seed)
    shape = (56, 150, 200)
    sx, sy, sz = SPACING
    z, y, x = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, (sz, sy, sx)))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    body = (xx / 78) ** 2 + (yy / 57) ** 2 <= 1
    lungs = np.zeros(shape, bool)
    for cx in (-38, 38):
        lungs |= ((xx - cx) / 30) ** 2 + (yy / 42) ** 2 + (zz / 36) ** 2 <= 1
    img = np.where(body, 40.0, -1000.0) + 0 * zz
    img[lungs] = -850.0
    for _ in range(8):
        p0 = np.array([rng.uniform(-20, 20), rng.uniform(-30, 30), rng.choice([-38, 38]) + rng.uniform(-15, 15)])
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        t = (zz - p0[0]) * d[0] + (yy - p0[1]) * d[1] + (xx - p0[2]) * d[2]
        dist2 = (zz - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2 + (xx - p0[2] - t * d[2]) ** 2
        img[(dist2 <= rng.uniform(1.0, 2.0) ** 2) & lungs] = 40.0
    img = ndimage.gaussian_filter(img, (0.3, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), (0, 0.6, 0.6))
    img += noise / noise.std() * NOISE_HU
    geometry = Geometry(SPACING, (10.0, -20.0, -300.0), np.diag([-1.0, -1.0, 1.0]))
    return CTVolume(img.astype(np.int16), geometry, name="phantom"), lungs


SPECS = [
    LesionSpec(12.0, "solid", "round", "free", seed=1),
    LesionSpec(7.0, "solid", "round", "free", seed=2),
    LesionSpec(8.0, "solid", "round", "juxtapleural", seed=3),
    LesionSpec(6.0, "solid", "lobulated", "juxtapleural", seed=4),
    LesionSpec(10.0, "ground-glass", "round", "free", seed=5),
    LesionSpec(6.0, "solid", "spiculated", "juxtavascular", seed=6),
    LesionSpec(9.0, "part-solid", "lobulated", "free", seed=7),
]


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


@pytest.fixture(scope="module")
def avoid(phantom):
    volume, _ = phantom
    # a known finding in the right lung's centre: no lesion may come near it
    return [(tuple(volume.geometry.index_to_lps(np.array([52.0, 75.0, 28.0]))), 6.0)]


@pytest.fixture(scope="module")
def inserted(phantom, avoid):
    volume, lungs = phantom
    return insert_lesions(volume, lungs, SPECS, np.random.default_rng(7), avoid=avoid, noise_std=NOISE_HU)


def _voxel_mm3() -> float:
    return float(np.prod(SPACING))


def _lung_distance_mm(lungs: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(lungs, sampling=SPACING[::-1])


def _by_spec(result, spec):
    return next(les for les in result[2] if les.spec == spec)


def test_all_lesions_inserted_with_consecutive_labels(inserted):
    new, labels, lesions = inserted
    assert [les.label for les in lesions] == list(range(1, len(SPECS) + 1))
    assert set(np.unique(labels)) == set(range(len(SPECS) + 1))
    assert labels.dtype == np.uint16 and new.array.dtype == np.int16


@pytest.mark.parametrize("index", [0, 1, 2])
def test_round_solid_diameter(inserted, index):
    _, labels, _ = inserted
    spec = SPECS[index]
    les = _by_spec(inserted, spec)
    d = 2.0 * (3.0 * (labels == les.label).sum() * _voxel_mm3() / (4.0 * np.pi)) ** (1 / 3)
    assert d == pytest.approx(spec.diameter_mm, rel=0.15)


def test_juxtapleural_touch_and_free_do_not(phantom, inserted):
    _, lungs = phantom
    _, labels, lesions = inserted
    dist = _lung_distance_mm(lungs)
    for les in lesions:
        nearest = dist[labels == les.label].min()
        if les.spec.position == "juxtapleural":
            assert nearest <= max(SPACING) + 0.01, les.spec
        elif les.spec.position == "free":
            assert nearest >= 2.0, les.spec


def test_label_stays_off_the_chest_wall(phantom, inserted):
    _, lungs = phantom
    _, labels, _ = inserted
    assert ((labels > 0) & ~lungs).sum() <= 0.02 * (labels > 0).sum()


def test_juxtavascular_lesion_touches_a_vessel(phantom, inserted):
    volume, lungs = phantom
    _, labels, _ = inserted
    les = _by_spec(inserted, SPECS[5])
    vessels = lungs & (volume.array > -300)
    grown = ndimage.binary_dilation(labels == les.label, iterations=2)
    assert (grown & vessels & (labels == 0)).any()


def test_ground_glass_density(inserted):
    new, labels, _ = inserted
    les = _by_spec(inserted, SPECS[4])
    core = ndimage.binary_erosion(labels == les.label, iterations=2)
    assert core.sum() > 20
    assert -700 <= new.array[core].mean() <= -250


def test_solid_density_and_noise_match_host(phantom, inserted):
    volume, _ = phantom
    new, labels, _ = inserted
    les = _by_spec(inserted, SPECS[0])
    yy, xx = np.mgrid[-4:5, -4:5]
    disk = np.broadcast_to(yy**2 + xx**2 <= 16, (3, 9, 9))  # 4 voxels in-plane, 1 along k
    core = ndimage.binary_erosion(labels == les.label, structure=disk)
    assert core.sum() > 50
    image = new.array.astype(float)
    assert -40 <= image[core].mean() <= 120

    def highpass_std(region):
        # a narrow in-plane high-pass: noise passes, the lesion's smooth density blobs and edges 4 voxels away don't
        residual = image - ndimage.gaussian_filter(image, (0.0, 0.7, 0.7))
        return residual[region].std()

    tissue = np.zeros(image.shape, bool)
    tissue[20:36, 60:90, 94:107] = True  # mediastinum between the lungs, 40 HU
    assert np.abs(volume.array[tissue].astype(float).mean() - 40) < 10
    ratio = highpass_std(core) / highpass_std(tissue)
    assert 0.7 <= ratio <= 1.4


def test_noise_estimate(phantom):
    volume, _ = phantom
    assert estimate_noise_std(volume.array) == pytest.approx(NOISE_HU, rel=0.2)


def test_no_overlap_between_lesions_or_with_avoid(phantom, inserted, avoid):
    volume, _ = phantom
    _, labels, lesions = inserted
    sp = np.asarray(SPACING[::-1])
    points = {les.label: np.argwhere(labels == les.label) * sp for les in lesions}
    for a in points:
        for b in points:
            if a < b:
                gaps = np.linalg.norm(points[a][:, None] - points[b][None], axis=-1)
                assert gaps.min() >= LESION_GAP_MM
    (centre_lps, radius), = avoid
    centre = volume.geometry.lps_to_index(np.asarray(centre_lps))[::-1] * sp
    for pts in points.values():
        assert np.linalg.norm(pts - centre, axis=1).min() >= radius + AVOID_MARGIN_MM


def test_centres_round_trip_to_labels(phantom, inserted):
    volume, lungs = phantom
    new, labels, lesions = inserted
    for les in lesions:
        ijk = volume.geometry.lps_to_index(np.asarray(les.center_lps))
        assert np.allclose(ijk[::-1], np.argwhere(labels == les.label).mean(axis=0), atol=1e-6)
        if les.spec.texture == "solid" and les.spec.position == "free":
            k, j, i = np.round(ijk[::-1]).astype(int)
            assert lungs[k, j, i] and volume.array[k, j, i] < -600 and new.array[k, j, i] > -200


def test_deterministic(phantom):
    volume, lungs = phantom
    specs = SPECS[:3]
    a = insert_lesions(volume, lungs, specs, np.random.default_rng(3))
    b = insert_lesions(volume, lungs, specs, np.random.default_rng(3))
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = insert_lesions(volume, lungs, specs, np.random.default_rng(4))
    assert not np.array_equal(a[1], c[1])


def test_background_untouched_outside_footprints(phantom, inserted):
    volume, _ = phantom
    new, labels, _ = inserted
    far = ~ndimage.binary_dilation(labels > 0, iterations=12)
    # spikes and soft edges reach beyond the label, but never far from it
    assert np.array_equal(new.array[far], volume.array[far])


def test_distractors_are_dense_tubes_away_from_keep_out(phantom, avoid):
    volume, lungs = phantom
    new = insert_distractors(volume, lungs, 12, np.random.default_rng(5), keep_out=avoid, noise_std=NOISE_HU)
    assert new.array.dtype == volume.array.dtype and new.geometry == volume.geometry
    changed = np.abs(new.array.astype(int) - volume.array) > 0
    dense = (new.array.astype(int) - volume.array > 200) & lungs
    assert dense.sum() > 200  # tubes of soft-tissue density cross the -850 HU lung
    centre = volume.geometry.lps_to_index(np.asarray(avoid[0][0]))[::-1] * np.array(SPACING[::-1])
    k, j, i = np.nonzero(changed)
    dist = np.linalg.norm(np.stack([k, j, i], axis=1) * np.array(SPACING[::-1]) - centre, axis=1)
    assert dist.min() >= avoid[0][1]  # nothing painted inside the keep-out ball
    # each dense component is elongated (a tube, not a blob)
    comps, n = ndimage.label(dense)
    sizes = ndimage.sum(dense, comps, range(1, n + 1))
    pts = np.argwhere(comps == 1 + int(np.argmax(sizes))) * np.array(SPACING[::-1])
    eig = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))
    assert eig[-1] > 6 * eig[0]


def test_distractors_deterministic_and_off_by_default(phantom):
    volume, lungs = phantom
    a = insert_distractors(volume, lungs, 3, np.random.default_rng(1))
    b = insert_distractors(volume, lungs, 3, np.random.default_rng(1))
    assert np.array_equal(a.array, b.array)
    assert np.array_equal(insert_distractors(volume, lungs, 0, np.random.default_rng(1)).array, volume.array)


def test_sample_lesion_specs_luna16_like():
    specs = sample_lesion_specs(500, np.random.default_rng(0))
    d = np.array([s.diameter_mm for s in specs])
    assert d.min() >= 3.0 and d.max() <= 30.0
    assert 5.5 <= np.median(d) <= 8.0
    assert (d < 10).mean() > 0.7
    for attr in ("texture", "shape", "position"):
        assert len({getattr(s, attr) for s in specs}) == 3
    assert specs == sample_lesion_specs(500, np.random.default_rng(0))


def test_bad_inputs(phantom):
    volume, lungs = phantom
    with pytest.raises(InputError):
        LesionSpec(8.0, texture="cystic")
    with pytest.raises(InputError):
        LesionSpec(45.0)
    with pytest.raises(InputError, match="shape"):
        insert_lesions(volume, lungs[:, :, :-1], SPECS[:1], np.random.default_rng(0))
    with pytest.raises(InputError, match="aerated"):
        insert_lesions(volume, np.zeros_like(lungs), SPECS[:1], np.random.default_rng(0))


def test_gallery_png(tmp_path, inserted):
    new, _, lesions = inserted
    items = [GalleryItem(les.spec.texture, new, les.center_lps, les.spec.diameter_mm) for les in lesions]
    path = save_example_grid([("inserted", items[:4]), ("more", items[4:])], tmp_path / "g.png", columns=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError):
        save_example_grid([("inserted", items)], path)
