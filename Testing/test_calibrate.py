"""``calibrate``: the choice of candidate threshold, stage and shape weights and default threshold, and the command."""

import json

import numpy as np
import pytest
from NoduleDetectionLib.calibrate import ValidationScores, choose_operating_point
from NoduleDetectionLib.cli import main
from NoduleDetectionLib.datasets import Finding
from NoduleDetectionLib.io import write_volume
from NoduleDetectionLib.models import NoduleModel
from NoduleDetectionLib.synthetic import make_phantom

FINDINGS = [Finding("a", (0.0, 0.0, 0.0), 10.0, "nodule"), Finding("b", (0.0, 0.0, 0.0), 10.0, "nodule")]


def _scores(rows):
    """ValidationScores from rows (scan, x, stage 1 probability, stage 2 probability, [stage 1 logit, [dot filter
    value]]); y = z = 0; the dot filter value is 1 unless given."""
    p1 = np.array([r[2] for r in rows], float)
    logit = np.array([r[4] if len(r) > 4 else np.log(r[2] / (1 - r[2])) for r in rows], float)
    dot = np.array([r[5] if len(r) > 5 else 1.0 for r in rows], float)
    return ValidationScores([r[0] for r in rows], np.array([[r[1], 0.0, 0.0] for r in rows]), p1, logit,
                            np.array([r[3] for r in rows], float), dot)


def test_operating_point_prefers_the_candidate_threshold_and_weight_that_find_more():
    # At candidate threshold 0.3, stage 1 misses scan b's nodule; at 0.1 it proposes it (score 0.15), along with
    # a false positive that stage 1 ranks above it (0.5) but stage 2 rejects (0.01) while it accepts the nodule.
    high = _scores([("a", 0.0, 0.9, 0.9), ("b", 50.0, 0.5, 0.01)])
    low = _scores([("a", 0.0, 0.9, 0.9), ("b", 50.0, 0.5, 0.01), ("b", 0.0, 0.15, 0.95)])
    point = choose_operating_point(FINDINGS, {0.3: high, 0.1: low}, ["a", "b"], fp_per_scan=0.5)
    assert (point.candidate_threshold, point.temperature, point.weight) == (0.1, None, 1.0)
    assert point.cpm == pytest.approx(1.0)
    assert point.grid[(0.3, None, 1.0, 0.0, 0.0)][0] == pytest.approx(0.5)  # one of two nodules, never more
    # stage 1 alone ranks the false positive first
    assert point.grid[(0.1, None, 0.0, 0.0, 0.0)][0] < point.grid[(0.1, None, 1.0, 0.0, 0.0)][0]
    # One false positive is allowed on 2 scans at 0.5 FP/scan: the lowest threshold keeps all; clipped at 0.3.
    assert point.threshold == pytest.approx(0.3)


def test_operating_point_ties_go_to_fewer_candidates_then_more_stage2():
    same = _scores([("a", 0.0, 0.9, 0.9), ("b", 0.0, 0.8, 0.8)])
    point = choose_operating_point(FINDINGS, {0.1: same, 0.2: same}, ["a", "b"], fp_per_scan=0.5)
    assert (point.candidate_threshold, point.temperature, point.weight) == (0.2, None, 1.0)


def test_shape_weight_ranks_a_ball_above_a_brighter_tube():
    # Scan b: a vessel branch (dot filter 0.01) that both stages score above the nodule (dot filter 0.1). Without
    # the shape, the false positive comes first; with weight 1 the nodule's 0.6 * 0.525 beats the vessel's
    # 0.8 * 0.075; weight 0.5 already does, and ties go to the smaller weight.
    rows = [("a", 0.0, 0.9, 0.9, 2.2, 0.1), ("b", 50.0, 0.8, 0.8, 1.4, 0.01), ("b", 0.0, 0.6, 0.6, 0.4, 0.1)]
    point = choose_operating_point(FINDINGS, {0.2: _scores(rows)}, ["a", "b"], fp_per_scan=0.5, weights=(0.0,),
                                   dot_weights=(0.0, 0.5, 1.0))
    assert point.grid[(0.2, None, 0.0, 0.0, 0.0)][0] < 1.0
    assert point.grid[(0.2, None, 0.0, 1.0, 0.0)][0] == pytest.approx(1.0)
    assert (point.dot_weight, point.cpm) == (0.5, pytest.approx(1.0))
    masses = _scores([("a", 0.0, 1.0, 1.0, np.inf, np.inf)])  # a mass keeps probability 1 whatever the weight
    assert masses.candidates(0.5, 8.0, dot_weight=1.0)[0].probability == 1.0


