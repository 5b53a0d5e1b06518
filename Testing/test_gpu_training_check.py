"""``benchmarks/gpu_training_check.py``: the GPU check's data and config, and its summary of a run."""

import json
from pathlib import Path

import pytest
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.train_run import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check(load_benchmark):
    return load_benchmark("gpu_training_check")


def test_prepare_writes_a_short_valid_config_of_the_shipped_recipe(check, shared_data, tmp_path):
    out = tmp_path / "check"
    check.prepare(shared_data, out)
    config = load_config(out / "config.json")  # the training command's own checks, paths made absolute
    recipe = json.loads((REPO / "Resources" / "Training" / "shipped_recipe.json").read_text())
    assert config["model"] == recipe["model"]
    for phase in ("stage1", "stage1_refine", "stage2"):
        assert config[phase]["steps"] == check.CHECK_STEPS[phase] < recipe[phase]["steps"]
        assert {k: v for k, v in config[phase].items() if k != "steps"} == \
               {k: v for k, v in recipe[phase].items() if k != "steps"}
    assert config["calibration"]["lesions"]["scans"] == ["LIDC-IDRI-0001-slab"]
    assert config["calibration"]["stage1_spacing_mm"] == recipe["calibration"]["stage1_spacing_mm"]
    # the slab keeps the host's world coordinates: its lung slices, full cross-section, the host's spacing
    host, slab = read_ct(shared_data / "ct" / "LIDC-IDRI-0002.nrrd"), read_ct(out / "ct" / "LIDC-IDRI-0002-slab.nrrd")
    assert slab.array.shape == (check.SLAB_SLICES, *host.array.shape[1:])
    k0 = round((slab.geometry.origin[2] - host.geometry.origin[2]) / host.geometry.spacing[2])
    assert (slab.array == host.array[k0:k0 + check.SLAB_SLICES]).all()
    rows = (out / "annotations.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == {"LIDC-IDRI-0002-slab", "LIDC-IDRI-0001-slab"}
    with pytest.raises(SystemExit, match="exists"):
        check.prepare(shared_data, out)


def test_summary_reads_step_times_per_phase(check, tmp_path):
    records = [{"stage": "stage1", "step": i + 1, "elapsed_s": 0.5 * i} for i in range(40)]
    records += [{"stage": "validation", "val_cpm": 0.4, "elapsed_s": 25.0}]
    records += [{"stage": "stage1_refine", "step": i + 1, "elapsed_s": 30 + 0.25 * i} for i in range(30)]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = check.summary(tmp_path)
    assert out["stage1"] == {"steps": 40, "median_step_s": 0.5, "span_s": 19.5}
    assert out["stage1_refine"]["median_step_s"] == 0.25 and "stage2" not in out
    assert out["validation_cpm"] == [0.4] and out["total_s"] == 30 + 0.25 * 29
