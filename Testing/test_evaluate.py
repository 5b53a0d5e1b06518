"""Tests of the LUNA16 FROC evaluation (evaluate.py), data set discovery (datasets.py) and their CLI."""

from __future__ import annotations

import json
import locale

import luna16_reference as ref
import numpy as np
import pytest
import SimpleITK as sitk
from NoduleDetectionLib import cli
from NoduleDetectionLib.datasets import Dataset, Finding, read_findings, read_scan_list
from NoduleDetectionLib.errors import InputError, OutputError
from NoduleDetectionLib.evaluate import (
    FP_RATES,
    Candidate,
    bootstrap_sensitivity,
    evaluate,
    evaluate_files,
    match,
    read_candidates,
)

KEYS = ["0.125", "0.25", "0.5", "1", "2", "4", "8"]


def nodule(uid, xyz, d, status="nodule"):
    return Finding(uid, tuple(float(v) for v in xyz), float(d), status)


def cand(uid, xyz, p):
    return Candidate(uid, tuple(float(v) for v in xyz), float(p))


# Four scans, computed by hand (coordinates in mm):
#   S1: nodule d=10 at 0; hits p=.9 and p=.6 (a double detection), a false positive p=.8.
#   S2: nodule d=6 with no candidate (missed); excluded finding d=-1 (10 mm default) at x=30 with a
#       candidate 3 mm away (ignored) and one 6 mm away (a false positive, p=.5).
#   S3: nothing at all (still counts in FP/scan).
#   S4: nodule d=20 hit at 9 mm by p=.5 (tied with S2's false positive).
# FROC entries: hits .9 and .5, false positives .8 and .5, 3 nodules, 4 scans. Points:
#   (0, 0), (0, 1/3) at .9, (1/4, 1/3) at .8, (1/2, 2/3) at .5 (the tie moves diagonally).
HAND_FINDINGS = [
    nodule("S1", (0, 0, 0), 10),
    nodule("S2", (0, 0, 0), 6), nodule("S2", (30, 0, 0), -1, "excluded"),
    nodule("S4", (10, 10, 10), 20),
]
HAND_CANDIDATES = [
    cand("S1", (1, 0, 0), 0.9), cand("S1", (0, 2, 0), 0.6), cand("S1", (50, 0, 0), 0.8),
    cand("S2", (33, 0, 0), 0.95), cand("S2", (36, 0, 0), 0.5),
    cand("S4", (10, 10, 19), 0.5),
]
HAND_SCANS = ["S1", "S2", "S3", "S4"]


def test_hand_case_operating_points_and_counts():
    result = evaluate(HAND_FINDINGS, HAND_CANDIDATES, HAND_SCANS, n_bootstrap=0)
    expected = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert list(result.sensitivity) == KEYS
    np.testing.assert_allclose(list(result.sensitivity.values()), expected, atol=1e-12)
    assert result.cpm == pytest.approx(4 / 7)
    counts = result.to_dict()["counts"]
    assert counts == {"scans": 4, "nodules": 3, "nodules_detected": 2, "nodules_missed": 1, "candidates": 6,
                      "hits": 2, "false_positives": 2, "ignored_on_excluded": 1, "ignored_on_mass": 0,
                      "ignored_double_detections": 1, "ignored_unlisted_scan": 0, "masses": 0}
    np.testing.assert_allclose(result.curve.fps, [0, 0, 0.25, 0.5])
    np.testing.assert_allclose(result.curve.sensitivity, [0, 1 / 3, 1 / 3, 2 / 3])
    missed = result.to_dict()["missed_nodules"]
    assert missed == [{"seriesuid": "S2", "center_lps": [0.0, 0.0, 0.0], "diameter_mm": 6.0}]


def test_tied_probabilities_give_one_diagonal_step():
    curve = evaluate(HAND_FINDINGS, HAND_CANDIDATES, HAND_SCANS, n_bootstrap=0).curve
    # Hit-first tie breaking would give 2/3 at 0.375 FP/scan, FP-first 1/3; one point per threshold: 1/2.
    assert curve.sensitivity_at([0.375])[0] == pytest.approx(0.5)


def test_double_detection_keeps_the_highest_probability():
    m = match(HAND_FINDINGS, HAND_CANDIDATES, HAND_SCANS)
    s1 = next(s for s in m.nodules if s.finding.seriesuid == "S1")
    assert (s1.probability, s1.hits) == (0.9, 2)
    assert sorted(m.fp_probability.tolist()) == [0.5, 0.8]


