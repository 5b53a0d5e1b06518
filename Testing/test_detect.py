"""The chained detector, end to end on phantoms with a tiny model trained in the session."""

import numpy as np
import pytest
from NoduleDetectionLib.blobs import TOPHAT_SIZE_MM
from NoduleDetectionLib.detect import (
    DOT_FLOOR,
    DOT_FULL,
    SHAPE_MAX_MM,
    Cancelled,
    Detector,
    fuse_scores,
    grow_outlines,
    outline_diameters,
    shape_prior,
)
from NoduleDetectionLib.errors import NoduleDetectionError
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.synthetic import make_phantom


@pytest.fixture(scope="module")
def detector(tiny_model_path):
    return Detector.load(tiny_model_path, device="cpu")


@pytest.fixture(scope="module")
def phantom():
    # seed 7 is never used for training (training uses the generator seeded 1)
    return make_phantom(np.random.default_rng(7), n_nodules=3, diameters_mm=(8.0, 14.0), n_vessels=4,
                        direction=np.diag([-1.0, -1.0, 1.0]), name="held-out")


def test_detects_spheres_in_held_out_phantom(detector, phantom):
    result = detector.detect(phantom.volume, threshold=0.5)
    assert phantom.nodules
    found = 0
    for centre, diameter in phantom.nodules:
        dists = [np.linalg.norm(np.subtract(n.center_lps, centre)) for n in result.nodules]
        if dists and min(dists) < diameter / 2:
            found += 1
    assert found >= len(phantom.nodules) - 1, (phantom.nodules, result.nodules)
    assert len(result.nodules) <= len(phantom.nodules) + 5  # a tiny model: some vessels pass stage 2


def test_result_structure(detector, phantom):
    result = detector.detect(phantom.volume, threshold=0.05)
    assert result.label_map.shape == phantom.volume.array.shape
    assert result.geometry == phantom.volume.geometry
    labels = set(np.unique(result.label_map)) - {0}
    assert labels == {n.label for n in result.nodules} == set(range(1, len(result.nodules) + 1))
    probs = [n.probability for n in result.nodules]
    assert probs == sorted(probs, reverse=True)
    for n in result.nodules:
        count = int((result.label_map == n.label).sum())
        assert n.volume_mm3 == pytest.approx(count * phantom.volume.voxel_volume_mm3)
        assert n.diameter_mm == pytest.approx((6 * n.volume_mm3 / np.pi) ** (1 / 3))
        assert n.kind == ("mass" if n.diameter_mm > 30 else "nodule")
    assert set(result.timings) == {"preprocess", "stage1", "blobs", "masses", "stage2", "postprocess"}


def test_same_input_same_output(detector, phantom):
    a = detector.detect(phantom.volume, threshold=0.05)
    b = detector.detect(phantom.volume, threshold=0.05)
    assert a.nodules == b.nodules
    assert np.array_equal(a.label_map, b.label_map)


def test_cancel_and_progress(detector, phantom):
    seen = []
    detector.detect(phantom.volume, progress=lambda stage, f: seen.append((stage, f)))
    assert seen[0][0] == "preprocess" and seen[-1] == ("done", 1.0)
    assert any(stage.startswith("stage 1") for stage, _ in seen)
    with pytest.raises(Cancelled):
        detector.detect(phantom.volume, cancel=lambda: True)


def test_bad_threshold_and_device(detector, phantom):
    with pytest.raises(NoduleDetectionError, match="between 0 and 1"):
        detector.detect(phantom.volume, threshold=1.5)
    with pytest.raises(NoduleDetectionError, match="unknown device"):
        Detector(detector.model, device="tpu")


def test_fuse_scores():
    s1, s2 = np.array([1.0, 0.25, 0.5]), np.array([0.5, 1.0, 0.0])
    np.testing.assert_allclose(fuse_scores(s1, s2, 1.0), s2)
    np.testing.assert_allclose(fuse_scores(s1, s2, 0.0), s1)
    np.testing.assert_allclose(fuse_scores(s1, s2, 0.5), [np.sqrt(0.5), 0.5, 0.0], rtol=1e-6)
    # Sparing large findings: outlines of at least SHAPE_MAX_MM keep their stage 1 score, the others are fused.
    outline = np.array([SHAPE_MAX_MM, SHAPE_MAX_MM - 0.1, np.inf])
    np.testing.assert_allclose(fuse_scores(s1, s2, 1.0, outline), [1.0, 1.0, 0.5])


