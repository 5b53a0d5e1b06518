"""The training command: a short run on phantoms, resume after interruption, and DDP with 2 processes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from NoduleDetectionLib.calibrate import STAGE_WEIGHTS, choose_threshold
from NoduleDetectionLib.datasets import Finding
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.errors import InputError, ModelError
from NoduleDetectionLib.evaluate import Candidate
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.models import ModelConfig, NoduleModel, Stage1Config, Stage2Config
from NoduleDetectionLib.train import (
    BN_BATCHES,
    DENSE_HOST_HU,
    DOT_NEGATIVE_MARGIN_MM,
    MIN_HIT_RADIUS_MM,
    PHASES,
    SAMPLE_SOURCES,
    StageSchedule,
    Trainer,
    TrainSettings,
    dot_negatives,
    lesion_weight,
    mine_candidates,
    phantom_cases,
    prepare_case,
    sphere_mask,
)
from NoduleDetectionLib.train_run import _refinement_as_stage1, load_config, run_training, settings_from_config
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]

SHORT = {
    "seed": 0,
    "model": {"stage1": {"spacing_mm": 2.0, "channels": [4, 8], "tile": 64},
              "stage2": {"patch": 12, "scales_mm": [1.5, 3.0], "channels": [4, 8]}},
    "train": [{"phantoms": 2, "seed": 1, "phantom_options": {"shape": [32, 64, 80]}}],
    "validation": [{"phantoms": 1, "seed": 500, "phantom_options": {"shape": [32, 64, 80]}}],
    "stage1": {"steps": 6, "batch": 2, "lr": 0.01},
    "stage2": {"steps": 4, "batch": 8, "lr": 0.003},
    "patch1": 24, "validate_every": 3,
}


def _write(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def _log(outdir):
    return [json.loads(x) for x in (outdir / "train_log.jsonl").read_text().splitlines()]


def test_short_run_writes_a_loadable_model(tmp_path):
    model_path = run_training(_write(tmp_path, SHORT), tmp_path / "run", device="cpu")
    for name in ("model.safetensors", "model_card.md", "train_log.jsonl", "training_curves.png", "checkpoint.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    model = NoduleModel.load(model_path)
    assert model.config.stage1.channels == (4, 8)
    assert model.config.card["training_lesions"] > 0
    # The stage weight is the one with the best validation CPM (ties: the larger weight), and the card says so.
    by_weight = {float(w): v for w, v in model.config.card["validation_cpm_by_stage2_weight"].items()}
    assert sorted(by_weight) == list(STAGE_WEIGHTS)
    assert model.config.stage2.weight == max(by_weight, key=lambda w: (round(by_weight[w], 6), w))
    assert model.config.card["validation_cpm_inserted"] == by_weight[model.config.stage2.weight]
    assert "not a medical device" in (tmp_path / "run" / "model_card.md").read_text()
    records = _log(tmp_path / "run")
    assert [r["step"] for r in records if r["stage"] == "stage1"] == list(range(1, 7))
    assert any(r["stage"] == "validation" and r["val_cpm"] is not None for r in records)
    assert records[-1]["stage"] == "done"
    Detector(model, device="cpu")  # the detector takes it as it is
    with pytest.raises(Exception, match="already exists"):
        run_training(_write(tmp_path, SHORT), tmp_path / "run", device="cpu")


def test_resume_continues_from_the_checkpoint(tmp_path):
    """A run stopped after its stage 1 checkpoint continues at stage 1's last step, not from scratch."""
    config = dict(SHORT, stage1={"steps": 6, "batch": 2, "lr": 0.01})
    run_training(_write(tmp_path, config), tmp_path / "run", device="cpu")
    first = _log(tmp_path / "run")
    # Simulate an interruption right after the stage 1 checkpoint at step 6: keep the log up to there and a
    # checkpoint from then (made by rerunning stage 1 only would be slow; instead check the state machine).
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["stage"] == "stage2" and state["trainer"]["step"] == 4
    (tmp_path / "run" / "model.safetensors").unlink()
    run_training(_write(tmp_path, config), tmp_path / "run", resume=True, device="cpu")
    second = _log(tmp_path / "run")[len(first):]
    assert not any(r["stage"] == "stage1" for r in second)  # stage 1 was not redone
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_started_run_needs_resume_flag(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_log.jsonl").write_text("")
    with pytest.raises(Exception, match="--resume"):
        run_training(_write(tmp_path, SHORT), tmp_path / "run", device="cpu")


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(InputError, match="below 1000"):
        load_config(_write(tmp_path, dict(SHORT, train=[{"path": ".", "insert": {"seed": 1000}}])))
    with pytest.raises(InputError, match="init_stages"):
        load_config(_write(tmp_path, dict(SHORT, init_stages=["stage3"])))
    with pytest.raises(InputError, match="distractors"):
        load_config(_write(tmp_path, dict(SHORT, train=[{"path": ".", "insert": {"distractors": -2}}])))
    for elastic in (-1, 11, "2"):
        with pytest.raises(InputError, match="elastic_mm"):
            load_config(_write(tmp_path, dict(SHORT, elastic_mm=elastic)))
    for weight in (0, -1, "4", True):
        with pytest.raises(InputError, match="small_attached_weight"):
            load_config(_write(tmp_path, dict(SHORT, small_attached_weight=weight)))
    for start in (-1, 2.5, True):
        with pytest.raises(InputError, match="average_from"):
            load_config(_write(tmp_path, dict(SHORT, stage1={"steps": 4, "average_from": start})))
    with pytest.raises(InputError, match="constant_lr"):
        load_config(_write(tmp_path, dict(SHORT, stage2={"constant_lr": "yes"})))
    for share in (-0.1, 1.5, "0.5"):
        with pytest.raises(InputError, match="dot_negative_fraction"):
            load_config(_write(tmp_path, dict(SHORT, dot_negative_fraction=share)))
    with pytest.raises(InputError, match="unknown setting"):
        load_config(_write(tmp_path, dict(SHORT, stage1={"step": 4})))


def test_config_keys_with_typos_are_refused(tmp_path):
    """A misspelt setting is an error naming it, at the top, in a data source and in its ``insert``: ignored, it
    would train another model than the one asked for without a word."""
    misspelt = {"stage2_random_convolutoin": 0.5}
    with pytest.raises(InputError, match="stage2_random_convolutoin"):
        load_config(_write(tmp_path, dict(SHORT, **misspelt)))
    with pytest.raises(InputError, match="slice_thickness"):
        load_config(_write(tmp_path, dict(SHORT, train=[{"phantoms": 1, "slice_thickness": 5.0}])))
    with pytest.raises(InputError, match="lesion_per_scan"):
        load_config(_write(tmp_path, dict(SHORT, validation=[{"path": ".", "insert": {"lesion_per_scan": 9}}])))
    for source in ("scans", {"path": ".", "insert": [40]}):
        with pytest.raises(InputError, match="must be an object"):
            load_config(_write(tmp_path, dict(SHORT, train=[source])))
    settings_from_config(load_config(_write(tmp_path, dict(SHORT, time_budget_minutes=5, augment=False))))


def test_calibration_and_refinement_settings_are_checked_before_training(tmp_path):
    """A run's ``calibration`` section and ``stage1_refine`` schedule are checked when the config is read, with a
    one-line error, not after hours of training."""
    config = load_config(_write(tmp_path, dict(SHORT, calibration={"lesions": {"path": "hosts", "seed": 2000}})))
    assert Path(config["calibration"]["lesions"]["path"]) == (tmp_path / "hosts").resolve()
    bad = [({"lesions": {"path": ".", "seed": 7}}, "seed must be 1000 or more"),
           ({"lesions": {"path": "."}, "weight": [0.5]}, "weight"),
           ({"lesions": {"path": ".", "per_copy": 0}}, "per_copy"),
           ({"lesions": {"path": ".", "lesion": 20}}, "lesion"),
           ({"lesions": {"seed": 2000}}, "'path'"),
           ({"lesions": {"path": "."}, "weights": [2]}, "between 0 and 1"),
           ({"lesions": {"path": "."}, "temperatures": ["hot"]}, "not numbers"),
           ({"lesions": {"path": "."}, "stage1_bf16": "yes"}, "true or false"),
           ({"lesions": {"path": "."}, "blob_candidates": 5000}, "blob-candidates"),
           ([{"path": "."}], "lesion set")]
    for section, message in bad:
        with pytest.raises(InputError, match=message):
            load_config(_write(tmp_path, dict(SHORT, calibration=section)))
    with pytest.raises(InputError, match="step"):
        load_config(_write(tmp_path, dict(SHORT, stage1_refine={"step": 5})))
    settings = settings_from_config(load_config(_write(tmp_path, dict(SHORT, stage1_refine={"steps": 5}))))
    assert settings.stage1_refine.steps == 5 and settings_from_config(SHORT).stage1_refine.steps == 0


def test_stage1_refinement_runs_between_the_stages_and_resumes_in_place():
    """``stage1_refine`` goes on from stage 1's result before stage 2 is mined and trained; a run resumed from a
    checkpoint taken in the refinement continues it there (stage 1 is not redone) and ends with the same U-net."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64),
                         stage2=Stage2Config(patch=12, scales_mm=(1.5, 3.0), channels=(4, 8)))
    model = NoduleModel.build(config, seed=0)
    cases = [prepare_case(c, model) for c in phantom_cases(2, seed=1, shape=(32, 64, 80))]
    settings = TrainSettings(stage1=StageSchedule(steps=2, batch=2, lr=0.01),
                             stage1_refine=StageSchedule(steps=4, batch=2, lr=0.005, constant_lr=True, average_from=1),
                             stage2=StageSchedule(steps=2, batch=4, lr=0.003), patch1=24, validate_every=2)
    states = []
    trainer = Trainer(model, cases, [], settings)
    trainer.train(checkpoint=lambda s: states.append(_saved(s)))
    states = [torch.load(s, weights_only=True) for s in states]
    assert [(r["stage"], r["step"]) for r in trainer.history] == (
        [("stage1", 1), ("stage1", 2)] + [("stage1_refine", i) for i in range(1, 5)] + [("stage2", 1), ("stage2", 2)])
    assert [(s["stage"], s["step"]) for s in states] == [
        ("stage1", 2), ("stage1_refine", 2), ("stage1_refine", 4), ("stage2", 2)]
    refined = {k: v.clone() for k, v in model.stage1.state_dict().items()}

    other = NoduleModel.build(config, seed=5)
    other.stage1.load_state_dict(states[1]["net"])  # as ``run_training`` restores the checkpoint's networks
    resumed = Trainer(other, cases, [], settings)
    resumed.train(states[1])
    assert [(r["stage"], r["step"]) for r in resumed.history] == [
        ("stage1_refine", 3), ("stage1_refine", 4), ("stage2", 1), ("stage2", 2)]
    for key, value in other.stage1.state_dict().items():
        assert torch.allclose(value.float(), refined[key].float(), atol=1e-5), key
    # Without refinement steps the phase is skipped.
    plain = Trainer(NoduleModel.build(config, seed=0), cases, [],
                    TrainSettings(stage1=StageSchedule(steps=1, batch=2), stage2=StageSchedule(steps=1, batch=4),
                                  patch1=24))
    plain.train()
    assert [r["stage"] for r in plain.history] == ["stage1", "stage2"]


def test_a_run_with_refinement_logs_and_plots_it(tmp_path):
    run_training(_write(tmp_path, dict(SHORT, stage1_refine={"steps": 3, "batch": 2, "lr": 0.005})),
                 tmp_path / "run", device="cpu")
    records = _log(tmp_path / "run")
    assert [r["stage"] for r in records if r["stage"] in PHASES] == ["stage1"] * 6 + ["stage1_refine"] * 3 + [
        "stage2"] * 4
    shown, refine_from = _refinement_as_stage1(records)
    assert refine_from == 6
    assert [r["step"] for r in shown if r["stage"] == "stage1"] == list(range(1, 10))
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0


def test_a_run_can_end_calibrated(tmp_path, host_folder):
    """With a ``calibration`` section, ``train`` inserts that lesion set and calibrates the trained model on it with
    the pinned options, as ``make-lesion-dataset`` and ``calibrate`` would: the run's model is the calibrated one,
    the trained networks are kept beside it unchanged."""
    section = {"lesions": {"path": str(host_folder), "lesions": 3, "per_copy": 2, "seed": 1000},
               "candidate_thresholds": [0.1], "weights": [0.5], "temperatures": [4.0], "dot_weights": [0.0],
               "blob_candidates": 3}
    model_path = run_training(_write(tmp_path, dict(SHORT, calibration=section, target_fp_per_scan=1.0)),
                              tmp_path / "run", device="cpu")
    run = tmp_path / "run"
    for name in ("trained_model.safetensors", "calibration/calibration.json", "calibration/calibration.md",
                 "calibration_lesions/annotations.csv", "model_card.md"):
        assert (run / name).is_file(), name
    record = json.loads((run / "calibration" / "calibration.json").read_text())
    assert record["nodules"] == 3 and record["fp_per_scan"] == 1.0
    assert record["dataset"] == str(run / "calibration_lesions")
    model, trained = NoduleModel.load(model_path), NoduleModel.load(run / "trained_model.safetensors")
    assert (model.config.stage1.candidate_threshold, model.config.stage2.weight, model.config.stage1.score_temperature,
            model.config.stage1.blob_candidates) == (0.1, 0.5, 4.0, 3)
    assert model.config.threshold == record["chosen"]["threshold"]
    assert trained.config.stage1.candidate_threshold == 0.3 and trained.config.stage1.blob_candidates == 0
    for net in ("stage1", "stage2"):
        mine, theirs = getattr(model, net).state_dict(), getattr(trained, net).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), net
    assert model.config.card["calibration"]["chosen"]["cpm"] == record["chosen"]["cpm"]
    assert "**calibration** (the model's operating point" in (run / "model_card.md").read_text()
    records = _log(run)
    assert [r["stage"] for r in records[-2:]] == ["done", "calibration"]
    assert records[-1]["calibration_cpm"] == record["chosen"]["cpm"] and records[-1]["val_cpm"] is None


def _is_config(data: object) -> bool:
    return isinstance(data, dict) and "train" in data


def test_every_config_in_the_repository_loads():
    """The configs of the shipped model and of every recorded experiment pass ``load_config`` (no misspelt or
    retired setting), so each command in the model card still runs as written."""
    configs = [p for folder in ("Resources/Training", "Resources/Models/experiments")
               for p in sorted((ROOT / folder).rglob("*.json")) if _is_config(json.loads(p.read_text()))]
    assert len(configs) >= 20
    for path in configs:
        settings_from_config(load_config(path))


def test_small_attached_lesions_are_drawn_more_often():
    """``small_attached_weight`` weights the draw of inserted lesions under 6 mm that touch the pleura or a vessel,
    only those; lesions outside the working grid are not drawn, and the weights follow ``centres``."""
    case, = phantom_cases(1, seed=3, shape=(32, 64, 80))
    g = case.volume.geometry
    inside = g.index_to_lps(np.array([40.0, 32.0, 16.0]))
    outside = g.index_to_lps(np.array([40.0, 32.0, 500.0]))
    case.lesions = [(inside, 4.0), (outside, 4.0), (inside, 4.0), (inside, 5.0), (inside, 8.0)]
    case.kinds = [("solid", "round", "juxtapleural"), ("solid", "round", "juxtapleural"),
                  ("solid", "round", "free"), ("ground-glass", "lobulated", "juxtavascular"),
                  ("solid", "round", "juxtapleural")]
    model = NoduleModel.build(ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8))), seed=0)
    prepared = prepare_case(case, model)
    assert list(prepared.lesion_index) == [0, 2, 3, 4] and len(prepared.centres) == 4
    assert list(prepared.draw_weights(4.0)) == [4.0, 1.0, 4.0, 1.0]
    assert list(prepared.draw_weights(1.0)) == [1.0] * 4
    case.kinds = []  # real annotations carry no kinds: every lesion alike
    assert list(prepared.draw_weights(4.0)) == [1.0] * 4
    assert settings_from_config(dict(SHORT, small_attached_weight=3)).small_attached_weight == 3.0


def test_weighted_lesion_draw_and_elastic_augmentation_train(tmp_path):
    config = dict(SHORT, balance_lesions=True, small_attached_weight=3, elastic_mm=1.0, stage2={"steps": 1, "batch": 4})
    model = NoduleModel.load(run_training(_write(tmp_path, config), tmp_path / "run", device="cpu"))
    assert [r["stage"] for r in _log(tmp_path / "run")].count("stage1") == SHORT["stage1"]["steps"]
    assert model.config.card["training_lesions"] > 0


def test_distractors_change_the_scan_not_the_labels(tmp_path):
    """``insert.distractors`` paints unlabelled tubes into each copy: same lesions and labels, other voxels."""
    from NoduleDetectionLib.io import write_volume
    from NoduleDetectionLib.synthetic import make_phantom
    from NoduleDetectionLib.train_run import cases_from_source

    (tmp_path / "ct").mkdir()
    write_volume(make_phantom(np.random.default_rng(4), n_nodules=0).volume, tmp_path / "ct" / "host.nrrd")
    (tmp_path / "annotations.csv").write_text("seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status\n")
    insert = {"lesions_per_scan": 2, "copies": 1, "seed": 1, "mix": {"median_diameter_mm": 8.0}}
    plain, = cases_from_source({"path": str(tmp_path), "insert": insert}, seed=0)
    tubes, = cases_from_source({"path": str(tmp_path), "insert": dict(insert, distractors=4)}, seed=0)
    assert plain.lesions and len(plain.lesions) == len(tubes.lesions) == len(plain.kinds)
    assert plain.kinds == tubes.kinds and all(k[2] in ("free", "juxtavascular", "juxtapleural") for k in plain.kinds)
    assert all(np.allclose(a[0], b[0]) for a, b in zip(plain.lesions, tubes.lesions))
    assert np.array_equal(plain.label_map, tubes.label_map)
    added = tubes.volume.array.astype(int) - plain.volume.array
    assert (added > 200).sum() > 20 and not (added[plain.label_map > 0]).any()


def _averaging_trainer(model, cases, hook=None):
    settings = TrainSettings(stage1=StageSchedule(steps=6, batch=2, lr=0.01, constant_lr=True, average_from=3),
                             patch1=24, validate_every=2)
    return Trainer(model, cases, [], settings, hook=hook)


def test_stage1_keeps_the_mean_of_its_weights_and_resumes_it():
    """With ``average_from`` 3 the U-net ends with the mean of its parameters after steps 3 to 6 (not the last
    step's) and batch-norm statistics recomputed for that mean; a run resumed from the checkpoint of step 4 (the
    mean of two steps in it) ends with the same weights as the run that was not stopped."""
    model = NoduleModel.build(ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64)), seed=0)
    cases = [prepare_case(c, model) for c in phantom_cases(2, seed=1, shape=(32, 64, 80))]
    start = {k: v.clone() for k, v in model.stage1.state_dict().items()}
    params, states = {}, []

    def hook(stage, step, steps, loss):
        params[step] = {k: v.detach().clone() for k, v in model.stage1.named_parameters()}
        return True

    _averaging_trainer(model, cases, hook).train_stage1(checkpoint=lambda s: states.append(_saved(s)))
    states = [torch.load(s, weights_only=True) for s in states]  # as a checkpoint file holds them
    assert sorted(params) == list(range(1, 7))
    for name, value in model.stage1.named_parameters():
        mean = sum(params[i][name] for i in range(3, 7)) / 4
        assert torch.allclose(value, mean, atol=1e-6), name
        assert not torch.allclose(value, params[6][name]), name
    batch_norms = [m for m in model.stage1.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert batch_norms and all(int(m.num_batches_tracked) == BN_BATCHES for m in batch_norms)
    assert [s["step"] for s in states] == [2, 4, 6] and states[1]["average"]["count"] == 2
    assert states[0]["average"]["count"] == 0
    averaged = {k: v.clone() for k, v in model.stage1.state_dict().items()}

    model.stage1.load_state_dict(start)
    resumed = _averaging_trainer(model, cases)
    resumed.train_stage1(states[1])
    for key, value in model.stage1.state_dict().items():
        assert torch.allclose(value.float(), averaged[key].float(), atol=1e-5), key


def _saved(obj) -> io.BytesIO:
    """``obj`` saved by ``torch.save`` at this moment (the trainer goes on changing the tensors it holds)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_fine_tuning_can_keep_stage1_and_train_stage2_afresh(tmp_path):
    """``init_stages: ["stage1"]`` keeps the init model's U-net and starts the classifier from fresh weights (seeded):
    with no steps at all, the result holds exactly the init U-net and a freshly built classifier, and the blob
    proposals the config asks for."""
    init = run_training(_write(tmp_path, SHORT), tmp_path / "init", device="cpu")
    config = dict(SHORT, init_model=str(init), init_stages=["stage1"], stage1={"steps": 0}, stage2={"steps": 0},
                  tissue_negatives=30, stage2_rotate=True,
                  model={"stage1": {"blob_candidates": 7, "outside_lung_hu": 40, "channels": [2]}})
    settings = settings_from_config(config)
    assert (settings.tissue_negatives, settings.stage2_rotate) == (30, True)
    model = NoduleModel.load(run_training(_write(tmp_path, config), tmp_path / "tuned", device="cpu"))
    before = NoduleModel.load(init)
    fresh = NoduleModel.build(before.config, seed=SHORT["seed"]).state_tensors()
    after = model.state_tensors()
    for key, value in before.state_tensors().items():
        assert torch.equal(after[key], value if key.startswith("stage1.") else fresh[key]), key
    assert not any(r["stage"] in ("stage1", "stage2") for r in _log(tmp_path / "tuned"))
    # of the config's model section, a fine-tune takes the proposal and input settings only, never the architecture
    assert (model.config.stage1.blob_candidates, model.config.stage1.outside_lung_hu) == (7, 40)
    assert model.config.stage1.channels == before.config.stage1.channels
    config["model"] = {"stage1": {"outside_lung_hu": "water"}}
    with pytest.raises(ModelError, match="outside_lung_hu"):
        run_training(_write(tmp_path, config), tmp_path / "bad", device="cpu")


def test_mining_adds_blob_proposals_as_stage2_samples():
    """With ``blob_candidates``, the blob filter's proposals join the stage 2 samples (source ``blob_candidate``),
    labelled positive exactly when they lie within a lesion's radius (at least ``MIN_HIT_RADIUS_MM``)."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64, candidate_threshold=1.01,
                                             blob_candidates=8))
    model = NoduleModel.build(config, seed=0)
    cases = [prepare_case(c, model) for c in phantom_cases(1, seed=3, shape=(32, 64, 80))]
    samples = mine_candidates(model, cases, np.random.default_rng(0), dense_per_case=0, parenchyma_per_case=0)
    counts = samples.counts()
    assert 0 < counts["blob_candidate"] <= 8 and counts["stage1_candidate"] == 0
    blob = samples.source == SAMPLE_SOURCES.index("blob_candidate")
    lesions = cases[0].case.lesions
    for centre, label in zip(samples.centers[blob], samples.labels[blob]):
        inside = any(np.linalg.norm(centre - np.asarray(p)) < max(d / 2, MIN_HIT_RADIUS_MM) for p, d in lesions)
        assert label == int(inside)
    assert counts["blob_hits"] == int(samples.labels[blob].sum()) > 0  # the phantom's spheres are blobs


def test_threshold_rule_and_ignore_spheres():
    findings = [Finding("a", (0.0, 0.0, 0.0), 10.0, "nodule"), Finding("b", (0.0, 0.0, 0.0), 10.0, "nodule")]
    cands = [Candidate("a", (0.0, 0.0, 0.0), 0.9), Candidate("a", (50.0, 0, 0), 0.8),
             Candidate("b", (50.0, 0, 0), 0.6), Candidate("b", (90.0, 0, 0), 0.4)]
    # 2 scans, at most 0.5 FP/scan → one FP allowed → the threshold sits just above the 2nd-highest FP (0.6)
    t = choose_threshold(findings, cands, ["a", "b"], 0.5, bounds=(0.0, 1.0))
    assert 0.6 < t < 0.61
    geo = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    mask = sphere_mask((10, 20, 20), geo, [(np.array([10.0, 10.0, 10.0]), 4.0)])
    assert mask[5, 10, 10] and mask[5, 10, 14] and not mask[5, 10, 15] and mask[7, 10, 10] and not mask[8, 10, 10]


def test_small_lesions_weigh_more_and_every_lesion_has_a_centre():
    """Stage 1 weights: 8 on the voxels of a 4 mm lesion, 1 on a 12 mm one and on background, 0 in ignore regions;
    the prepared case lists every lesion's centre on the working grid (patches are drawn per lesion)."""
    assert [lesion_weight(d) for d in (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 25.0)] == [8, 8, 8, 5, 2, 1, 1]
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64))
    model = NoduleModel.build(config, seed=0)
    case = phantom_cases(1, seed=3, shape=(32, 64, 80), n_nodules=2, diameters_mm=(4.0, 4.0))[0]
    big_centre = case.lesions[1][0]
    case.lesions[1] = (big_centre, 12.0)  # as if the label map's second lesion were 12 mm: its target stays
    case.ignore = [(np.asarray(case.lesions[0][0]) + np.array([0.0, 0.0, 20.0]), 3.0)]
    prepared = prepare_case(case, model)
    geo = prepared.prep.geometry
    for (centre, diameter), kji in zip(case.lesions, prepared.centres):
        assert np.allclose(kji, np.round(geo.lps_to_index(np.asarray(centre))[::-1]))
        assert prepared.weight[tuple(kji)] == (8.0 if diameter == 4.0 else 1.0)
        assert prepared.target[tuple(kji)] == 1.0
    assert prepared.weight[tuple(np.round(geo.lps_to_index(case.ignore[0][0])[::-1]).astype(int))] == 0.0
    assert set(np.unique(prepared.weight[prepared.target == 0])) == {0.0, 1.0}
    assert settings_from_config(SHORT).balance_lesions is False  # the shipped recipe's behaviour by default
    assert settings_from_config(dict(SHORT, balance_lesions=True)).balance_lesions is True