def test_scan_without_anything_counts_in_fp_per_scan():
    three = evaluate(HAND_FINDINGS, HAND_CANDIDATES, ["S1", "S2", "S4"], n_bootstrap=0)
    # Points (0, 1/3), (1/3, 1/3), (2/3, 2/3): at 1/2 FP/scan the line gives 1/2.
    np.testing.assert_allclose(list(three.sensitivity.values())[:3], [1 / 3, 1 / 3, 0.5], atol=1e-12)


def test_hit_needs_distance_strictly_below_radius():
    findings = [nodule("A", (0, 0, 0), 10)]
    on_edge = evaluate(findings, [cand("A", (5, 0, 0), 0.9)], ["A"], n_bootstrap=0)
    inside = evaluate(findings, [cand("A", (4.999, 0, 0), 0.9)], ["A"], n_bootstrap=0)
    assert on_edge.cpm == 0.0 and on_edge.matching.fp_probability.size == 1
    assert inside.cpm == 1.0


def test_system_without_false_positives():
    findings = [nodule("A", (0, 0, 0), 8), nodule("B", (0, 0, 0), 8), nodule("B", (40, 0, 0), 8)]
    all_hit = evaluate(findings, [cand("A", (1, 1, 1), 0.7), cand("B", (0, 0, 1), 0.4),
                                  cand("B", (40, 1, 0), 0.2)], ["A", "B"], n_bootstrap=0)
    assert all_hit.cpm == 1.0
    one_missed = evaluate(findings, [cand("A", (1, 1, 1), 0.7), cand("B", (0, 0, 1), 0.4)], ["A", "B"],
                          n_bootstrap=0)
    assert list(one_missed.sensitivity.values()) == pytest.approx([2 / 3] * 7)


def test_no_candidate_at_all_gives_zero():
    result = evaluate([nodule("A", (0, 0, 0), 8)], [], ["A", "B"], n_bootstrap=0)
    assert result.cpm == 0.0
    assert result.to_dict()["counts"]["nodules_missed"] == 1


def test_masses_are_neither_hit_nor_false_positive_and_reported():
    findings = [nodule("A", (0, 0, 0), 8), nodule("M", (0, 0, 0), 40, "mass"), nodule("M", (100, 0, 0), 35, "mass")]
    cands = [cand("A", (0, 0, 0), 0.3), cand("M", (15, 0, 0), 0.9), cand("M", (12, 0, 0), 0.95)]
    result = evaluate(findings, cands, ["A", "M"], n_bootstrap=0)
    assert result.cpm == 1.0 and result.matching.fp_probability.size == 0
    d = result.to_dict()
    assert d["counts"]["ignored_on_mass"] == 2
    assert [(m["diameter_mm"], m["detected"], m["probability"]) for m in d["masses"]] == [
        (40.0, True, 0.95), (35.0, False, None)]


def test_sensitivity_by_size_bins():
    findings = [nodule("A", (0, 0, 0), 4), nodule("A", (50, 0, 0), 7), nodule("A", (-50, 0, 0), 12),
                nodule("A", (0, 50, 0), 25), nodule("A", (0, -50, 0), 32), nodule("A", (0, 0, 80), 5)]
    cands = [cand("A", (0, 0, 0), 0.5), cand("A", (0, 50, 0), 0.5)]
    rows = evaluate(findings, cands, ["A"], n_bootstrap=0).to_dict()["sensitivity_by_size"]
    assert [(r["size_mm"], r["nodules"], r["detected"]) for r in rows] == [
        ("3-6", 2, 1), ("6-10", 1, 0), ("10-20", 1, 0), ("20-30", 1, 1), (">30", 1, 0)]
    assert rows[0]["sensitivity"] == 0.5


def test_candidates_of_unlisted_scans_are_ignored(caplog):
    result = evaluate(HAND_FINDINGS, [*HAND_CANDIDATES, cand("X", (0, 0, 0), 0.99)], HAND_SCANS, n_bootstrap=0)
    assert result.cpm == pytest.approx(4 / 7)
    assert result.matching.n_unlisted == 1
    assert "not in the scan list" in caplog.text


def test_no_nodule_is_an_error():
    with pytest.raises(InputError, match="no nodule"):
        evaluate([nodule("A", (0, 0, 0), -1, "excluded")], [], ["A"], n_bootstrap=0)


