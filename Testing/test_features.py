"""Measured candidate features, the logistic model over them, and their place in calibrate and detect."""

import json

import numpy as np
import pytest
from NoduleDetectionLib.blobs import ShapeFilter
from NoduleDetectionLib.cli import main
from NoduleDetectionLib.datasets import Finding
from NoduleDetectionLib.detect import Detector, feature_prior
from NoduleDetectionLib.errors import ModelError
from NoduleDetectionLib.features import (
    FEATURE_NAMES,
    FeatureModel,
    candidate_features,
    candidate_labels,
    fit,
    sphere_directions,
)
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.models import NoduleModel
from test_calibrate import _phantom_folder

COL = {n: i for i, n in enumerate(FEATURE_NAMES)}


def test_sphere_directions_are_unit_vectors_with_their_opposites():
    d = sphere_directions(64)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_allclose(d[:32], -d[32:])
    assert np.abs(d.mean(axis=0)).max() < 1e-12
    assert (d[:32, 0] > 0).all()  # the first half on one side; spread: no two directions closer than 10 degrees
    cos = d @ d.T - 2 * np.eye(64)
    assert cos.max() < np.cos(np.radians(10))


def _ball(shape, spacing, centre, radius_mm):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * spacing) ** 2 for g, c in zip(grid, centre)) <= radius_mm**2


@pytest.fixture(scope="module")
def scene():
    """Normalised image on a 1 mm grid ``[k, j, i]`` (window -1000..400 HU): lung at -860 HU, chest wall from
    i = 70 on; a free 8 mm nodule, one of 8 mm on the wall and a 4 mm vessel along k; each candidate's region is
    the object within 5 mm of its centre."""
    shape, sp = (48, 56, 80), 1.0
    image = np.full(shape, 0.1, np.float32)
    image[:, :, 70:] = 0.7
    j, i = np.ogrid[:shape[1], :shape[2]]
    image[:, (j - 40) ** 2 + (i - 20) ** 2 <= 2.0**2] = 0.72
    centres = np.array([[24.0, 14.0, 30.0], [24.0, 30.0, 66.0], [24.0, 40.0, 20.0]])  # free, pleural, vessel
    for c in centres[:2]:
        image[_ball(shape, sp, c, 4.0)] = 0.72
    lung = np.zeros(shape, bool)
    lung[:, :, :70] = True
    regions = np.zeros(shape, np.int32)
    for n, c in enumerate(centres):
        regions[_ball(shape, sp, c, 5.0) & (image > 0.5) & lung] = n + 1
    geometry = Geometry((sp, sp, sp), (0.0, 0.0, 0.0))
    return image, lung, geometry, regions, centres


def _features(scene):
    image, lung, geometry, regions, centres = scene
    shapes = ShapeFilter(image, geometry)
    ids = [1, 2, 3]
    return candidate_features(image, lung, shapes, regions, ids, centres, np.array([2.0, 1.0, 0.5]),
                              np.array([0.9, 0.5, 0.1]), shapes.region_dotness(regions, ids),
                              np.array([False, False, True]), (-1000.0, 400.0))


def test_features_tell_a_ball_from_a_vessel_and_the_pleura(scene):
    f = _features(scene)
    free, pleural, vessel = f
    assert f.shape == (3, len(FEATURE_NAMES))
    np.testing.assert_allclose(f[:, COL["stage1_logit"]], [2.0, 1.0, 0.5])
    np.testing.assert_allclose(f[:, COL["stage2_logit"]], np.log(np.array([9.0, 1.0, 1 / 9.0])), rtol=1e-6)
    np.testing.assert_array_equal(f[:, COL["blob_proposal"]], [0, 0, 1])
    # the free ball: about 268 mm3 of 8 mm (voxel count), 8 mm of 0.72 → 8 HU mean, round Hessian, lung around it
    assert free[COL["log_volume_mm3"]] == pytest.approx(np.log(4 / 3 * np.pi * 4.0**3), abs=0.15)
    assert free[COL["mean_hu"]] == pytest.approx(-1000 + 0.72 * 1400, abs=1.0)
    assert free[COL["hessian_mid_ratio"]] > 0.8 and free[COL["hessian_low_ratio"]] > 0.8
    assert free[COL["dense_near"]] == free[COL["dense_through"]] == free[COL["outside_lung_far"]] == 0
    # the vessel: a tube (λ3 ≈ 0 along it), dense tissue on both sides along k at every sphere
    assert vessel[COL["hessian_low_ratio"]] < 0.2 < vessel[COL["hessian_mid_ratio"]]
    assert vessel[COL["dense_through"]] > 0 and vessel[COL["dense_far"]] > 0
    assert vessel[COL["log_dot"]] < free[COL["log_dot"]]
    # the pleural ball: a good part of the far sphere lies in the chest wall, outside the lungs, and is dense
    assert 0.2 < pleural[COL["outside_lung_far"]] < 0.8 and pleural[COL["dense_far"]] > 0.2
    assert pleural[COL["outside_lung_wide"]] >= pleural[COL["outside_lung_far"]]
    assert free[COL["outside_lung_wide"]] == 0.0


