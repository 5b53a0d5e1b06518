"""``calibrate``: the choice of candidate threshold, stage weight and default threshold, and the command."""

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
    """ValidationScores from rows (scan, x, stage 1 score, stage 2 probability); y = z = 0."""
    return ValidationScores([r[0] for r in rows], np.array([[r[1], 0.0, 0.0] for r in rows]),
                            np.array([r[2] for r in rows], np.float32), np.array([r[3] for r in rows], np.float32))


def test_operating_point_prefers_the_candidate_threshold_and_weight_that_find_more():
    # At candidate threshold 0.3, stage 1 misses scan b's nodule; at 0.1 it proposes it (score 0.15), along with
    # a false positive that stage 1 ranks above it (0.5) but stage 2 rejects (0.01) while it accepts the nodule.
    high = _scores([("a", 0.0, 0.9, 0.9), ("b", 50.0, 0.5, 0.01)])
    low = _scores([("a", 0.0, 0.9, 0.9), ("b", 50.0, 0.5, 0.01), ("b", 0.0, 0.15, 0.95)])
    point = choose_operating_point(FINDINGS, {0.3: high, 0.1: low}, ["a", "b"], fp_per_scan=0.5)
    assert (point.candidate_threshold, point.weight) == (0.1, 1.0)
    assert point.cpm == pytest.approx(1.0)
    assert point.grid[(0.3, 1.0)] == pytest.approx(0.5)  # one of two nodules, never more
    assert point.grid[(0.1, 0.0)] < point.grid[(0.1, 1.0)]  # stage 1 alone ranks the false positive first
    # One false positive is allowed on 2 scans at 0.5 FP/scan: the lowest threshold keeps all; clipped at 0.3.
    assert point.threshold == pytest.approx(0.3)


def test_operating_point_ties_go_to_fewer_candidates_then_more_stage2():
    same = _scores([("a", 0.0, 0.9, 0.9), ("b", 0.0, 0.8, 0.8)])
    point = choose_operating_point(FINDINGS, {0.1: same, 0.2: same}, ["a", "b"], fp_per_scan=0.5)
    assert (point.candidate_threshold, point.weight) == (0.2, 1.0)


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
                 "--candidate-thresholds", "0.1", "0.5", "--weights", "0", "1"]) == 0
    record = json.loads((out / "calibration.json").read_text())
    grid = record["cpm_by_candidate_threshold_and_weight"]
    assert set(grid) == {"0.1", "0.5"} and all(set(row) == {"0", "1"} for row in grid.values())
    chosen = record["chosen"]
    assert chosen["cpm"] == max(v for row in grid.values() for v in row.values())
    model = NoduleModel.load(out / "model.safetensors")
    original = NoduleModel.load(tiny_model_path)
    assert model.config.stage1.candidate_threshold == chosen["candidate_threshold"]
    assert model.config.stage2.weight == chosen["stage2_weight"]
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
