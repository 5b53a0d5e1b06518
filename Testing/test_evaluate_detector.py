"""``evaluate-detector`` end to end: the tiny model over a shared-layout folder of phantom scans."""

import json

import numpy as np
from NoduleDetectionLib.cli import main
from NoduleDetectionLib.io import write_volume
from NoduleDetectionLib.synthetic import make_phantom


def test_evaluate_detector_on_phantom_folder(tmp_path, tiny_model_path):
    root = tmp_path / "data"
    rows = ["seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source"]
    rng = np.random.default_rng(11)
    for n in range(2):
        ph = make_phantom(rng, n_nodules=2, diameters_mm=(8.0, 12.0), name=f"ph{n}")
        write_volume(ph.volume, root / "ct" / f"ph{n}.nrrd")
        rows += [f"ph{n},ph{n}.nrrd,{c[0]:.2f},{c[1]:.2f},{c[2]:.2f},{d:.1f},nodule,phantom" for c, d in ph.nodules]
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert main(["evaluate-detector", str(root), "-o", str(out), "--model", str(tiny_model_path),
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    froc = json.loads((out / "froc.json").read_text())
    assert froc["counts"]["scans"] == 2 and froc["counts"]["nodules"] == 4
    assert 0.0 <= froc["cpm"] <= 1.0
    op = report["operating_point"]
    assert len(op["nodules"]) == 4 and op["fp_per_scan"] >= 0
    assert all(("probability" in r and "found" in r) for r in op["nodules"])
    assert "default threshold" in (out / "report.md").read_text()
    for name in ("candidates.csv", "froc.png"):
        assert (out / name).is_file()