def test_labels_follow_the_evaluators_hit_rule():
    findings = [Finding("a", (0.0, 0.0, 0.0), 10.0, "nodule"), Finding("a", (50.0, 0.0, 0.0), 10.0, "excluded"),
                Finding("b", (0.0, 0.0, 0.0), 40.0, "mass")]
    centers = np.array([[4.9, 0, 0], [5.1, 0, 0], [52, 0, 0], [0, 0, 0], [100, 0, 0]], float)
    labels = candidate_labels(findings, ["a", "a", "a", "b", "b"], centers)
    np.testing.assert_array_equal(labels, [1, 0, -1, -1, 0])


def test_fit_ranks_as_the_data_say_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURE_NAMES)))
    y = (x[:, 0] - 2 * x[:, 3] + rng.normal(0, 0.5, 400) > 1.5).astype(int)
    y[:5] = -1  # left out
    model = fit(x, y)
    assert model.coef[0] > 0 > model.coef[3] and abs(model.coef[0]) > abs(model.coef[5])
    score = model.score(x)
    keep = y >= 0
    pos, neg = score[keep & (y == 1)], score[keep & (y == 0)]
    assert (pos[:, None] > neg[None, :]).mean() > 0.95  # AUC
    again = FeatureModel.from_config(json.loads(json.dumps(model.to_config())))
    np.testing.assert_allclose(again.score(x), score)
    with pytest.raises(ValueError, match="both"):
        fit(x, np.zeros(400, int))
    with pytest.raises(ModelError, match="features"):
        FeatureModel.from_config({**model.to_config(), "names": ["stage1_logit"]})


def test_feature_prior_mixes_probability_and_rating():
    p, r = np.array([0.8, 0.2]), np.array([0.2, 0.8])
    np.testing.assert_array_equal(feature_prior(p, r, 0.0), p)
    np.testing.assert_allclose(feature_prior(p, r, 1.0), r)
    np.testing.assert_allclose(feature_prior(p, r, 0.5), [0.4, 0.4])


def test_fit_features_then_calibrate_then_detect(tmp_path, tiny_model_path, capsys):
    data = _phantom_folder(tmp_path / "data", n_scans=3)
    fitted = tmp_path / "fit"
    assert main(["fit-features", str(data), "-o", str(fitted), "--model", str(tiny_model_path), "--device", "cpu",
                 "--blob-candidates", "5"]) == 0
    model = NoduleModel.load(fitted / "model.safetensors")
    record = model.config.card["feature_fit"]
    assert record["hits"] >= 1 and record["candidates"] > record["hits"] and model.config.stage1.blob_candidates == 5
    assert model.config.stage2.feature_weight == 0.0 and list(model.config.stage2.features["names"]) == list(
        FEATURE_NAMES)
    rows = (fitted / "features.csv").read_text().splitlines()
    assert rows[0].split(",")[5:] == list(FEATURE_NAMES) and len(rows) - 1 == record["candidates"] + record[
        "left_out"]
    assert "| dense_through |" in (fitted / "features.md").read_text()
    cal = tmp_path / "cal"
    assert main(["calibrate", str(data), "-o", str(cal), "--model", str(fitted / "model.safetensors"), "--device",
                 "cpu", "--candidate-thresholds", "0.3", "--weights", "0.5", "--shape-weights", "0",
                 "--feature-weights", "0", "1"]) == 0
    tried = json.loads((cal / "calibration.json").read_text())["tried"]
    assert {r["feature_weight"] for r in tried} == {0.0, 1.0}
    # the detector applies the feature weight: forced to 1, findings' probabilities are the model's ratings mixed in
    calibrated = NoduleModel.load(cal / "model.safetensors")
    calibrated.config.stage2.feature_weight = 1.0
    detector = Detector(calibrated, device="cpu")
    volume = read_ct(next((data / "ct").iterdir()))
    first, second = detector.detect(volume, threshold=0.0), detector.detect(volume, threshold=0.0)
    assert [n.probability for n in first.nodules] == [n.probability for n in second.nodules]
    calibrated.config.stage2.feature_weight = 0.0
    plain = Detector(calibrated, device="cpu").detect(volume, threshold=0.0)
    assert [n.probability for n in plain.nodules] != [n.probability for n in first.nodules]
    # a model without a feature model refuses feature weights; one-line errors
    capsys.readouterr()
    assert main(["calibrate", str(data), "-o", str(tmp_path / "x"), "--model", str(tiny_model_path), "--device",
                 "cpu", "--feature-weights", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fit-features" in err
    assert main(["fit-features", str(data), "-o", str(tmp_path / "y"), "--model", str(tiny_model_path),
                 "--l2", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
