"""Cohorts: input expansion, one model load, per-scan status, resume after an interruption, torchrun shards."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from NoduleDetectionLib.cli import main
from NoduleDetectionLib.cohort import (
    CANDIDATES_FILE,
    STATUS_FILE,
    cohort_scans,
    detect_cohort,
    is_cohort,
    is_cohort_folder,
    read_status,
    scan_name,
)
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.errors import InputError
from NoduleDetectionLib.io import write_volume
from NoduleDetectionLib.synthetic import make_phantom

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scans_dir(tmp_path_factory) -> Path:
    """A cohort folder: three small phantoms (.nrrd, .nii.gz, .mha), a .raw sidecar and a README."""
    folder = tmp_path_factory.mktemp("cohort") / "scans"
    folder.mkdir()
    for seed, fname in ((11, "case_a.nrrd"), (12, "case_b.nii.gz"), (13, "case_c.mha")):
        phantom = make_phantom(np.random.default_rng(seed), shape=(40, 80, 88), n_nodules=2,
                               diameters_mm=(8.0, 14.0))
        write_volume(phantom.volume, folder / fname)
    (folder / "README.md").write_text("not a scan\n")
    (folder / "case_x.raw").write_bytes(b"\0" * 16)
    return folder


@pytest.fixture(scope="module")
def detector(tiny_model_path) -> Detector:
    return Detector.load(tiny_model_path, device="cpu")


def _summary(outdir: Path) -> tuple[list[list[str]], list[list[str]]]:
    """The candidates rows and the status rows without the timing column."""
    with (outdir / CANDIDATES_FILE).open(newline="") as f:
        candidates = list(csv.reader(f))
    with (outdir / STATUS_FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return candidates, [[r["scan"], r["status"], r["reason"], r["findings"]] for r in rows]


def test_cohort_folder_rules(tmp_path, scans_dir):
    assert is_cohort_folder(scans_dir)
    assert [p.name for p in cohort_scans([scans_dir])] == ["case_a.nrrd", "case_b.nii.gz", "case_c.mha"]
    dicom_like = tmp_path / "series"
    dicom_like.mkdir()
    (dicom_like / "IM0001").write_bytes(b"\0" * 8)
    (dicom_like / "sub").mkdir()
    assert not is_cohort_folder(dicom_like) and not is_cohort([dicom_like])
    only_folders = tmp_path / "patients"
    (only_folders / "p1").mkdir(parents=True)
    (only_folders / "p2").mkdir()
    assert [p.name for p in cohort_scans([only_folders])] == ["p1", "p2"]
    assert not is_cohort([scans_dir / "case_a.nrrd"])
    assert is_cohort([scans_dir / "case_a.nrrd", scans_dir / "case_b.nii.gz"])
    assert scan_name(scans_dir / "case_b.nii.gz") == "case_b" and scan_name(dicom_like) == "series"


def test_scan_list_and_duplicates(tmp_path, scans_dir):
    listing = tmp_path / "list.txt"
    relative = os.path.relpath(scans_dir / "case_a.nrrd", tmp_path)
    listing.write_text(f"# two scans\n{scans_dir / 'case_c.mha'}\n\n{relative}\n")
    assert is_cohort([listing])
    assert [p.resolve() for p in cohort_scans([listing])] == [scans_dir / "case_c.mha", scans_dir / "case_a.nrrd"]
    twin = tmp_path / "case_a.nii.gz"
    twin.write_bytes(b"")
    with pytest.raises(InputError, match="two scans are named 'case_a'"):
        cohort_scans([scans_dir, twin])
    with pytest.raises(InputError, match="does not exist"):
        cohort_scans([tmp_path / "nope.nrrd"])


def test_cohort_writes_outputs_status_and_summary(tmp_path, scans_dir, detector):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\nthis is not a volume\n")
    out = tmp_path / "out"
    # threshold 0: every candidate is reported, so the merged summary has rows whatever the tiny model's calibration
    result = detect_cohort([scans_dir, bad], out, threshold=0.0, detector=detector)
    assert [s.status for s in result.statuses] == ["done", "done", "done", "failed"]
    failed = result.statuses[-1]
    assert failed.scan == "broken" and "\n" not in failed.reason and failed.reason
    for status in result.statuses[:3]:
        for ending in (".mrk.json", ".seg.nrrd", ".csv", ".json", "_nodules.png"):
            assert (out / f"{status.scan}{ending}").is_file()
        assert set(status.timings_s) >= {"read", "preprocess", "stage1", "stage2", "write"}
        assert json.loads((out / f"{status.scan}.json").read_text())["timings_s"]["read"] >= 0
    candidates, status_rows = _summary(out)
    assert candidates[0][:5] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    per_scan = []
    for name in ("case_a", "case_b", "case_c"):
        with (out / f"{name}.csv").open(newline="") as f:
            per_scan += list(csv.reader(f))[1:]
    assert candidates[1:] == per_scan
    assert sum(s.findings for s in result.statuses) == len(per_scan) > 0
    assert [r[:2] for r in status_rows] == [["case_a", "done"], ["case_b", "done"], ["case_c", "done"],
                                            ["broken", "failed"]]


class _InterruptedDetector(Detector):
    """The real detector, with Ctrl-C pressed during its ``interrupt_at``-th scan."""

    interrupt_at = 2

    def detect(self, volume, *args, **kwargs):
        self.interrupt_at -= 1
        if self.interrupt_at == 0:
            raise KeyboardInterrupt
        return super().detect(volume, *args, **kwargs)


def test_interrupted_cohort_resumes_to_the_same_summary(tmp_path, scans_dir, tiny_model_path, detector):
    whole = tmp_path / "whole"
    detect_cohort([scans_dir], whole, threshold=0.3, detector=detector)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        detect_cohort([scans_dir], out, threshold=0.3, detector=_InterruptedDetector.load(tiny_model_path, "cpu"))
    assert read_status(out, "case_a").status == "done"
    assert read_status(out, "case_b").status == "running"
    assert read_status(out, "case_c") is None
    assert not (out / CANDIDATES_FILE).exists()
    first = (out / "status" / "case_a.json").read_bytes()

    detect_cohort([scans_dir], out, threshold=0.3, detector=detector)
    assert (out / "status" / "case_a.json").read_bytes() == first  # finished scans are not run again
    assert _summary(out) == _summary(whole)

    # Another threshold is another result: the scans are run again, which needs --overwrite.
    redo = detect_cohort([scans_dir], out, threshold=0.6, detector=detector)
    assert {s.status for s in redo.statuses} == {"failed"}
    assert "already exists" in redo.statuses[0].reason


def test_cli_cohort_exit_status(tmp_path, scans_dir, tiny_model_path, capsys):
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{scans_dir / 'case_a.nrrd'}\n{tmp_path / 'missing.nrrd'}\n")
    code = main(["detect", str(listing), "-o", str(tmp_path / "out"), "--model", str(tiny_model_path),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "missing: failed:" in captured.err and "does not exist" in captured.err
    assert str(tmp_path / "out" / STATUS_FILE) in captured.out
    assert main(["detect", str(listing), "-o", str(tmp_path / "o2"), "--series", "1.2"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_merge_the_same_summary(tmp_path, scans_dir, tiny_model_path, detector):
    single = tmp_path / "single"
    detect_cohort([scans_dir], single, threshold=0.3, detector=detector)
    out = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "NoduleDetection"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "NoduleDetectionLib.cli", "detect", str(scans_dir), "-o", str(out), "--model", str(tiny_model_path),
         "--device", "cpu", "--threshold", "0.3"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {n: read_status(out, n).rank for n in ("case_a", "case_b", "case_c")}
    assert ranks == {"case_a": 0, "case_b": 1, "case_c": 0}
    # The ranks run one thread each and the single process two: convolutions sum in another order, so
    # probabilities may differ in the last printed digit; everything else is identical.
    (rows, status), (rows_single, status_single) = _summary(out), _summary(single)
    assert status == status_single and len(rows) == len(rows_single)
    prob = rows[0].index("probability")
    for row, row_single in zip(rows[1:], rows_single[1:]):
        assert row[:prob] + row[prob + 1:] == row_single[:prob] + row_single[prob + 1:]
        assert float(row[prob]) == pytest.approx(float(row_single[prob]), abs=1e-5)