def test_shape_prior_keeps_balls_and_lowers_the_rest():
    p = np.array([0.9, 0.9, 0.5, 1.0], np.float32)
    dot = np.array([DOT_FULL, 0.0, 0.05, np.inf])  # a ball, a tube (no dot response), something between, a mass
    assert shape_prior(p, dot, 0.0) is p
    np.testing.assert_allclose(shape_prior(p, dot, 1.0),
                               [0.9, 0.9 * DOT_FLOOR / DOT_FULL, 0.5 * (0.05 + DOT_FLOOR) / DOT_FULL, 1.0], rtol=1e-6)
    half = shape_prior(p, dot, 0.5)
    assert np.all(shape_prior(p, dot, 1.0) <= half) and np.all(half <= p + 1e-7)


def test_shape_prior_leaves_findings_too_large_for_the_dot_filter_alone():
    """The top-hat's cube fits inside a ball from sqrt(3) times its side on; findings whose outline is at least that
    wide keep their probability whatever their dot filter value, smaller ones are weighed as before."""
    assert abs(SHAPE_MAX_MM - TOPHAT_SIZE_MM * np.sqrt(3.0)) < 1e-9 and 15.0 < SHAPE_MAX_MM < 16.0
    p = np.array([0.9, 0.9, 0.9, 0.9])
    dot = np.array([0.0, 0.0, 0.01, DOT_FULL])
    outline = np.array([SHAPE_MAX_MM - 0.1, SHAPE_MAX_MM, 30.0, 5.0])
    np.testing.assert_allclose(shape_prior(p, dot, 1.0, outline),
                               [0.9 * DOT_FLOOR / DOT_FULL, 0.9, 0.9, 0.9], rtol=1e-6)
    np.testing.assert_allclose(shape_prior(p, dot, 1.0, None), shape_prior(p, dot, 1.0))


def test_outline_diameters_count_the_half_probability_core():
    """A region's outline is its voxels at probability >= 0.5 (equivalent sphere, mm); a blob proposal's (ids from
    ``first_blob``) is its whole region."""
    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    regions = np.zeros((10, 10, 10), int)
    prob = np.zeros((10, 10, 10), np.float32)
    regions[:5, :5, :5] = 1
    prob[:5, :5, :4] = 0.7  # 100 of its 125 voxels
    regions[6:, 6:, 6:] = 2  # a blob proposal: 64 voxels, probability 0
    diameters = outline_diameters(prob, regions, [1, 2], geometry, first_blob=2)
    np.testing.assert_allclose(diameters, (6.0 * np.array([100, 64]) * 8.0 / np.pi) ** (1 / 3))
    assert outline_diameters(prob, regions, [], geometry, first_blob=2).shape == (0,)


def test_stage1_score_by_logit_through_a_temperature(tiny_model_path):
    """Without a score temperature no logit map is made and a candidate's score is its region's highest probability;
    with one, the score is sigmoid(highest logit / T), the ranking by logit."""
    import copy

    from NoduleDetectionLib.preprocess import prepare

    detector = Detector.load(tiny_model_path, device="cpu")
    ph = make_phantom(np.random.default_rng(5), n_nodules=2, diameters_mm=(8.0, 12.0))
    prep = prepare(ph.volume, detector.config.stage1.spacing_mm, detector.config.hu_window)
    prob, logit = detector.stage1_maps(prep.image)
    assert logit is None
    prob2, logit = detector.stage1_maps(prep.image, logits=True)
    assert np.array_equal(prob, prob2)
    cands, regions = detector.candidates(prob, prep.lung, prep.geometry)
    assert cands
    for c in cands:
        assert c.score == pytest.approx(float(prob[regions == c.region].max()))
    model = copy.deepcopy(detector.model)
    model.config.stage1.score_temperature = 4.0
    tempered = Detector(model, device="cpu")
    cands_t, regions_t = tempered.candidates(prob, prep.lung, prep.geometry, logit=logit)
    for c in cands_t:
        assert c.score == pytest.approx(1 / (1 + np.exp(-float(logit[regions_t == c.region].max()) / 4.0)))
    assert [c.score for c in cands_t] == sorted((c.score for c in cands_t), reverse=True)


