"""The command line, end to end on a real scan: outputs read back by independent readers."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from NoduleDetectionLib.cli import main

LIDC1_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _run(*args):
    """Run the CLI in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "NoduleDetectionLib.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lidc1_outputs(shared_data, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = _run("detect", shared_data / "ct" / "LIDC-IDRI-0001", "-o", out, "--model", tiny_model_path,
                "--threshold", "0.05", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.mrml
def test_detect_writes_files_that_slicer_reads(lidc1_outputs):
    import slicer
    import slicerio

    name = "LIDC-IDRI-0001"
    for suffix in (".mrk.json", ".seg.nrrd", ".csv", ".json", "_nodules.png"):
        assert (lidc1_outputs / f"{name}{suffix}").is_file(), suffix

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    fid = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(lidc1_outputs / f"{name}.mrk.json"))
    assert storage.ReadData(fid)
    n_points = fid.GetNumberOfControlPoints()

    seg = slicerio.read_segmentation(str(lidc1_outputs / f"{name}.seg.nrrd"))
    assert len(seg["segments"]) == n_points
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg_storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    seg_storage.SetFileName(str(lidc1_outputs / f"{name}.seg.nrrd"))
    assert seg_storage.ReadData(seg_node)
    assert seg_node.GetSegmentation().GetNumberOfSegments() == n_points

    with open(lidc1_outputs / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_points
    assert all(r["seriesuid"] == LIDC1_UID for r in rows)
    for n, row in enumerate(rows):
        ras = [0.0, 0.0, 0.0]
        fid.GetNthControlPointPosition(n, ras)
        lps = [float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])]
        np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-3)
    summary = json.loads((lidc1_outputs / f"{name}.json").read_text())
    assert len(summary["nodules"]) == n_points


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("detect", "evaluate", "evaluate-detector"):
        assert command in out


def test_user_errors_exit_non_zero_without_traceback(tmp_path, tiny_model_path):
    proc = _run("detect", tmp_path / "missing.nrrd", "-o", tmp_path / "out", "--model", tiny_model_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"not a model")
    proc = _run("detect", tmp_path, "-o", tmp_path / "out", "--model", bad_model)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