def test_small_lesions_can_get_larger_targets():
    """``min_target_mm``: a 4 mm lesion's stage 1 target becomes a 6 mm ball around its centre, weighted as a 6 mm
    lesion (5 instead of 8); a 12 mm lesion's target and weight do not change. The setting reaches the trainer
    from the config."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64))
    model = NoduleModel.build(config, seed=0)
    case = phantom_cases(1, seed=3, shape=(32, 64, 80), n_nodules=2)[0]
    case.label_map = None  # targets from the lesion list: balls of the lesions' diameters
    case.lesions = [(case.lesions[0][0], 4.0), (case.lesions[1][0], 12.0)]
    own, larger = prepare_case(case, model), prepare_case(case, model, min_target_mm=6.0)
    geo, shape = own.prep.geometry, own.target.shape
    (small_centre, _), (big_centre, _) = case.lesions
    near = sphere_mask(shape, geo, [(np.asarray(small_centre), 5.0)])
    ball = {r: sphere_mask(shape, geo, [(np.asarray(small_centre), r)]) for r in (2.0, 3.0)}
    assert np.array_equal(own.target[near] > 0, ball[2.0][near])
    assert np.array_equal(larger.target[near] > 0, ball[3.0][near]) and ball[3.0].sum() > ball[2.0].sum()
    assert set(np.unique(own.weight[ball[2.0]])) == {8.0}
    assert set(np.unique(larger.weight[ball[3.0]])) == {5.0}
    big = sphere_mask(shape, geo, [(np.asarray(big_centre), 8.0)])
    assert np.array_equal(own.target[big], larger.target[big]) and np.array_equal(own.weight[big], larger.weight[big])
    assert settings_from_config(dict(SHORT, min_target_mm=6)).min_target_mm == 6.0
    assert settings_from_config(SHORT).min_target_mm == 0.0


def test_larger_targets_can_leave_out_dense_host_tissue():
    """``min_target_ignores_dense``: the part of a small lesion's 6 mm target ball that is dense host tissue (here
    the phantom's body wall) and not the lesion is ignored (weight 0), not a target; the rest is as before."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64))
    model = NoduleModel.build(config, seed=0)
    case = phantom_cases(1, seed=3, shape=(32, 64, 80), n_nodules=1)[0]
    case.label_map = None
    plain = prepare_case(case, model)
    geo, image = plain.prep.geometry, plain.prep.image
    # a lung voxel next to the body wall (2 mm from it): a juxtapleural-like place for a 3 mm lesion
    wall = image > (DENSE_HOST_HU + 1000.0) / 1400.0
    spot = np.argwhere((ndimage.distance_transform_edt(~wall) == 1.0) & (image < 0.3) & plain.prep.lung)[0]
    centre = geo.index_to_lps(spot[::-1].astype(float))
    case.lesions = [(centre, 3.0)]
    before = prepare_case(case, model, min_target_mm=6.0)
    after = prepare_case(case, model, min_target_mm=6.0, ignore_dense=True)
    ball = sphere_mask(image.shape, geo, [(centre, 3.0)])
    own = sphere_mask(image.shape, geo, [(centre, 1.5)])
    dense = ball & ~own & wall
    assert dense.sum() > 0 and (before.target[dense] > 0).all()
    assert (after.target[dense] == 0).all() and (after.weight[dense] == 0).all()
    assert (after.target[own] > 0).all() and np.array_equal(after.target[~dense], before.target[~dense])
    assert np.array_equal(after.weight[~dense], before.weight[~dense])
    assert settings_from_config(dict(SHORT, min_target_ignores_dense=True)).min_target_ignores_dense is True


