"""NoduleDetectionTraining end to end: the real ``nodule-detection train`` command in a child process.

* Stop and resume: a short phantom training is interrupted after its first checkpoint and resumed.
* The issue's acceptance test: a scene holding a real scan (part of LIDC-IDRI-0002, the training host) with
  synthetic lesions inserted into its lungs and marked with point lists (one sized by a ruler) is exported,
  trained on briefly in a child process, registered in the models folder, and the registered model runs
  through the NoduleDetection module's scene logic (``NoduleDetectionLogic.process`` = ``Detector.load`` +
  ``scene.run_detection``) and fills markups, segmentation and table nodes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from NoduleDetectionLib import registry
from NoduleDetectionLib.errors import InputError
from NoduleDetectionTrainingLib import process

#: Tiny networks, few steps, no augmentation (as ``conftest.train_tiny_model``): the point is the plumbing, not
#: accuracy, on a shared 2-core machine.
TINY_MODEL = {"stage1": {"spacing_mm": 2.0, "channels": [8, 16, 32], "tile": 64},
              "stage2": {"patch": 16, "scales_mm": [1.5, 3.0], "channels": [8, 16, 32]}}


def follow(run: process.TrainingProcess, timeout: float, until=lambda records: False) -> list[dict]:
    """Poll ``run`` as the GUI's timer does until it ends, ``until(records)`` holds, or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while run.running and not until(run.records) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.5)
    run.poll()
    if run.running and not until(run.records):
        run.stop(timeout=5)
        pytest.fail(f"training did not finish in {timeout} s:\n{run.read_console()[-3000:]}")
    return run.records