def test_stage2_can_spare_large_findings():
    """With ``spare_large`` a finding whose outline is at least ``SHAPE_MAX_MM`` keeps its stage 1 score whatever
    stage 2 says; smaller ones are fused as before; the operating point passes the setting on."""
    from NoduleDetectionLib.detect import SHAPE_MAX_MM

    # Scan a: a large nodule (20 mm outline) that stage 2, trained on small lesions, rejects; scan b: a small
    # false positive stage 2 likes.
    rows = [("a", 0.0, 0.9, 0.01), ("b", 50.0, 0.5, 0.9), ("b", 0.0, 0.3, 0.9)]
    scores = _scores(rows)
    scores.outline_mm = np.array([20.0, 6.0, SHAPE_MAX_MM - 1.0])
    assert [c.probability for c in scores.candidates(1.0)] == pytest.approx([0.01, 0.9, 0.9])
    assert [c.probability for c in scores.candidates(1.0, spare_large=True)] == pytest.approx([0.9, 0.9, 0.9])
    spared = choose_operating_point(FINDINGS, {0.2: scores}, ["a", "b"], 0.5, weights=(1.0,), spare_large=True)
    plain = choose_operating_point(FINDINGS, {0.2: scores}, ["a", "b"], 0.5, weights=(1.0,))
    assert spared.cpm > plain.cpm


def test_score_temperature_separates_saturated_probabilities():
    """Two nodules and four false positives, all at probability 1 in float terms; their logits differ (nodules
    30 and 28, false positives 25-20). By probability the six tie; by logit the nodules come first, and a
    temperature maps the cut between them and the false positives into the threshold range, so the default
    threshold keeps to 0.5 FP/scan, which no threshold on the saturated probabilities can."""
    rows = [("a", 0.0, 1.0, 1.0, 30.0), ("b", 0.0, 1.0, 1.0, 28.0)]
    rows += [(scan, 50.0 + n, 1.0, 1.0, logit) for n, (scan, logit) in
             enumerate([("a", 25.0), ("a", 22.0), ("b", 21.0), ("b", 20.0)])]
    point = choose_operating_point(FINDINGS, {0.2: _scores(rows)}, ["a", "b"], fp_per_scan=0.5, weights=(0.0,),
                                   temperatures=(None, 1.0, 8.0, 16.0))
    assert point.grid[(0.2, None, 0.0, 0.0, 0.0)][2] > 0.5  # saturated: the threshold cannot drop the false positives
    assert point.temperature in (8.0, 16.0) and point.cpm == pytest.approx(1.0)
    assert point.temperature == 8.0  # ties: the lowest temperature that keeps to the FP target
    # With T = 8 the one false positive allowed (2 scans x 0.5) is the 25-logit one: the threshold sits just
    # above the next, sigmoid(22 / 8).
    assert point.threshold == pytest.approx(1 / (1 + np.exp(-22 / 8)), abs=1e-6)
    assert point.grid[(0.2, 8.0, 0.0, 0.0, 0.0)][2] <= 0.5


def _phantom_folder(root, n_scans=2):
    rows = ["seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source"]
    rng = np.random.default_rng(11)
    for n in range(n_scans):
        ph = make_phantom(rng, n_nodules=2, diameters_mm=(8.0, 12.0), name=f"ph{n}")
        write_volume(ph.volume, root / "ct" / f"ph{n}.nrrd")
        rows += [f"ph{n},ph{n}.nrrd,{c[0]:.2f},{c[1]:.2f},{c[2]:.2f},{d:.1f},nodule,phantom" for c, d in ph.nodules]
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return root


