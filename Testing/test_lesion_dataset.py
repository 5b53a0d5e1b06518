"""make-lesion-dataset on a synthetic phantom host, and sensitivity by lesion type in the evaluation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from NoduleDetectionLib import cli
from NoduleDetectionLib.datasets import Dataset, Finding, read_findings
from NoduleDetectionLib.errors import InputError, OutputError
from NoduleDetectionLib.evaluate import Candidate, _report_markdown, evaluate
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.lesion_dataset import COLUMNS, make_lesion_dataset, plan_copies
from NoduleDetectionLib.lesions import POSITIONS, SHAPES, TEXTURES


@pytest.fixture(scope="module")
def made(host_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "set"
    paths = make_lesion_dataset(host_folder, out, lesions=3, per_copy=2, seed=1000)
    return out, paths


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_spreads_lesions_over_hosts_and_copies():
    assert plan_copies(4, 300, 25) == [(j % 4, 25) for j in range(12)]
    assert plan_copies(2, 7, 3) == [(0, 3), (1, 2), (0, 2)]
    with pytest.raises(InputError):
        plan_copies(0, 10, 3)


def test_written_set_is_a_readable_shared_dataset(made, host_folder):
    out, paths = made
    summary = json.loads(paths["lesions"].read_text())
    assert summary["inserted"] + summary["skipped"] == 3
    assert summary["inserted"] == 3
    ds = Dataset.open(out)
    assert ds.layout == "shared" and ds.seriesuids == ["ph-ins1000-0", "ph-ins1000-1"]
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["ph-ins1000-0.nrrd", "ph-ins1000-1.nrrd"]
    rows = rows_of(out / "annotations.csv")
    assert tuple(rows[0]) == COLUMNS
    inserted = [r for r in rows if r["source"].startswith("inserted")]
    assert len(inserted) == summary["inserted"] == sum(len(s.annotations) for s in ds.scans)
    assert all(r["status"] == "nodule" and r["texture"] in TEXTURES and r["shape"] in SHAPES
               and r["position"] in POSITIONS for r in inserted)
    for scan in ds.scans:  # each copy carries the host's three findings; its real nodule is excluded
        assert [f.diameter_mm for f in scan.excluded][1] == -1.0 and len(scan.excluded) == 2
        assert scan.excluded[0].attributes["source"] == "host ph.nrrd nodule: reader consensus, 4/4"
        assert [f.diameter_mm for f in scan.masses] == [35.0]
    host = read_ct(host_folder / "ct" / "ph.nrrd")
    copy = read_ct(out / "ct" / "ph-ins1000-0.nrrd")
    assert copy.array.shape == host.array.shape and copy.geometry.spacing == pytest.approx(host.geometry.spacing)
    changed = np.argwhere(copy.array != host.array)
    assert len(changed) > 0
    for f in ds.scans[0].annotations:  # the image changed around each inserted lesion (denser than the host)
        i, j, k = np.rint(copy.geometry.lps_to_index(np.asarray(f.center_lps))).astype(int)
        assert copy.array[k, j, i] > host.array[k, j, i]
    assert "--seed 1000" in paths["readme"].read_text()


def test_same_seed_same_set_and_no_overwrite(made, host_folder, tmp_path):
    out, _ = made
    again = make_lesion_dataset(host_folder, tmp_path / "again", lesions=3, per_copy=2, seed=1000)
    first, second = rows_of(out / "annotations.csv"), rows_of(again["annotations"])
    assert [{k: v for k, v in r.items() if k != "source"} for r in first] == \
        [{k: v for k, v in r.items() if k != "source"} for r in second]
    np.testing.assert_array_equal(read_ct(out / "ct" / "ph-ins1000-1.nrrd").array,
                                  read_ct(tmp_path / "again" / "ct" / "ph-ins1000-1.nrrd").array)
    with pytest.raises(OutputError, match="--overwrite"):
        make_lesion_dataset(host_folder, tmp_path / "again", lesions=3, per_copy=2, seed=1000)
    # overwrite with fewer copies removes the copy that is no longer part of the set
    make_lesion_dataset(host_folder, tmp_path / "again", lesions=2, per_copy=3, seed=1000, overwrite=True)
    assert [p.name for p in (tmp_path / "again" / "ct").iterdir()] == ["ph-ins1000-0.nrrd"]
    assert Dataset.open(tmp_path / "again").seriesuids == ["ph-ins1000-0"]


def test_lesion_without_place_moves_to_the_next_copy(host_folder, tmp_path):
    paths = make_lesion_dataset(host_folder, tmp_path / "none", lesions=3, per_copy=2, max_tries=0)
    summary = json.loads(paths["lesions"].read_text())
    assert [len(c["not_placed"]) for c in summary["copies"]] == [2, 3]
    assert (summary["inserted"], summary["skipped"], len(summary["skipped_specs"])) == (0, 3, 3)
    assert "0 lesions inserted (3 requested, 3 found no place)" in paths["readme"].read_text()


def test_cli_keep_real_nodules_and_errors(host_folder, tmp_path, capsys):
    out = tmp_path / "kept"
    assert cli.main(["make-lesion-dataset", str(host_folder), "-o", str(out), "--scans", "ph.nrrd",
                     "--lesions", "1", "--per-copy", "1", "--keep-real-nodules"]) == 0
    assert "Inserted-lesion validation set" in capsys.readouterr().out
    statuses = [r["status"] for r in rows_of(out / "annotations.csv")]
    assert statuses.count("nodule") == 2 and statuses.count("excluded") == 1 and statuses.count("mass") == 1
    assert cli.main(["make-lesion-dataset", str(host_folder), "-o", str(out), "--lesions", "1"]) == 2
    assert cli.main(["make-lesion-dataset", str(host_folder), "-o", str(host_folder), "--lesions", "1"]) == 2
    assert cli.main(["make-lesion-dataset", str(host_folder), "-o", str(tmp_path / "x"), "--scans", "nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 3


def test_read_findings_keeps_extra_columns(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,status,texture,position\n"
                    "A,1,2,3,6,nodule, solid ,free\n")
    (f,) = read_findings(path)
    assert f.attributes == {"texture": "solid", "position": "free"}
    assert hash(f) == hash(Finding("A", (1.0, 2.0, 3.0), 6.0, "nodule"))


def lesion(xyz, d, texture, position):
    return Finding("S1" if xyz[0] < 100 else "S2", tuple(float(v) for v in xyz), float(d), "nodule",
                   {"texture": texture, "position": position, "shape": "round"})


def test_sensitivity_by_texture_and_position_hand_case():
    # Three scans, four lesions. Candidates (p): solid A hit .9, solid B hit .4, ground-glass C hit .2,
    # ground-glass D missed; false positives .8 (S1), .3 (S2), .25 and .22 (S3). FP/scan = FPs above / 3.
    # Solid curve: (0, 1/2) at .9, (1/3, 1/2) at .8, (1/3, 1) at .4, then FPs at 1 -> 1 at 1 FP/scan.
    # Ground-glass: (1/3, 0), (2/3, 0), (1, 0), (4/3, 0) by the FPs, (4/3, 1/2) at .2 -> 0 at 1 FP/scan and
    # CPM = (0 at 1/8..1, 1/2 at 2, 4, 8) / 7 = 1.5/7, though any candidate hits half of them.
    findings = [lesion((0, 0, 0), 10, "solid", "free"), lesion((50, 0, 0), 6, "solid", "juxtapleural"),
                lesion((150, 0, 0), 8, "ground-glass", "free"), lesion((150, 50, 0), 8, "ground-glass", "free")]
    cands = [Candidate("S1", (1, 0, 0), 0.9), Candidate("S1", (50, 1, 0), 0.4), Candidate("S2", (151, 0, 0), 0.2),
             Candidate("S1", (0, 80, 0), 0.8), Candidate("S2", (200, 80, 0), 0.3),
             Candidate("S3", (0, 0, 0), 0.25), Candidate("S3", (9, 9, 9), 0.22)]
    d = evaluate(findings, cands, ["S1", "S2", "S3"], n_bootstrap=0).to_dict()
    texture = {r["texture"]: r for r in d["sensitivity_by_texture"]}
    assert (texture["solid"]["nodules"], texture["solid"]["detected"], texture["solid"]["sensitivity"]) == (2, 2, 1.0)
    assert texture["solid"]["sensitivity_at_1fp"] == pytest.approx(1.0)
    assert texture["ground-glass"]["sensitivity"] == 0.5
    assert texture["ground-glass"]["sensitivity_at_1fp"] == pytest.approx(0.0)
    assert texture["ground-glass"]["cpm"] == pytest.approx(1.5 / 7)
    position = {r["position"]: r for r in d["sensitivity_by_position"]}
    assert (position["free"]["nodules"], position["free"]["detected"]) == (3, 2)
    assert (position["juxtapleural"]["nodules"], position["juxtapleural"]["detected"]) == (1, 1)
    assert [r["shape"] for r in d["sensitivity_by_shape"]] == ["round"]
    assert d["sensitivity_by_size"][1]["size_mm"] == "6-10" and d["sensitivity_by_size"][1]["nodules"] == 3
    # Crossed with size: the 6 and 8 mm lesions are 6-10 mm (solid B hit; ground-glass C hit, D missed), A is 10-20.
    assert d["detected_by_size_and_texture"] == [{"size_mm": "6-10", "solid": [1, 1], "ground-glass": [1, 2]},
                                                 {"size_mm": "10-20", "solid": [1, 1], "ground-glass": [0, 0]}]
    assert d["detected_by_size_and_position"][0] == {"size_mm": "6-10", "free": [1, 2], "juxtapleural": [1, 1]}
    report = {"dataset": "x", "model": "m", "device": "cpu", "threshold": 0.0, "seconds_per_scan": {"mean": 1.0},
              "scans": [], "froc": d}
    froc = evaluate(findings, cands, ["S1", "S2", "S3"], n_bootstrap=0)
    text = _report_markdown(report, froc)
    assert "| ground-glass | 2 | 1 | 0.500 | 0.000 | 0.214 |" in text
    assert "Sensitivity by position" in text and "Sensitivity by size_mm" in text
    assert "| size_mm | solid | ground-glass |" in text and "| 6-10 | 1/1 | 1/2 |" in text


def test_no_by_type_keys_without_type_columns():
    d = evaluate([Finding("S", (0.0, 0.0, 0.0), 6.0, "nodule")], [Candidate("S", (0, 0, 0), 0.5)], ["S"],
                 n_bootstrap=0).to_dict()
    assert not any(k.startswith("sensitivity_by_") and k != "sensitivity_by_size" for k in d)
    assert not any(k.startswith("detected_by_") for k in d)