def random_case(seed):
    """Scans with nodules, excluded findings (half without diameter), double detections, detections on
    excluded findings, random false positives (probabilities on a 0.01 grid: many ties), empty scans and
    candidates of two unlisted scans."""
    rng = np.random.default_rng(seed)
    scans = [f"1.3.6.{seed}.{i}" for i in range(int(rng.integers(8, 20)))]
    annotations, excluded, candidates = [], [], []

    def near(center, radius):
        v = rng.normal(size=3)
        return center + v / np.linalg.norm(v) * radius * rng.uniform(0, 0.95)

    for uid in [*scans, "unlisted.1", "unlisted.2"]:
        for _ in range(int(rng.integers(0, 4))):
            c, d = rng.uniform(-150, 150, 3), float(rng.uniform(3, 32))
            annotations.append((uid, *c, d))
            if rng.uniform() < 0.75:
                for _ in range(int(rng.integers(1, 4))):
                    candidates.append((uid, *near(c, d / 2), round(float(rng.uniform()), 2)))
        for _ in range(int(rng.integers(0, 5))):
            c, d = rng.uniform(-150, 150, 3), (-1.0 if rng.uniform() < 0.5 else float(rng.uniform(3, 25)))
            excluded.append((uid, *c, d))
            if rng.uniform() < 0.5:
                candidates.append((uid, *near(c, (10 if d < 0 else d) / 2), round(float(rng.uniform()), 2)))
        for _ in range(int(rng.integers(0, 12))):
            candidates.append((uid, *rng.uniform(-150, 150, 3), round(float(rng.uniform()), 2)))
    order = rng.permutation(len(candidates))
    return scans, annotations, excluded, [candidates[i] for i in order]


def as_objects(annotations, excluded, candidates):
    findings = [nodule(r[0], r[1:4], r[4]) for r in annotations] + \
               [nodule(r[0], r[1:4], r[4], "excluded") for r in excluded]
    return findings, [cand(r[0], r[1:4], r[4]) for r in candidates]


# Seed 140 has a vertical step of the curve exactly at 4 FP/scan, where the script's float rounding
# decides which end numpy.interp returns (plain cumFP / scans would read 0.05 higher there).
@pytest.mark.parametrize("seed", [*range(8), 140])
def test_agrees_with_official_arithmetic_on_random_cases(seed):
    scans, annotations, excluded, candidates = random_case(seed)
    ref_sens, ref_cpm = ref.sensitivities(scans, annotations, excluded, candidates)
    assert np.all(np.isfinite(ref_sens))
    result = evaluate(*as_objects(annotations, excluded, candidates), scans, n_bootstrap=0)
    assert np.max(np.abs(np.array(list(result.sensitivity.values())) - ref_sens)) < 1e-9
    assert abs(result.cpm - ref_cpm) < 1e-9
    assert result.matching.n_double > 0 and result.matching.n_on_excluded > 0


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_samples_agree_with_official_arithmetic(seed):
    scans, annotations, excluded, candidates = random_case(seed)
    findings, cands = as_objects(annotations, excluded, candidates)
    m = match(findings, cands, scans)
    draws = np.random.default_rng(seed).integers(0, len(scans), size=(40, len(scans)))
    ours = bootstrap_sensitivity(m, draws)
    gt, prob, divisor, exclude = ref.evaluate_cad(scans, annotations, excluded, candidates)
    checked = 0
    for draw, row in zip(draws, ours):
        bgt, bprob, bexclude = ref.bootstrap_entries(gt, prob, divisor, exclude, scans, draw)
        if sum(bgt) == 0:
            assert np.all(np.isnan(row))  # no nodule in the sample: no sensitivity
            continue
        fps, sens, _ = ref.compute_froc(bgt, bprob, len(scans), bexclude)
        expected = np.interp(ref.FP_RATES, fps, sens)
        if np.all(np.isfinite(expected)):  # the script gives NaN where no nodule of the sample is hit
            np.testing.assert_allclose(row, expected, atol=1e-9)
            checked += 1
    assert checked > 30


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    scans, annotations, excluded, candidates = random_case(1)
    findings, cands = as_objects(annotations, excluded, candidates)
    a = evaluate(findings, cands, scans, n_bootstrap=1000, seed=7)
    b = evaluate(findings, cands, scans, n_bootstrap=1000, seed=7)
    c = evaluate(findings, cands, scans, n_bootstrap=1000, seed=8)
    assert a.ci95 == b.ci95 and a.ci95 != c.ci95
    for key in [*KEYS, "cpm"]:
        low, high = a.ci95[key]
        value = a.cpm if key == "cpm" else a.sensitivity[key]
        assert low <= value <= high and low < high
    grid, low, high = a.band
    assert grid[0] == FP_RATES[0] and grid[-1] == FP_RATES[-1] and np.all(low <= high)