def test_calibrate_command_writes_a_model_with_the_chosen_values(tmp_path, tiny_model_path, capsys):
    data = _phantom_folder(tmp_path / "data")
    out = tmp_path / "cal"
    assert main(["calibrate", str(data), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
                 "--candidate-thresholds", "0.1", "0.5", "--weights", "0", "1", "--shape-weights", "0", "1",
                 "--blob-candidates", "3", "--stage1-spacing", "1.75", "--stage1-bf16"]) == 0
    record = json.loads((out / "calibration.json").read_text())
    tried = record["tried"]
    assert {(r["candidate_threshold"], r["stage2_weight"], r["dot_weight"]) for r in tried} == {
        (t, w, a) for t in (0.1, 0.5) for w in (0, 1) for a in (0, 1)}
    assert len(tried) == 8 * 6  # and every default score temperature
    chosen = record["chosen"]
    assert chosen["cpm"] == max(r["cpm"] for r in tried)
    model = NoduleModel.load(out / "model.safetensors")
    original = NoduleModel.load(tiny_model_path)
    assert model.config.stage1.candidate_threshold == chosen["candidate_threshold"]
    assert model.config.stage2.weight == chosen["stage2_weight"]
    assert model.config.stage1.score_temperature == chosen["score_temperature"]
    assert model.config.stage1.dot_weight == chosen["dot_weight"]
    assert model.config.stage1.blob_candidates == chosen["blob_candidates"] == 3
    assert model.config.stage1.spacing_mm == chosen["stage1_spacing_mm"] == 1.75
    assert record["before"]["stage1_spacing_mm"] == original.config.stage1.spacing_mm != 1.75
    assert model.config.stage1.cpu_bf16 and chosen["stage1_bf16"] and not record["before"]["stage1_bf16"]
    assert model.config.threshold == pytest.approx(chosen["threshold"])
    assert model.config.card["calibration"]["nodules"] == 4
    assert model.config.card["name"] == original.config.card["name"]  # the rest of the card is kept
    assert record["before"]["stage2_weight"] == original.config.stage2.weight
    for key, tensor in original.state_tensors().items():  # the networks are not changed
        assert (model.state_tensors()[key] == tensor).all(), key
    assert "Chosen: candidate threshold" in (out / "calibration.md").read_text()
    # The detector's own path scores the calibrated model as calibration did (nodule centres are then measured
    # on the outlined voxels rather than the working grid, so the CPM may differ a little, not more).
    calibrated = str(out / "model.safetensors")
    assert main(["evaluate-detector", str(data), "-o", str(tmp_path / "eval"), "--model", calibrated,
                 "--device", "cpu", "--bootstrap", "0"]) == 0
    froc = json.loads((tmp_path / "eval" / "froc.json").read_text())
    assert froc["cpm"] == pytest.approx(chosen["cpm"], abs=0.1)
    # Nothing is overwritten unless asked.
    capsys.readouterr()
    assert main(["calibrate", str(data), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err


@pytest.mark.parametrize("args, message", [
    (["--candidate-thresholds", "1.5"], "between 0 and 1"),
    (["--fp-per-scan", "0"], "positive"),
    (["--shape-weights", "-1"], "between 0 and 4"),
    (["--blob-candidates", "-2"], "between 0 and 1000"),
    (["--stage1-spacing", "0.2"], "between 0.5 and 3 mm"),
])
def test_calibrate_bad_values_are_one_line_errors(tmp_path, tiny_model_path, capsys, args, message):
    data = _phantom_folder(tmp_path / "data", n_scans=1)
    assert main(["calibrate", str(data), "-o", str(tmp_path / "cal"), "--model", str(tiny_model_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_calibrate_needs_nodule_annotations(tmp_path, tiny_model_path, capsys):
    data = _phantom_folder(tmp_path / "data", n_scans=1)
    (data / "annotations.csv").write_text("seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source\n")
    assert main(["calibrate", str(data), "-o", str(tmp_path / "cal"), "--model", str(tiny_model_path)]) == 2
    assert "no nodule annotation" in capsys.readouterr().err


def test_calibration_scores_what_detect_reports(tiny_model_path):
    """``scan_scores`` rescored with a model's own settings gives the probabilities ``detect`` reports, candidate for
    candidate: logit temperature, stage 2 weight, shape weight with the large findings it leaves alone, blob
    proposals. (Otherwise ``calibrate`` would choose settings for another detector than the one that ships.)"""
    from NoduleDetectionLib.calibrate import scan_scores
    from NoduleDetectionLib.detect import SHAPE_MAX_MM, Detector
    from NoduleDetectionLib.preprocess import prepare

    model = NoduleModel.load(tiny_model_path)
    cfg = model.config
    cfg.stage1.dot_weight, cfg.stage1.blob_candidates, cfg.stage1.score_temperature = 0.5, 5, 8.0
    cfg.stage2.weight = 0.25
    detector = Detector(model, device="cpu")
    phantom = make_phantom(np.random.default_rng(11), n_nodules=3, diameters_mm=(8.0, 24.0), n_vessels=4)
    reported = detector.detect(phantom.volume, threshold=0.0).nodules
    prep = prepare(phantom.volume, cfg.stage1.spacing_mm, cfg.hu_window)
    t = cfg.stage1.candidate_threshold
    scores = scan_scores(detector, "p", phantom.volume, prep, [t], with_masses=True, with_dot=True)[t]
    rescored = scores.candidates(cfg.stage2.weight, cfg.stage1.score_temperature, cfg.stage1.dot_weight)
    assert len(rescored) == len(reported) > 5
    np.testing.assert_allclose(sorted(c.probability for c in rescored), sorted(n.probability for n in reported),
                               rtol=1e-5)
    assert (scores.outline_mm >= SHAPE_MAX_MM).sum() >= 1  # the exemption was exercised
    assert (scores.outline_mm < SHAPE_MAX_MM).sum() >= 5
