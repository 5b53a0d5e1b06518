"""Shared pytest fixtures: paths to the real data beside the repository, and small synthetic volumes."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULE_DETECTION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real CTs and ``annotations.csv`` (read-only, never copied here)."""
    if not (SHARED_DATA / "annotations.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """A loader of the script ``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


TINY_SETTINGS = dict(stage1_steps=150, stage2_steps=60, vessels=4)


def train_tiny_model(path: Path, seed: int = 0) -> Path:
    """Train a tiny two-stage model on synthetic phantoms (about a minute on 2 idle cores) and save it.

    The same training and model-file code as the shipped model, only smaller networks, a coarser working
    grid, no augmentation and far fewer steps.
    """
    from NoduleDetectionLib.models import ModelConfig, NoduleModel, Stage1Config, Stage2Config
    from NoduleDetectionLib.train import StageSchedule, TrainSettings, phantom_cases, train_model

    config = ModelConfig(
        stage1=Stage1Config(spacing_mm=2.0, channels=(8, 16, 32), tile=64),
        stage2=Stage2Config(patch=16, scales_mm=(1.5, 3.0), channels=(8, 16, 32)),
        card={"name": "tiny phantom test model", "data": "synthetic phantoms only"},
    )
    settings = TrainSettings(
        stage1=StageSchedule(steps=TINY_SETTINGS["stage1_steps"], batch=4, lr=1e-2),
        stage2=StageSchedule(steps=TINY_SETTINGS["stage2_steps"], batch=16, lr=3e-3),
        patch1=32,
        seed=seed,
        augment=False,
    )
    cases = phantom_cases(3, seed=1, n_vessels=TINY_SETTINGS["vessels"])
    model = train_model(cases, NoduleModel.build(config, seed=seed), settings)
    return model.save(path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """Path of a tiny model trained on phantoms once per test session."""
    return train_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def host_folder(tmp_path_factory) -> Path:
    """A shared-layout folder with one synthetic phantom host (``ph``): a real nodule, an excluded point mark and a
    mass row; a host for ``make-lesion-dataset``."""
    import numpy as np
    from NoduleDetectionLib.io import write_volume
    from NoduleDetectionLib.synthetic import make_phantom

    root = tmp_path_factory.mktemp("hosts")
    (root / "ct").mkdir()
    phantom = make_phantom(np.random.default_rng(3), n_nodules=1, name="ph")
    write_volume(phantom.volume, root / "ct" / "ph.nrrd")
    (x, y, z), d = phantom.nodules[0]
    (root / "annotations.csv").write_text(
        "seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source\n"
        f'ph,ph.nrrd,{x},{y},{z},{d},nodule,"reader consensus, 4/4"\n'
        "ph,ph.nrrd,40,0,0,-1,excluded,point mark\nph,ph.nrrd,-40,0,0,35,mass,label\n")
    return root
