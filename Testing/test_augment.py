"""Augmentations: image and label stay aligned, exact inverses, determinism, thick-slice blur."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from NoduleDetectionLib import augment
from NoduleDetectionLib.augment import (
    Compose,
    RandomAffine,
    RandomConvolution,
    RandomFlip,
    RandomGamma,
    RandomIntensity,
    RandomNoise,
    RandomRot90,
    RandomSharpness,
    RandomSliceThickness,
    flip,
    rot90_axial,
    thicken_volume,
)
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.volume import CTVolume
from scipy import ndimage

SPACING = (0.8, 0.8, 1.5)  # x, y, z mm


def _sphere_patch(center_kji=(10.0, 14.0, 22.0), radius_mm=4.0, shape=(24, 32, 40)):
    """A solid sphere (+40 HU) in lung (-850 HU) on an anisotropic grid, with its label."""
    sp = np.asarray(SPACING[::-1])
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), center_kji, sp))
    label = (d2 <= radius_mm**2).astype(np.uint8)
    image = np.where(label > 0, 40.0, -850.0).astype(np.float32)
    return image, label


def _centroid(weights: np.ndarray) -> np.ndarray:
    return np.array(ndimage.center_of_mass(weights))


def test_docstring_examples_run():
    assert doctest.testmod(augment).failed == 0


def test_flip_and_rot90_are_exact_inverses():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6, 7))
    for axes in ([0], [1, 2], [0, 1, 2]):
        assert np.array_equal(flip(flip(a, axes), axes), a)
    for k in range(4):
        assert np.array_equal(rot90_axial(rot90_axial(a, k), -k), a)
    assert not np.array_equal(rot90_axial(a[:, :6, :6], 1), a[:, :6, :6])
    # the random transforms applied twice with the same draws undo themselves
    out, lab = RandomFlip(p=0.5)(a, a > 0, np.random.default_rng(3))
    back, back_lab = RandomFlip(p=0.5)(out, lab, np.random.default_rng(3))
    assert np.array_equal(back, a) and np.array_equal(back_lab, a > 0)


@pytest.mark.parametrize("seed", range(4))
def test_geometric_transforms_keep_label_on_image(seed):
    image, label = _sphere_patch()
    for t in (RandomFlip(), RandomRot90(), RandomAffine(spacing=SPACING)):
        out, lab = t(image, label, np.random.default_rng(seed))
        assert out.shape[0] == image.shape[0] and lab.dtype == label.dtype
        bright = out > -400
        assert np.allclose(_centroid(bright), _centroid(lab > 0), atol=0.6)
        assert (bright == (lab > 0)).mean() > 0.98


def test_affine_moves_sphere_centroid_consistently():
    image, label = _sphere_patch(center_kji=(12.0, 16.0, 20.0))
    rng = np.random.default_rng(1)
    out, lab = RandomAffine(degrees=0.0, scales=(1.2, 1.2), spacing=SPACING)(image, label, rng)
    centre = (np.asarray(image.shape) - 1) / 2
    before = _centroid(label)
    expected = centre + 1.2 * (before - centre)  # scaling about the patch centre
    assert np.allclose(_centroid(lab), expected, atol=0.3)
    assert np.allclose(_centroid(out > -400), expected, atol=0.3)
    volume_ratio = lab.sum() / label.sum()
    assert volume_ratio == pytest.approx(1.2**3, rel=0.1)


def test_affine_rotation_is_in_mm():
    # a sphere in mm stays a sphere of the same volume under rotation, even on anisotropic voxels
    image, label = _sphere_patch(center_kji=(11.5, 15.5, 19.5), radius_mm=5.0)
    out, lab = RandomAffine(degrees=15.0, scales=(1.0, 1.0), spacing=SPACING)(image, label, np.random.default_rng(2))
    assert lab.sum() == pytest.approx(label.sum(), rel=0.06)
    assert np.allclose(_centroid(lab), _centroid(label), atol=0.3)


def test_intensity_and_noise_leave_label_alone():
    image, label = _sphere_patch()
    t = Compose([RandomIntensity(scale=(0.9, 1.1), offset=(-20, 20)), RandomNoise(std=(10, 10))])
    out, lab = t(image, label, np.random.default_rng(0))
    assert lab is label
    background = out[:, :, :10]  # far from the sphere: constant -850 HU before
    assert abs(background.mean() + 850) < 0.1 * 850 + 20
    assert 8 < background.std() < 12


def test_compose_is_deterministic():
    image, label = _sphere_patch()
    t = Compose([RandomFlip(), RandomRot90(), RandomAffine(spacing=SPACING), RandomIntensity(), RandomNoise(),
                 RandomSliceThickness(spacing=SPACING)])
    a = t(image, label, np.random.default_rng(42))
    b = t(image, label, np.random.default_rng(42))
    c = t(image, label, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_slice_thickness_reduces_z_resolution():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((40, 8, 8)).astype(np.float32) * 100
    image[20] += 1000.0  # a thin plate
    out, _ = RandomSliceThickness(thickness=(5.0, 5.0), spacing=(0.7, 0.7, 1.0))(image, None, rng)
    profile = out[:, 4, 4]
    assert profile[20] < 500  # the plate is spread over ~5 slices
    assert (profile > 100).sum() >= 3
    # high z frequencies are gone: neighbouring slices are much more alike than before
    assert np.abs(np.diff(out, axis=0)).mean() < 0.5 * np.abs(np.diff(image, axis=0)).mean()
    # in-plane content is untouched by the z blur's own geometry: mean is preserved
    assert out.mean() == pytest.approx(image.mean(), abs=15)


def test_thin_slice_request_is_identity():
    image = np.random.default_rng(0).standard_normal((10, 4, 4)).astype(np.float32)
    out, _ = RandomSliceThickness(thickness=(0.6, 1.0), spacing=(0.7, 0.7, 1.25))(image, None,
                                                                                   np.random.default_rng(0))
    assert np.array_equal(out, image)


def test_scanner_transforms_keep_order_label_and_mean():
    """Gamma is monotone within [0, 1] and moves lung and soft tissue the same way; a sharper kernel raises a
    lesion's edge contrast and a smoother one lowers it, both keeping the mean; neither touches the label."""
    image, label = _sphere_patch()
    norm = (image + 1000.0) / 1400.0  # the HU window -1000..400 in [0, 1]
    for seed in range(6):
        out, lab = RandomGamma((0.8, 1.25))(norm, label, np.random.default_rng(seed))
        assert lab is label and out.min() >= 0.0 and out.max() <= 1.0
        assert out[label > 0].min() > out[label == 0].max()  # lesion still brighter than lung
        assert np.sign(out[label > 0].mean() - norm[label > 0].mean()) == np.sign(
            out[label == 0].mean() - norm[label == 0].mean())
    sharp, lab = RandomSharpness(amount=(1.0, 1.0))(norm, label, np.random.default_rng(0))
    smooth, _ = RandomSharpness(amount=(-0.7, -0.7))(norm, label, np.random.default_rng(0))
    assert lab is label
    edge = ndimage.binary_dilation(label) & ~ndimage.binary_erosion(label)
    contrast = [np.ptp(a[edge]) for a in (smooth, norm, sharp)]
    assert contrast[0] < contrast[1] < contrast[2]
    for a in (sharp, smooth):
        assert abs(float(a.mean()) - float(norm.mean())) < 1e-3