def test_config_and_bad_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    config = process.training_config([process.source(data, insert={"lesions_per_scan": 5, "copies": 1, "seed": 1})],
                                     init_model="/m.safetensors", stage1={"steps": 10}, time_budget_minutes=5)
    assert config == {"seed": 0, "init_model": "/m.safetensors",
                      "train": [{"path": str(data.resolve()), "scans": None,
                                 "insert": {"lesions_per_scan": 5, "copies": 1, "seed": 1}}],
                      "validation": [], "stage1": {"steps": 10}, "time_budget_minutes": 5}
    with pytest.raises(InputError, match="no training data"):
        process.training_config([])
    with pytest.raises(InputError, match="does not exist"):
        process.source(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown device"):
        process.TrainingProcess(tmp_path / "c.json", tmp_path / "out", device="tpu")
    with pytest.raises(InputError, match="does not exist"):
        process.TrainingProcess(tmp_path / "c.json", tmp_path / "out").start()


@pytest.mark.slow
def test_stop_then_resume(tmp_path):
    config = process.training_config(
        [{"phantoms": 2, "seed": 3}], model=TINY_MODEL, stage1={"steps": 400, "batch": 2, "lr": 0.01},
        stage2={"steps": 6, "batch": 8, "lr": 0.003}, patch1=32, validate_every=5, augment=False,
    )
    config_path = process.write_config(config, tmp_path / "config.json")
    outdir = tmp_path / "output"
    run = process.TrainingProcess(config_path, outdir, device="cpu").start()
    follow(run, 300, until=lambda records: any(r["stage"] == "stage1" and r["step"] >= 6 for r in records))
    status = run.stop(timeout=60)
    assert status == 130, run.read_console()[-3000:]  # KeyboardInterrupt: the command's clean interruption
    assert (outdir / "checkpoint.pt").is_file() and not (outdir / "model.safetensors").exists()
    stopped_at = max(r["step"] for r in run.records if r["stage"] == "stage1")
    assert stopped_at < 400

    # A few steps past where it stopped: the stop lands some steps after step 6, and a resumed run with fewer steps
    # than its checkpoint would have no stage 1 step left to take.
    resume_steps = stopped_at + 2
    config_path = process.write_config({**config, "stage1": {**config["stage1"], "steps": resume_steps}},
                                       tmp_path / "config.json", overwrite=True)
    resumed = process.TrainingProcess(config_path, outdir, device="cpu", resume=True).start()
    records = follow(resumed, 300)[len(run.records):]  # the log goes on in the same file
    console = resumed.read_console()
    assert resumed.returncode == 0, console[-3000:]
    assert (outdir / "model.safetensors").is_file() and records[-1]["stage"] == "done"
    assert "resuming from" in console
    steps = [r["step"] for r in records if r["stage"] == "stage1"]
    assert steps[0] > 1 and (steps[0] - 1) % 5 == 0, steps  # continued after a checkpoint, not restarted
    assert steps[-1] == resume_steps


@pytest.mark.mrml
@pytest.mark.slow
def test_scene_to_registered_model_to_detection(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("slicer")
    sitk = pytest.importorskip("SimpleITK")
    from NoduleDetectionLib.datasets import Dataset
    from NoduleDetectionLib.detect import Detector
    from NoduleDetectionLib.lesions import LesionSpec, avoid_radius_mm, insert_lesions
    from NoduleDetectionLib.preprocess import lung_mask
    from NoduleDetectionLogicLib import scene
    from NoduleDetectionTrainingLib import export
    from NoduleDetectionTrainingLib.plot import TrainingPlot
    from test_training_export import add_line, add_points, node_from_sitk
    from vtk.util import numpy_support

    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the child's torch threads: the machine's 2 cores are shared
    mrml_scene = scene.create_scene()
    # LIDC-IDRI-0002 (the training host), every 3rd column and row and every 2nd slice of the lung levels:
    # a real chest cross-section of 171 x 171 x 60 voxels (2.0 x 2.0 x 2.5 mm).
    image = sitk.ReadImage(str(shared_data / "ct" / "LIDC-IDRI-0002.nrrd"))[::3, ::3, 100:220:2]
    node = node_from_sitk(mrml_scene, image, "LIDC-IDRI-0002 lungs")
    host = Dataset.open(shared_data, ["LIDC-IDRI-0002.nrrd"]).scans[0]

    # synthetic lesions inserted into its lungs, away from its known (excluded) findings
    volume = scene.volume_from_node(node)
    avoid = [(f.center_lps, avoid_radius_mm(f.diameter_mm)) for f in host.excluded]
    specs = [LesionSpec(d, "solid", "round", "free", seed=s) for s, d in enumerate((12.0, 10.0, 11.0, 9.0))]
    new, _, inserted = insert_lesions(volume, lung_mask(volume).mask, specs, np.random.default_rng(0), avoid=avoid)
    assert len(inserted) >= 3
    numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())[:] = new.array.astype(
        np.int16).ravel()
    node.GetImageData().Modified()

    # the user marks them: point lists in RAS, a ruler across the first; the host's findings as excluded
    centres_ras = [np.array(lesion.center_lps) * [-1, -1, 1] for lesion in inserted]
    add_points(mrml_scene, "marked nodules", centres_ras)
    d0 = inserted[0].diameter_mm
    add_line(mrml_scene, centres_ras[0] - [d0 / 2, 0, 0], centres_ras[0] + [d0 / 2, 0, 0])
    excluded = add_points(mrml_scene, "host findings", [np.array(f.center_lps) * [-1, -1, 1] for f in host.excluded])
    dataset = export.export_scene([node], tmp_path / "run" / "dataset", default_diameter_mm=10.0,
                                  excluded_nodes=[excluded])
    assert dataset.nodule_count == len(inserted)
    rows = [f for f in dataset.scans[0].findings if f[2] == "nodule"]
    np.testing.assert_allclose([f[0] for f in rows], [lesion.center_lps for lesion in inserted], atol=1e-3)
    assert [round(f[1], 3) for f in rows] == [round(d0, 3)] + [10.0] * (len(inserted) - 1)

    config = process.training_config(
        [process.source(dataset.root)], model=TINY_MODEL, stage1={"steps": 30, "batch": 2, "lr": 0.01},
        stage2={"steps": 15, "batch": 8, "lr": 0.003}, patch1=32, augment=False,
    )
    run = process.TrainingProcess(process.write_config(config, tmp_path / "run" / "config.json"),
                                  tmp_path / "run" / "output", device="cpu").start()
    plot = TrainingPlot(mrml_scene)
    deadline = time.monotonic() + 900
    while run.running and time.monotonic() < deadline:  # what the module's timer does, without the timer
        plot.add_records(run.poll())
        time.sleep(0.5)
    plot.add_records(run.poll())
    console = run.read_console()
    assert run.returncode == 0, console[-3000:]
    assert plot.loss_table.GetNumberOfRows() == 45  # 30 stage 1 + 15 stage 2 steps
    assert run.records[-1]["stage"] == "done"

    entry = registry.add_model(run.outdir, "scene-finetune", data=f"scene: 1 scan, {dataset.nodule_count} nodules")
    assert [m.name for m in registry.list_models()] == ["scene-finetune"]
    assert entry.metadata["figures"]["stage1_steps"] == 30 and entry.metadata["figures"]["finished"]

    # the NoduleDetection module's logic with the registered model
    detector = Detector.load(entry.path, device="cpu")
    outputs = scene.run_detection(node, detector, threshold=0.0)
    count = outputs.markups.GetNumberOfControlPoints()
    assert count > 0
    assert outputs.segmentation.GetSegmentation().GetNumberOfSegments() == count
    assert outputs.table.GetNumberOfRows() == count
    found = []
    for i in range(count):
        p = [0.0, 0.0, 0.0]
        outputs.markups.GetNthControlPointPosition(i, p)
        found.append(p)
    distances = [min(np.linalg.norm(np.array(found) - c, axis=1)) for c in centres_ras]
    print(f"{count} findings at threshold 0; distance from each marked lesion to the nearest (mm): "
          f"{np.round(distances, 1).tolist()}")