def test_thick_slice_simulation_can_be_left_out_of_stage1_augmentation():
    """``thick_slices`` (default on) decides whether stage 1's augmentation simulates thicker slices."""
    from NoduleDetectionLib.augment import RandomSliceThickness
    from NoduleDetectionLib.train import stage1_augmentation

    def kinds(aug):
        return [type(t) for t in aug.transforms]

    assert RandomSliceThickness in kinds(stage1_augmentation(1.5))
    assert RandomSliceThickness not in kinds(stage1_augmentation(1.5, thick_slices=False))
    assert settings_from_config(dict(SHORT, thick_slices=False)).thick_slices is False
    assert settings_from_config(SHORT).thick_slices is True


def test_stage1_loss_weights_voxels_without_going_negative():
    """Weighted voxels count more, yet the loss stays a BCE (>= 0) plus a Dice term in [0, 1]: about 0 for a
    perfect map, and a missed weight-8 lesion costs more than a missed weight-1 lesion."""
    from NoduleDetectionLib.train import _loss_stage1

    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:4, 2:4, 2:4] = 1
    heavy = torch.where(target > 0, 8.0, 1.0)
    light = torch.ones_like(target)
    perfect = torch.where(target > 0, 12.0, -12.0)
    missed = torch.full_like(target, -12.0)
    everywhere = torch.full_like(target, 12.0)
    for w in (heavy, light):
        assert 0.0 <= float(_loss_stage1(perfect, target, w)) < 1e-3
        for logits in (missed, everywhere):
            loss = float(_loss_stage1(logits, target, w))
            assert 1.0 <= loss <= 1.0 + 12.0 + 1e-3  # Dice term near 1; BCE of ±12 logits is at most about 12
    assert float(_loss_stage1(missed, target, heavy)) > float(_loss_stage1(missed, target, light))