# ---- files and command line ----

def write_luna16_files(tmp_path):
    scans, annotations, excluded, candidates = random_case(3)

    def table(name, header, rows):
        path = tmp_path / name
        path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
        return path

    header = "seriesuid,coordX,coordY,coordZ,diameter_mm"
    a = table("annotations.csv", header, annotations)
    e = table("annotations_excluded.csv", header, excluded)
    c = table("candidates.csv", "seriesuid,coordX,coordY,coordZ,probability,diameter_mm",
              [(*r, 5.0) for r in candidates])
    s = tmp_path / "seriesuids.csv"
    s.write_text("".join(uid + "\n" for uid in scans))
    return (scans, annotations, excluded, candidates), a, e, c, s


def test_cli_evaluate_luna16_files(tmp_path, capsys):
    case, a, e, c, s = write_luna16_files(tmp_path)
    out = tmp_path / "out"
    argv = ["evaluate", "--annotations", str(a), "--excluded", str(e), "--candidates", str(c), "--scans", str(s),
            "-o", str(out), "--bootstrap", "200"]
    assert cli.main(argv) == 0
    data = json.loads((out / "froc.json").read_text())
    ref_sens, ref_cpm = ref.sensitivities(*case)
    assert list(data["sensitivity"]) == KEYS
    assert np.allclose(list(data["sensitivity"].values()), ref_sens, atol=1e-9)
    assert data["cpm"] == pytest.approx(ref_cpm, abs=1e-9)
    assert set(data["ci95"]) == {*KEYS, "cpm"} and data["counts"]["scans"] == len(case[0])
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "froc_curve.csv").read_text().startswith("fps_per_scan,sensitivity,threshold\n")
    assert len((out / "missed_nodules.csv").read_text().splitlines()) == 1 + data["counts"]["nodules_missed"]
    assert "CPM" in capsys.readouterr().out
    # existing outputs are kept unless --overwrite
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0