def test_stage1_can_see_the_lungs_only(tiny_model_path):
    """With ``outside_lung_hu`` the U-net's maps are those of the image with everything outside the lung mask set to
    that HU: what lies outside the mask no longer changes them; the lung mask is then required."""
    import copy

    from NoduleDetectionLib.errors import ModelError
    from NoduleDetectionLib.models import Stage1Config
    from NoduleDetectionLib.preprocess import lungs_only, prepare

    plain = Detector.load(tiny_model_path, device="cpu")
    model = copy.deepcopy(plain.model)
    model.config.stage1.outside_lung_hu = 40.0
    lungs = Detector(model, device="cpu")
    ph = make_phantom(np.random.default_rng(5), n_nodules=2, diameters_mm=(8.0, 12.0))
    prep = prepare(ph.volume, plain.config.stage1.spacing_mm, plain.config.hu_window)
    assert 0 < prep.lung.sum() < prep.lung.size
    prob, logit = lungs.stage1_maps(prep.image, prep.lung, logits=True)
    expected, expected_logit = plain.stage1_maps(lungs_only(prep.image, prep.lung, 40.0, plain.config.hu_window),
                                                 prep.lung, logits=True)
    np.testing.assert_array_equal(prob, expected)
    np.testing.assert_array_equal(logit, expected_logit)
    assert not np.array_equal(prob, plain.stage1_maps(prep.image, prep.lung)[0])
    changed = np.where(prep.lung, prep.image, 1.0 - prep.image)  # everything outside the lungs inverted
    np.testing.assert_array_equal(lungs.stage1_maps(changed, prep.lung)[0], prob)
    with pytest.raises(ValueError, match="lung mask"):
        lungs.stage1_maps(prep.image)
    for bad in ("water", True, 5000.0):
        with pytest.raises(ModelError, match="outside_lung_hu"):
            Stage1Config(outside_lung_hu=bad)


def test_stage2_test_time_flips(tiny_model_path, phantom):
    """With ``stage2.tta`` a candidate's stage 2 probability is sigmoid of the mean logit over its patches flipped
    along every combination of the three axes; without it, one pass."""
    import copy

    import torch
    from NoduleDetectionLib.preprocess import normalize_hu, sample_patches

    plain = Detector.load(tiny_model_path, device="cpu")
    model = copy.deepcopy(plain.model)
    model.config.stage2.tta = True
    tta = Detector(model, device="cpu")
    centres = np.array([c for c, _ in phantom.nodules] + [[0.0, 0.0, 0.0]], dtype=float)
    cfg, vol = plain.config.stage2, phantom.volume
    patches = torch.from_numpy(np.stack([normalize_hu(sample_patches(vol.array, vol.geometry, centres, cfg.patch, s),
                                                      *plain.config.hu_window) for s in cfg.scales_mm], axis=1))
    net = plain.model.stage2.eval()
    with torch.inference_mode():
        logits = [net(patches.flip(dims)).float().numpy() for dims in
                  ([], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4])]
    np.testing.assert_allclose(plain.classify(vol, centres), 1 / (1 + np.exp(-logits[0])), atol=1e-5)
    np.testing.assert_allclose(tta.classify(vol, centres), 1 / (1 + np.exp(-np.mean(logits, axis=0))), atol=1e-5)
    assert not np.allclose(plain.classify(vol, centres), tta.classify(vol, centres))


def test_stage1_in_bfloat16_where_the_cpu_has_it(tiny_model_path, phantom, monkeypatch):
    """``stage1.cpu_bf16``: the U-net runs in bfloat16 on a CPU with it natively, close to float32; elsewhere (or
    switched off) exactly float32; the same input twice gives the same map."""
    import copy

    from NoduleDetectionLib import detect as detect_module
    from NoduleDetectionLib.preprocess import prepare

    plain = Detector.load(tiny_model_path, device="cpu")
    model = copy.deepcopy(plain.model)
    model.config.stage1.cpu_bf16 = True
    bf16 = Detector(model, device="cpu")
    image = prepare(phantom.volume, plain.config.stage1.spacing_mm, plain.config.hu_window).image
    reference = plain.probability_map(image)
    fast = bf16.probability_map(image)
    assert np.array_equal(fast, bf16.probability_map(image))
    if detect_module.cpu_bf16_native():
        assert not np.array_equal(fast, reference)
        np.testing.assert_allclose(fast, reference, atol=0.05)
    else:
        assert np.array_equal(fast, reference)
    monkeypatch.setattr(detect_module, "cpu_bf16_native", lambda: False)  # a CPU without it: float32
    assert np.array_equal(bf16.probability_map(image), reference)