def test_stage1_focal_loss_weighs_hard_voxels_up(tmp_path):
    """``focal_gamma`` scales each voxel's cross-entropy by ``(1 - p_t) ** gamma``: a hand computation on two
    voxels; voxels already right lose nearly all their weight, wrong ones keep much of it; gamma 0 is the plain
    loss bit for bit; the config checks the exponent."""
    from NoduleDetectionLib.train import _loss_stage1

    target = torch.tensor([1.0, 0.0])
    weight = torch.tensor([2.0, 1.0])
    logits = torch.tensor([2.0, 1.0])  # the lesion voxel fairly right (p 0.88), the background one wrong (p 0.73)
    p = torch.sigmoid(logits)
    ce = torch.stack([-torch.log(p[0]), -torch.log(1 - p[1])])
    factor = torch.stack([1 - p[0], p[1]]) ** 2
    dice = 1 - (2 * 2 * p[0] + 1) / ((weight * p).sum() + 2 + 1)
    expected = (weight * ce * factor).sum() / 3 + dice
    assert torch.allclose(_loss_stage1(logits, target, weight, focal_gamma=2.0), expected, atol=1e-6)
    assert torch.equal(_loss_stage1(logits, target, weight, focal_gamma=0.0), _loss_stage1(logits, target, weight))

    empty, ones = torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4)

    def cross_entropy_part(logit: float, gamma: float) -> float:  # the loss less its Dice term (empty target)
        x = torch.full_like(empty, logit)
        return float(_loss_stage1(x, empty, ones, focal_gamma=gamma) - (1 - 1 / (torch.sigmoid(x).sum() + 1)))

    assert cross_entropy_part(-6.0, 0.0) > 2e-3 and cross_entropy_part(-6.0, 2.0) < 1e-5  # right: weight ~0
    assert 0.5 < cross_entropy_part(1.0, 2.0) / cross_entropy_part(1.0, 0.0) < 0.6  # wrong: sigmoid(1) ** 2 kept

    assert settings_from_config({"train": []}).stage1_focal_gamma == 0.0
    assert settings_from_config({"train": [], "stage1_focal_gamma": 2}).stage1_focal_gamma == 2.0
    for gamma in (-1, 6, "2", True):
        with pytest.raises(InputError, match="stage1_focal_gamma"):
            load_config(_write(tmp_path, dict(SHORT, stage1_focal_gamma=gamma)))


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """DistributedDataParallel with the gloo backend: 2 CPU processes train a few steps together."""
    config = _write(tmp_path, SHORT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "NoduleDetectionLib.cli", "train", str(config), "-o", str(tmp_path / "ddp"), "--device", "cpu"],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = NoduleModel.load(tmp_path / "ddp" / "model.safetensors")
    assert model.config.card["processes"] == 2
    steps = [r["step"] for r in _log(tmp_path / "ddp") if r["stage"] == "stage1"]
    assert steps == list(range(1, 7))  # one log, written by rank 0 only