def test_scanner_augmentation_is_chosen_by_the_config():
    from NoduleDetectionLib.train import stage1_augmentation
    from NoduleDetectionLib.train_run import settings_from_config

    def kinds(aug):
        return [type(t) for t in aug.transforms]

    assert RandomGamma not in kinds(stage1_augmentation(1.5)) and RandomSharpness not in kinds(stage1_augmentation(1.5))
    assert {RandomGamma, RandomSharpness} <= set(kinds(stage1_augmentation(1.5, scanner=True)))
    base = {"train": [], "stage1": {"steps": 1}, "stage2": {"steps": 1}}
    assert settings_from_config(base).scanner_augmentation is False
    assert settings_from_config(dict(base, scanner_augmentation=True)).scanner_augmentation is True


def test_random_convolution_changes_texture_not_anatomy():
    """A random network's texture: label untouched, the patch's mean and spread kept, bright stays bright (the
    lesion above the lung), the same generator state gives the same patch, p = 0 is the identity, and mixed
    outputs lie between the patch and the fully changed one."""
    image, label = _sphere_patch()
    norm = (image + 1000.0) / 1400.0
    changed = 0
    for seed in range(8):
        out, lab = RandomConvolution(p=1.0, mix=(1.0, 1.0))(norm, label, np.random.default_rng(seed))
        again, _ = RandomConvolution(p=1.0, mix=(1.0, 1.0))(norm, label, np.random.default_rng(seed))
        assert lab is label and out.dtype == np.float32 and np.array_equal(out, again)
        assert abs(float(out.mean()) - float(norm.mean())) < 1e-4 and abs(float(out.std()) - float(norm.std())) < 1e-4
        assert out[label > 0].mean() > out[label == 0].mean()
        changed += float(np.corrcoef(out.ravel(), norm.ravel())[0, 1]) < 0.99
    assert changed >= 4  # most draws are another texture, not a copy
    same, _ = RandomConvolution(p=0.0)(norm, label, np.random.default_rng(0))
    assert same is norm
    full, _ = RandomConvolution(p=1.0, mix=(1.0, 1.0))(norm, None, np.random.default_rng(3))
    half, _ = RandomConvolution(p=1.0, mix=(0.5, 0.5))(norm, None, np.random.default_rng(3))
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * norm, atol=1e-5)


