"""The per-user models folder (``registry``) and the training-log reader: plain files, no Slicer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from NoduleDetectionLib import registry
from NoduleDetectionLib.errors import InputError, OutputError

#: A training log as ``nodule-detection train`` writes it (the contract's format), figures worked out by hand.
LOG_LINES = [
    {"stage": "stage1", "step": 1, "steps": 3, "loss": 1.5, "val_cpm": None, "elapsed_s": 1.0},
    {"stage": "stage1", "step": 3, "steps": 3, "loss": 0.9, "val_cpm": None, "elapsed_s": 3.0},
    {"stage": "validation", "step": 3, "steps": 3, "loss": None, "val_cpm": 0.25, "elapsed_s": 4.5},
    {"stage": "stage2", "step": 2, "steps": 2, "loss": 0.4, "val_cpm": None, "elapsed_s": 6.0},
    {"stage": "validation", "step": 2, "steps": 2, "loss": None, "val_cpm": 0.2, "elapsed_s": 7.0},
    {"stage": "done", "step": 2, "steps": 2, "loss": 0.4, "val_cpm": 0.2, "elapsed_s": 7.5},
]


@pytest.fixture
def models_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def training_output(tmp_path) -> Path:
    """A training output folder with a real (untrained, tiny) model file, a card and a log."""
    from NoduleDetectionLib.models import ModelConfig, NoduleModel, Stage1Config, Stage2Config

    out = tmp_path / "run" / "output"
    config = ModelConfig(stage1=Stage1Config(channels=(4, 8)), stage2=Stage2Config(patch=8, channels=(4, 8)))
    NoduleModel.build(config, seed=0).save(out / registry.TRAINED_MODEL_FILE)
    (out / registry.TRAINED_CARD_FILE).write_text("# Model card\n\nTrained on two phantoms.\n", encoding="utf-8")
    (out / registry.TRAIN_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in LOG_LINES), encoding="utf-8")
    return out


def test_models_dir_from_environment_or_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(tmp_path / "elsewhere"))
    assert registry.models_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(registry.MODELS_DIR_ENV)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(registry.sys, "platform", "linux")
    monkeypatch.setattr(registry.Path, "home", classmethod(lambda cls: tmp_path / "home"))
    assert registry.models_dir() == tmp_path / "home" / ".local" / "share" / "NoduleDetection" / "models"


def test_add_list_load_remove(models_folder, training_output):
    from NoduleDetectionLib.detect import Detector

    assert registry.list_models() == []
    entry = registry.add_model(training_output, "finetuned-1", data="scene: 1 scan, 3 nodules",
                               extra={"device": "cpu"})
    assert entry.path == models_folder / "finetuned-1.safetensors"
    assert entry.path.read_bytes() == (training_output / registry.TRAINED_MODEL_FILE).read_bytes()
    assert Detector.load(entry.path, device="cpu") is not None
    meta = json.loads((models_folder / "finetuned-1.json").read_text(encoding="utf-8"))
    assert meta["data"] == "scene: 1 scan, 3 nodules" and meta["device"] == "cpu"
    assert meta["source"] == str(training_output.resolve())
    assert meta["figures"] == {
        "finished": True, "stage1_steps": 3, "stage1_last_loss": 0.9, "stage2_steps": 2, "stage2_last_loss": 0.4,
        "val_cpm_best": 0.25, "val_cpm_last": 0.2, "elapsed_s": 7.5,
    }
    card = entry.card_path.read_text(encoding="utf-8")
    assert card.startswith("# finetuned-1\n") and "scene: 1 scan, 3 nodules" in card
    assert "val_cpm_best: 0.25" in card and "Trained on two phantoms." in card
    assert [m.name for m in registry.list_models()] == ["finetuned-1"]
    assert registry.get_model("finetuned-1").metadata == meta

    registry.remove_model("finetuned-1")
    assert registry.list_models() == [] and not any(models_folder.iterdir())
    with pytest.raises(InputError, match="no registered model named 'finetuned-1'"):
        registry.remove_model("finetuned-1")


def test_existing_name_refused_unless_overwrite(models_folder, training_output):
    registry.add_model(training_output, "m1", data="first")
    with pytest.raises(OutputError, match="m1.safetensors already exists"):
        registry.add_model(training_output, "m1", data="second")
    assert registry.get_model("m1").metadata["data"] == "first"
    registry.add_model(training_output, "m1", data="second", overwrite=True)
    assert registry.get_model("m1").metadata["data"] == "second"


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../up", "with space", "x" * 101])
def test_bad_names_refused(models_folder, training_output, name):
    with pytest.raises(InputError, match="model name"):
        registry.add_model(training_output, name)
    assert not models_folder.exists()


def test_unfinished_training_refused(models_folder, tmp_path):
    with pytest.raises(InputError, match="holds no model.safetensors"):
        registry.add_model(tmp_path, "m1")


def test_listing_skips_incomplete_entries(models_folder, training_output):
    registry.add_model(training_output, "complete")
    (models_folder / "loose.safetensors").write_bytes(b"x")  # no metadata: not a registered model
    (models_folder / "broken.safetensors").write_bytes(b"x")
    (models_folder / "broken.json").write_text("{not json", encoding="utf-8")
    assert [(m.name, m.metadata == {}) for m in registry.list_models()] == [("broken", True), ("complete", False)]


def test_read_log_records_incrementally(tmp_path):
    path = tmp_path / registry.TRAIN_LOG_FILE
    assert registry.read_log_records(path) == ([], 0)
    first, second = (json.dumps(r) + "\n" for r in LOG_LINES[:2])
    path.write_text(first + second[:10], encoding="utf-8")  # second line still being written
    records, offset = registry.read_log_records(path)
    assert records == LOG_LINES[:1] and offset == len(first)
    path.write_text(first + second, encoding="utf-8")
    records, offset = registry.read_log_records(path, offset)
    assert records == LOG_LINES[1:2] and offset == len(first + second)
    assert registry.read_log_records(path, offset) == ([], offset)
    with path.open("a", encoding="utf-8") as f:
        f.write("[1, 2]\n")
    with pytest.raises(InputError, match="not a JSON object"):
        registry.read_log_records(path, offset)