def test_large_outlines_grow_into_their_dense_tissue():
    """A 24 mm ball whose stage 1 outline covers only its central 16 mm grows to the ball, inside the lungs and
    outside the other regions; an 8 mm finding is left as stage 1 outlined it."""
    from NoduleDetectionLib.geometry import Geometry
    from NoduleDetectionLib.preprocess import Prepared

    shape = (40, 40, 70)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]

    def ball(centre, radius):  # 1 mm grid
        return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2

    big, small = ball((20, 20, 20), 12.0), ball((20, 20, 52), 4.0)
    image = np.full(shape, 0.1, np.float32)  # lung, -860 HU
    image[big | small] = 0.7  # -20 HU
    lung = np.ones(shape, bool)
    lung[:, :, :12] = False  # the big ball's left end lies outside the lung mask
    other = ball((20, 20, 31), 2.0) & big  # part of another finding's region
    regions = np.zeros(shape, np.int32)
    regions[ball((20, 20, 20), 8.0)] = 1
    regions[other] = 3
    regions[ball((20, 20, 52), 3.0)] = 2
    prob = np.where(regions > 0, np.float32(0.9), np.float32(0.0))
    prep = Prepared(image=image, lung=lung, geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), crop=(), lungs=None)
    grow_outlines(prep, prob, regions, [1, 2], (-1000.0, 400.0))
    grown = regions == 1
    assert not (grown & ~big).any() and not (grown & ~lung).any() and not (grown & other).any()
    assert grown.sum() == (big & lung & ~other).sum()  # 16 mm core, 4 mm more allowed: the whole ball
    assert (prob[grown] >= 0.5).all() and (regions == 3).sum() == other.sum()
    assert (regions == 2).sum() == ball((20, 20, 52), 3.0).sum()  # 6 mm: below GROW_FROM_MM, not grown


def test_stage1_batch_norm_adapted_to_the_scan(tiny_model_path, phantom):
    """``stage1.bn_adapt``: stage 1's batch-norm statistics become that share of the scan's own (measured on patches
    centred in its lungs) plus the rest of the trained ones; the same scan gives the same network; 0 leaves the
    trained network."""
    import copy

    import torch
    from NoduleDetectionLib.detect import BN_ADAPT_BATCH, BN_ADAPT_PATCH, adapt_batch_norm
    from NoduleDetectionLib.preprocess import prepare
    from torch import nn

    plain = Detector.load(tiny_model_path, device="cpu")
    net = plain.model.stage1

    def stats(module):
        return [(m.running_mean.clone(), m.running_var.clone()) for m in module.modules()
                if isinstance(m, nn.BatchNorm3d)]

    trained = stats(net)
    # A uniform scan: every patch is the same, so the first layer's statistics are known without the draw.
    uniform = np.full((80, 80, 80), 0.3, np.float32)
    lung = np.zeros(uniform.shape, bool)
    lung[30:50, 30:50, 30:50] = True  # patches centred here lie inside the image
    full = adapt_batch_norm(net, uniform, lung, 1.0)
    conv = net.down[0][0]  # the first convolution, before the first batch norm
    with torch.no_grad():
        out = conv(torch.full((BN_ADAPT_BATCH, 1) + (BN_ADAPT_PATCH,) * 3, 0.3))
    first_mean, first_var = stats(full)[0]
    torch.testing.assert_close(first_mean, out.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_var, out.var(dim=(0, 2, 3, 4), unbiased=True), rtol=1e-3, atol=1e-6)
    assert stats(net)[0][0].equal(trained[0][0])  # the model's own network is untouched

    image = prepare(phantom.volume, plain.config.stage1.spacing_mm, plain.config.hu_window)
    one = stats(adapt_batch_norm(net, image.image, image.lung, 1.0))
    half = stats(adapt_batch_norm(net, image.image, image.lung, 0.5))
    assert all(m.equal(m2) and v.equal(v2) for (m, v), (m2, v2) in
               zip(one, stats(adapt_batch_norm(net, image.image, image.lung, 1.0))))
    assert not all(torch.allclose(m, t) for (m, _), (t, _) in zip(one, trained))
    for (m1, v1), (mh, vh), (mt, vt) in zip(one, half, trained):
        torch.testing.assert_close(mh, 0.5 * m1 + 0.5 * mt)
        torch.testing.assert_close(vh, 0.5 * v1 + 0.5 * vt)
    # Patches centred in the lungs, not anywhere: a scan bright outside a small lung measures otherwise without it.
    outside = np.where(image.lung, image.image, 1.0).astype(np.float32)
    assert not stats(adapt_batch_norm(net, outside, image.lung, 1.0))[0][0].equal(
        stats(adapt_batch_norm(net, outside, None, 1.0))[0][0])

    assert plain.stage1_network(image.image, image.lung) is plain.stage1
    model = copy.deepcopy(plain.model)
    model.config.stage1.bn_adapt = 1.0
    adapted = Detector(model, device="cpu")
    prob = adapted.probability_map(image.image, image.lung)
    assert np.array_equal(prob, adapted.probability_map(image.image, image.lung))
    assert not np.allclose(prob, plain.probability_map(image.image, image.lung))