def test_random_convolution_is_chosen_by_the_config(tmp_path):
    import json

    from NoduleDetectionLib.errors import InputError
    from NoduleDetectionLib.train import stage1_augmentation, stage2_augmentation
    from NoduleDetectionLib.train_run import load_config, settings_from_config

    def shares(aug):
        return [t.p for t in aug.transforms if isinstance(t, RandomConvolution)]

    assert shares(stage1_augmentation(1.5)) == [] and shares(stage1_augmentation(1.5, random_convolution=0.5)) == [0.5]
    assert shares(stage2_augmentation(1.0)) == [] and shares(stage2_augmentation(1.0, random_convolution=0.3)) == [0.3]
    plain = settings_from_config({"train": []})
    assert plain.random_convolution == 0.0 and plain.stage2_random_convolution == 0.0
    chosen = settings_from_config({"train": [], "random_convolution": 0.5, "stage2_random_convolution": 0.25})
    assert chosen.random_convolution == 0.5 and chosen.stage2_random_convolution == 0.25
    for key in ("random_convolution", "stage2_random_convolution"):
        for share in (-0.1, 1.5, "0.5"):
            path = tmp_path / "c.json"
            path.write_text(json.dumps({"train": [{"phantoms": 1}], key: share}))
            with pytest.raises(InputError, match=key):
                load_config(path)


def test_elastic_bends_image_and_label_together():
    """``elastic_mm`` moves image and label by the same smooth field: the sphere stays on its label, its volume
    about the same, and the patch really changes; with a near-zero displacement it is the plain affine."""
    image, label = _sphere_patch(center_kji=(12.0, 16.0, 20.0), radius_mm=5.0)
    bend = RandomAffine(degrees=10.0, scales=(0.9, 1.1), spacing=SPACING, elastic_mm=2.0)
    out, lab = bend(image, label, np.random.default_rng(4))
    again, lab_again = bend(image, label, np.random.default_rng(4))
    assert np.array_equal(out, again) and np.array_equal(lab, lab_again)
    plain, plain_lab = RandomAffine(degrees=10.0, scales=(0.9, 1.1), spacing=SPACING)(image, label,
                                                                                      np.random.default_rng(4))
    assert (lab != plain_lab).sum() > 20
    assert ((out > -400) == (lab > 0)).mean() > 0.98
    assert lab.sum() == pytest.approx(plain_lab.sum(), rel=0.3)
    tiny = RandomAffine(degrees=10.0, scales=(0.9, 1.1), spacing=SPACING, elastic_mm=1e-6)
    nearly, _ = tiny(image, label, np.random.default_rng(4))
    assert np.abs(nearly - plain)[2:-2, 2:-2, 2:-2].max() < 1e-2


def test_elastic_displacement_is_smooth_with_the_asked_spread():
    bend = RandomAffine(spacing=(1.5, 1.5, 1.5), elastic_mm=2.0, elastic_grid_mm=12.0)
    field = bend._displacement((48, 48, 48), np.random.default_rng(0)) * 1.5  # mm
    corners = field[:, ::47, ::47, ::47]  # corners are control points: the asked spread there
    assert 0.5 < corners.std() < 4.0
    assert np.abs(np.diff(field, axis=1)).max() < 2.0  # neighbours move together (mm per 1.5 mm voxel)