def test_evaluate_files_shared_layout(shared_data, tmp_path):
    # Candidates on the 0003 nodules (one twice), on its ground-glass excluded area, on the lung2 mass,
    # on the lung1 nodule and one false positive in lung1; LIDC-IDRI-0001's nodule is missed.
    c = tmp_path / "c.csv"
    c.write_text("seriesuid,coordX,coordY,coordZ,probability\n"
                 "LIDC-IDRI-0003,72.11,76.99,-190.75,0.9\n"
                 "LIDC-IDRI-0003,73.11,76.99,-190.75,0.4\n"
                 "LIDC-IDRI-0003,23.61,-47.62,-172.34,0.8\n"
                 "LIDC-IDRI-0003,-47.23,-30.05,-169.56,0.3\n"
                 "LIDC-IDRI-0003,73.95,74.46,-213.11,0.95\n"
                 "pyradiomics-lung2,52.61,-95.87,-256.5,0.7\n"
                 "pyradiomics-lung1,0,0,0,0.85\n"
                 "pyradiomics-lung1,-21.86,-120.54,-611.5,0.6\n")
    result, paths = evaluate_files(shared_data / "annotations.csv", c, tmp_path / "out", n_bootstrap=0)
    d = result.to_dict()
    assert d["counts"]["scans"] == 5  # every scan of the file (the abdomen CT has no row)
    assert (d["counts"]["nodules"], d["counts"]["nodules_detected"]) == (5, 4)
    assert (d["counts"]["false_positives"], d["counts"]["ignored_on_excluded"]) == (1, 1)
    assert d["counts"]["ignored_double_detections"] == 1
    assert [(m["seriesuid"], m["detected"], m["probability"]) for m in d["masses"]] == [
        ("pyradiomics-lung2", True, 0.7)]
    assert [m["diameter_mm"] for m in d["missed_nodules"]] == [24.3]
    # 5 scans, 5 nodules, one FP at p=.85: points (0, 0), (0, 1/5) at .9, (1/5, 1/5) at .85, then
    # (1/5, 2/5), (1/5, 3/5), (1/5, 4/5) at .8, .6, .3.
    assert list(d["sensitivity"].values()) == pytest.approx([0.2, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    assert paths["png"].exists()


@pytest.mark.parametrize("content, message", [
    ("seriesuid,coordX,coordY,probability\nA,1,2,0.5\n", "missing column"),
    ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,x,0.5\n", "coordZ 'x' is not a number"),
    ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,3,nan\n", "not a finite number"),
    ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2\n", "3 fields"),
    ("", "empty"),
])
def test_bad_candidates_file(tmp_path, content, message):
    path = tmp_path / "c.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        read_candidates(path)
    assert "\n" not in str(info.value)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_candidates(tmp_path / "missing.csv")
    bad_status = tmp_path / "a.csv"
    bad_status.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,status\nA,0,0,0,5,tumour\n")
    with pytest.raises(InputError, match="status 'tumour'"):
        read_findings(bad_status)
    no_status = tmp_path / "b.csv"
    no_status.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,5\n")
    with pytest.raises(InputError, match="no 'status' column"):
        read_findings(no_status)
    twice = tmp_path / "s.txt"
    twice.write_text("A\nB\nA\n")
    with pytest.raises(InputError, match="listed twice"):
        read_scan_list(twice)


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    argv = ["evaluate", "--annotations", str(tmp_path / "nope.csv"), "--candidates", str(tmp_path / "c.csv"),
            "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# ---- data set discovery ----

def write_mhd(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.Image(4, 4, 3, sitk.sitkInt16)
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(path))


def test_dataset_luna16_folder(tmp_path):
    write_mhd(tmp_path / "subset0" / "1.2.3.1.mhd")
    write_mhd(tmp_path / "subset1" / "1.2.3.2.mhd")
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3.1,1,2,3,6.5\n1.2.3.9,0,0,0,5\n")
    (tmp_path / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3.1,5,5,5,-1\n1.2.3.2,7,7,7,2.5\n")
    ds = Dataset.open(tmp_path)
    assert ds.layout == "luna16" and ds.seriesuids == ["1.2.3.1", "1.2.3.2"]
    first, second = ds.scans
    assert first.path == tmp_path / "subset0" / "1.2.3.1.mhd"
    assert first.annotations == [Finding("1.2.3.1", (1.0, 2.0, 3.0), 6.5, "nodule")]
    assert [f.diameter_mm for f in first.excluded] == [-1.0]
    assert second.annotations == [] and len(second.excluded) == 1
    assert len(ds.findings()) == 3  # the annotation of a scan without image is dropped
    assert Dataset.open(tmp_path, scans=["1.2.3.2"]).seriesuids == ["1.2.3.2"]
    with pytest.raises(InputError, match="not in"):
        Dataset.open(tmp_path, scans=["1.2.3.7"])


def test_dataset_of_scans_without_annotations(tmp_path):
    """A plain folder of image files and DICOM folders, or a ``ct/`` folder without ``annotations.csv``, lists
    its scans with no findings (negatives, hosts for inserted lesions); two files of one scan are an error."""
    write_mhd(tmp_path / "plain" / "host-b.nrrd")
    write_mhd(tmp_path / "plain" / "host-a.nii.gz")
    dicom = tmp_path / "plain" / "series"
    dicom.mkdir()
    image = sitk.Image(4, 4, 2, sitk.sitkInt16)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer leaves the process in the C locale
    try:
        for k in range(2):
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            slice_ = image[:, :, k]
            for key, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.7"), ("0020|0013", str(k + 1)),
                               ("0008|0060", "CT"), ("0020|0032", f"0\\0\\{2.5 * k}")):
                slice_.SetMetaData(key, value)
            writer.SetFileName(str(dicom / f"{k}.dcm"))
            writer.Execute(slice_)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    (tmp_path / "plain" / "notes.txt").write_text("not a scan")
    ds = Dataset.open(tmp_path / "plain")
    assert ds.layout == "scans"
    assert ds.seriesuids == ["host-a", "host-b", "1.2.826.0.1.3680043.2.1125.7"]
    assert not ds.findings() and all(s.annotations == [] for s in ds.scans)
    write_mhd(tmp_path / "shared" / "ct" / "x.nrrd")
    shared = Dataset.open(tmp_path / "shared")
    assert shared.layout == "shared" and shared.seriesuids == ["x"] and not shared.findings()
    write_mhd(tmp_path / "plain" / "host-a.nrrd")
    with pytest.raises(InputError, match="both scan host-a"):
        Dataset.open(tmp_path / "plain")


def test_dataset_luna16_candidates_give_negatives(tmp_path):
    """LUNA16's candidate tables: the class-0 points of ``candidates_V2.csv`` (preferred over ``candidates.csv``)
    become the scans' negatives; class-1 points and other scans' points do not; a bad class is a one-line error."""
    (tmp_path / "subset0").mkdir()
    air = sitk.Image(8, 8, 4, sitk.sitkInt16) - 1000  # a CT of air: enough for read_ct
    air.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(air, str(tmp_path / "subset0" / "1.2.3.1.mhd"))
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3.1,1,2,3,6.5\n")
    (tmp_path / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3.1,9,9,9,0\n")
    (tmp_path / "candidates_V2.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,class\n1.2.3.1,1,2,3,1\n1.2.3.1,-40.5,10,-100,0\n1.2.3.9,0,0,0,0\n"
        "1.2.3.1,20,30,-90,0\n")
    scan, = Dataset.open(tmp_path, negatives=True).scans
    assert scan.negatives == [(-40.5, 10.0, -100.0), (20.0, 30.0, -90.0)]
    assert Dataset.open(tmp_path).scans[0].negatives == []  # read only when asked for (training)
    from NoduleDetectionLib.train_run import cases_from_source

    case, = cases_from_source({"path": str(tmp_path)}, seed=0)  # a training source passes them on
    assert [tuple(p) for p in case.negatives] == scan.negatives
    (tmp_path / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3.1,1,2,3,2\n")
    with pytest.raises(InputError, match="class '2' is not 0 or 1"):
        Dataset.open(tmp_path, negatives=True)


def test_dataset_luna16_needs_annotations(tmp_path):
    write_mhd(tmp_path / "1.2.3.1.mhd")
    with pytest.raises(InputError, match="annotations.csv"):
        Dataset.open(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        Dataset.open(tmp_path / "nothing")


def test_dataset_shared_layout(shared_data):
    ds = Dataset.open(shared_data)
    assert ds.layout == "shared"
    by_name = {s.name: s for s in ds.scans}
    assert sorted(by_name) == sorted(p.name for p in (shared_data / "ct").iterdir())
    lidc1 = by_name["LIDC-IDRI-0001"]
    assert lidc1.seriesuid == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert (len(lidc1.annotations), len(lidc1.excluded)) == (1, 10)
    lidc3 = by_name["LIDC-IDRI-0003.nrrd"]
    assert (lidc3.seriesuid, len(lidc3.annotations), len(lidc3.excluded)) == ("LIDC-IDRI-0003", 3, 14)
    assert (len(by_name["LIDC-IDRI-0002.nrrd"].annotations), len(by_name["LIDC-IDRI-0002.nrrd"].excluded)) == (0, 24)
    lung2 = by_name["pyradiomics-lung2.nrrd"]
    assert lung2.annotations == [] and [m.diameter_mm for m in lung2.masses] == [45.2]
    abdomen = by_name["totalsegmentator-example-abdomen.nii.gz"]
    assert abdomen.seriesuid == "totalsegmentator-example-abdomen"
    assert not (abdomen.annotations or abdomen.excluded or abdomen.masses)
    validation = Dataset.open(shared_data, scans=["LIDC-IDRI-0001", "LIDC-IDRI-0003.nrrd", "pyradiomics-lung1",
                                                  "pyradiomics-lung2.nrrd"])
    assert [s.name for s in validation.scans] == ["LIDC-IDRI-0001", "LIDC-IDRI-0003.nrrd", "pyradiomics-lung1.nrrd",
                                                  "pyradiomics-lung2.nrrd"]
    assert sum(len(s.annotations) for s in validation.scans) == 5
    assert sum(len(s.masses) for s in validation.scans) == 1


def test_output_refused_before_work(tmp_path):
    case, a, e, c, s = write_luna16_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "froc.png").write_bytes(b"keep")
    with pytest.raises(OutputError):
        evaluate_files(a, c, out, excluded=e, scans=s, n_bootstrap=0)
    assert (out / "froc.png").read_bytes() == b"keep" and not (out / "froc.json").exists()
