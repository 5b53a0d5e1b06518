"""Shared pytest fixtures: paths to the real data beside the repository, and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULE_DETECTION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real CTs and ``annotations.csv`` (read-only, never copied here)."""
    if not (SHARED_DATA / "annotations.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