def test_elastic_is_chosen_by_the_config():
    from NoduleDetectionLib.train import stage1_augmentation
    from NoduleDetectionLib.train_run import settings_from_config

    affine = [t for t in stage1_augmentation(1.5, elastic_mm=2.0).transforms if isinstance(t, RandomAffine)]
    assert [t.elastic_mm for t in affine] == [2.0]
    assert [t.elastic_mm for t in stage1_augmentation(1.5).transforms if isinstance(t, RandomAffine)] == [0.0]
    assert settings_from_config({"train": [], "elastic_mm": 1.5}).elastic_mm == 1.5


def test_thicken_volume_averages_slabs_and_keeps_positions():
    """Each new slice is the mean of its slab (fractional slices weighted by their share); a ball keeps its LPS
    centre, its contrast drops by partial volume; padding spreads to the slabs it touches; the direction's k axis
    sets where the slabs lie."""
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    image, _ = _sphere_patch(center_kji=(20.0, 16.0, 20.0), radius_mm=3.0, shape=(48, 32, 40))
    image = image.astype(np.int16)
    padding = np.zeros(image.shape, bool)
    padding[45] = True  # in the last slab (slices 42.8-46.2); slices 47-48 lie beyond it
    volume = CTVolume(image, Geometry((0.8, 0.8, 1.5), (10.0, -20.0, 30.0), direction), padding_mask=padding,
                      metadata={"modality": "CT"})
    thick = thicken_volume(volume, 5.0)
    assert thick.array.dtype == np.int16 and thick.array.shape == (14, 32, 40)  # floor(48 * 1.5 / 5)
    assert thick.geometry.spacing == (0.8, 0.8, 5.0) and thick.metadata == {"modality": "CT",
                                                                          "slice_thickness_mm": 5.0}
    # slab 1 covers input slices 10/3-0.5 .. 20/3-0.5: 2.833..6.167, i.e. 1/6 of slice 3, 4, 5 and 2/3 of 6
    w = np.array([0.1666667, 1, 1, 0.6666667, 0])
    expected = np.tensordot(w / w.sum(), image[2:7].astype(np.float32), axes=1)
    assert np.abs(thick.array[1].astype(np.float32) - expected).max() <= 0.5
    old = volume.geometry.index_to_lps(np.array([20.0, 16.0, 20.0]))
    mass = ndimage.center_of_mass(np.clip(thick.array.astype(float) + 850.0, 0, None))
    new = thick.geometry.index_to_lps(np.array(mass[::-1]))
    assert np.allclose(new, old, atol=0.3)
    assert thick.array.max() < 0 < image.max()  # a 6 mm ball in 5 mm slabs loses contrast
    assert thick.padding_mask[-1].all() and not thick.padding_mask[:-1].any()
    assert thicken_volume(volume, 1.0) is volume
    with pytest.raises(ValueError, match="thicker than the scan"):
        thicken_volume(volume, 100.0)


def test_slice_mm_of_a_training_source(tmp_path):
    """``slice_mm`` reconstructs a source's scans before lesions are inserted and names its cases; bad values are
    one-line config errors."""
    import json

    from NoduleDetectionLib.errors import InputError
    from NoduleDetectionLib.io import write_volume
    from NoduleDetectionLib.synthetic import make_phantom
    from NoduleDetectionLib.train_run import cases_from_source, load_config

    phantom = make_phantom(np.random.default_rng(0), shape=(32, 48, 56))
    (tmp_path / "ct").mkdir()
    write_volume(phantom.volume, tmp_path / "ct" / "host.nrrd")
    source = {"path": str(tmp_path), "slice_mm": 2.5 * phantom.volume.geometry.spacing[2]}
    case, = cases_from_source(source, seed=0)
    assert case.name == f"host-{source['slice_mm']:g}mm"
    assert case.volume.geometry.spacing[2] == pytest.approx(source["slice_mm"])
    for bad in (0, -1, 12, "5", True):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"train": [{"path": ".", "slice_mm": bad}]}))
        with pytest.raises(InputError, match="slice_mm"):
            load_config(config)