def test_mining_finds_tissue_negatives_when_stage_1_proposes_nothing():
    """A stage 1 that proposes no candidate (threshold above any probability) still leaves stage 2 negatives: points
    of dense tissue and parenchyma in the lungs, clear of every lesion; positives are the jittered lesion centres."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64, candidate_threshold=1.01))
    model = NoduleModel.build(config, seed=0)
    cases = [prepare_case(c, model) for c in phantom_cases(1, seed=3, shape=(32, 64, 80))]
    samples = mine_candidates(model, cases, np.random.default_rng(0), dense_per_case=40, parenchyma_per_case=20)
    counts = samples.counts()
    assert counts["stage1_candidate"] == 0
    assert counts["lesion"] == 4 * len(cases[0].case.lesions) == int(samples.labels.sum())
    assert 0 < counts["dense_tissue"] <= 40 and 0 < counts["parenchyma"] <= 20
    negatives = samples.centers[samples.labels == 0]
    for p, d in cases[0].case.lesions:
        assert (np.linalg.norm(negatives - np.asarray(p), axis=1) >= d / 2 + 3.0).all()


def test_mining_keeps_listed_non_nodules_away_from_lesions():
    """A case's listed non-nodules (LUNA16's class-0 candidates) become stage 2 negatives of their own source, at
    most ``listed_per_case`` of them, never one near a lesion."""
    config = ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64, candidate_threshold=1.01))
    model = NoduleModel.build(config, seed=0)
    case, = phantom_cases(1, seed=3, shape=(32, 64, 80))
    near = np.asarray(case.lesions[0][0], float) + 0.5
    far = [case.volume.geometry.index_to_lps(np.array([5.0 + 3 * n, 10.0, 4.0])) for n in range(6)]
    case.negatives = [near, *far]
    prepared = [prepare_case(case, model)]
    samples = mine_candidates(model, prepared, np.random.default_rng(0), dense_per_case=0, parenchyma_per_case=0,
                              listed_per_case=4)
    listed = samples.centers[samples.source == SAMPLE_SOURCES.index("listed_candidate")]
    assert samples.counts()["listed_candidate"] == 4 and (samples.labels[samples.source == 5] == 0).all()
    assert not any(np.allclose(p, near) for p in listed)
    assert all(any(np.allclose(p, f) for f in far) for p in listed)


def test_stage1_negative_patches_can_centre_on_bright_compact_spots(monkeypatch):
    """``dot_negatives``: the blob filter's spots of a case at least ``DOT_NEGATIVE_MARGIN_MM`` from every lesion
    target and outside ignore regions; with ``dot_negative_fraction`` 1 every non-lesion stage 1 patch is centred
    within the patch jitter of one of them."""
    from NoduleDetectionLib import train as train_module

    model = NoduleModel.build(ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64)), seed=0)
    prepared = prepare_case(phantom_cases(1, seed=3, shape=(32, 64, 80))[0], model)
    dots = dot_negatives(prepared)
    assert len(dots) > 3
    spacing_kji = np.array(prepared.prep.geometry.spacing)[::-1]
    to_target = ndimage.distance_transform_edt(prepared.target == 0, sampling=spacing_kji)
    assert prepared.target.any() and all(to_target[tuple(k)] >= DOT_NEGATIVE_MARGIN_MM for k in dots)
    assert all(prepared.prep.lung[tuple(k)] for k in dots)
    prepared.weight[tuple(dots[0])] = 0.0  # an ignore region over the strongest spot
    assert not any(np.array_equal(k, dots[0]) for k in dot_negatives(prepared))
    prepared.weight[tuple(dots[0])] = 1.0

    centres, crop = [], train_module.crop_patches

    def recording(arrays, centre, size):
        centres.append(np.array(centre))
        return crop(arrays, centre, size)

    monkeypatch.setattr(train_module, "crop_patches", recording)
    monkeypatch.setattr(train_module, "dot_negatives", lambda case: dots[-1:])  # one spot: every patch near it
    settings = TrainSettings(stage1=StageSchedule(steps=3, batch=2, lr=0.01), patch1=24, positive_fraction=0.0,
                             dot_negative_fraction=1.0)
    Trainer(model, [prepared], [], settings).train_stage1()
    assert len(centres) == 6
    assert all(np.abs(centre - dots[-1]).max() <= 24 // 4 for centre in centres)
    assert settings_from_config(dict(SHORT, dot_negative_fraction=0.25)).dot_negative_fraction == 0.25


def test_stage1_can_be_trained_on_the_lungs_only(monkeypatch):
    """With ``outside_lung_hu`` a prepared case's ``stage1_image`` is its image with everything outside the lung mask
    set to that HU, and stage 1's training patches are cut from it; without it, it is the image itself."""
    from NoduleDetectionLib import train as train_module
    from NoduleDetectionLib.preprocess import normalize_hu

    case = phantom_cases(1, seed=3, shape=(32, 64, 80))[0]
    plain = NoduleModel.build(ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64)), seed=0)
    unmasked = prepare_case(case, plain)
    assert unmasked.stage1_image is unmasked.prep.image
    model = NoduleModel.build(ModelConfig(stage1=Stage1Config(spacing_mm=2.0, channels=(4, 8), tile=64,
                                                              outside_lung_hu=0.0)), seed=0)
    prepared = prepare_case(case, model)
    lung = prepared.prep.lung
    assert 0 < lung.sum() < lung.size
    np.testing.assert_array_equal(prepared.stage1_image[lung], prepared.prep.image[lung])
    np.testing.assert_allclose(prepared.stage1_image[~lung], normalize_hu(np.float32(0.0)))
    assert not np.array_equal(prepared.stage1_image, prepared.prep.image)

    images, crop = [], train_module.crop_patches

    def recording(arrays, centre, size):
        images.append(arrays[0])
        return crop(arrays, centre, size)

    monkeypatch.setattr(train_module, "crop_patches", recording)
    settings = TrainSettings(stage1=StageSchedule(steps=2, batch=2, lr=0.01), patch1=24)
    Trainer(model, [prepared], [], settings).train_stage1()
    assert len(images) == 4 and all(a is prepared.stage1_image for a in images)
