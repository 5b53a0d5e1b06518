"""``benchmarks/lesion_visibility.py``: how much each inserted lesion adds to its copy, hit or missed."""

import json
from pathlib import Path

import numpy as np
import pytest
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import write_volume
from NoduleDetectionLib.volume import CTVolume

GEOMETRY = Geometry(spacing=(0.8, 0.8, 2.0), origin=(-20.0, -30.0, 100.0))
NOISE_HU = 10.0


@pytest.fixture(scope="module")
def visibility(load_benchmark):
    return load_benchmark("lesion_visibility")


def _dataset(tmp_path: Path) -> tuple[Path, Path, list[list[float]]]:
    """A host of soft tissue with white noise between air; one copy with two blobs, 400 HU 3 voxels across and 60 HU
    in one voxel."""
    rng = np.random.default_rng(0)
    host = (40.0 + NOISE_HU * rng.standard_normal((12, 64, 64))).astype(np.int16)
    host[:, :, :16] = host[:, :, 48:] = -1000   # air beside the body, so that it reads as a CT
    (tmp_path / "shared" / "ct").mkdir(parents=True)
    write_volume(CTVolume(host, GEOMETRY, name="host"), tmp_path / "shared" / "ct" / "host.nrrd")
    copy = host.astype(np.float32)
    centres_kji = [(6, 20, 20), (6, 44, 44)]
    copy[5:8, 19:22, 19:22] += 400.0
    copy[6, 44, 44] += 60.0
    (tmp_path / "data" / "ct").mkdir(parents=True)
    write_volume(CTVolume(copy.astype(np.int16), GEOMETRY, name="copy"),
                 tmp_path / "data" / "ct" / "host-ins1000-0.nrrd")
    centres = [GEOMETRY.index_to_lps(np.array(c[::-1], float)).tolist() for c in centres_kji]
    inserted = [{"center_lps": c, "label_diameter_mm": 3.0, "texture": t}
                for c, t in zip(centres, ("solid", "ground-glass"))]
    summary = {"source": str(tmp_path / "shared"), "hosts": ["host.nrrd"],
               "copies": [{"seriesuid": "host-ins1000-0", "scan": "host-ins1000-0.nrrd", "host": "host.nrrd",
                           "inserted": inserted}]}
    (tmp_path / "data" / "lesions.json").write_text(json.dumps(summary))
    (tmp_path / "eval").mkdir()
    return tmp_path / "data", tmp_path / "eval", centres


def test_peaks_and_cnr_split_by_hit_and_missed(visibility, tmp_path, capsys):
    data, evaluation, centres = _dataset(tmp_path)
    x, y, z = centres[1]
    (evaluation / "missed_nodules.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                                   f"host-ins1000-0,{x:.3f},{y:.3f},{z:.3f},3.0\n")
    records = visibility.measure(data, tmp_path / "shared")
    solid, faint = records
    # the copy's noise is its host's, so the difference is the blobs alone, averaged 3 x 3 in-plane
    assert solid["peak_hu"] == pytest.approx(400.0) and faint["peak_hu"] == pytest.approx(60.0 / 9)
    assert solid["cnr"] == pytest.approx(400.0 / NOISE_HU, rel=0.15)  # the host's estimated noise: about 10 HU
    assert visibility.main([str(data), str(evaluation)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("host.nrrd: 1 hit: peak added HU median 400 (min 400)")
    assert "; 1 missed: peak added HU median 7 (min 7)" in out[0]
    assert out[-1].startswith("all: 1 hit")


def test_a_missed_lesion_not_in_the_dataset_is_a_one_line_error(visibility, tmp_path, capsys):
    data, evaluation, _ = _dataset(tmp_path)
    (evaluation / "missed_nodules.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nother,0,0,0,3\n")
    assert visibility.main([str(data), str(evaluation)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 missed lesions, of which 0 are lesions of this dataset" in err[0]
