"""The per-user folder of trained models, and the training log they were made with.

A registered model is three files named after it in the models folder:

* ``<name>.safetensors``: the model file (loadable with ``detect.Detector.load``);
* ``<name>.md``: its model card (what data, when, the figures, then the card the training wrote);
* ``<name>.json``: the same facts as data (``name``, ``created``, ``data``, ``figures``, ``source``).

The folder is ``$NODULE_DETECTION_MODELS_DIR`` when set, else a per-user data folder
(``~/.local/share/NoduleDetection/models`` on Linux, ``~/Library/Application Support/NoduleDetection/models``
on macOS, ``%LOCALAPPDATA%\\NoduleDetection\\models`` on Windows). The NoduleDetectionTraining Slicer module
adds models here; the NoduleDetection module lists them. Plain files only: no torch, Qt or ``slicer``.

The training log (``train_log.jsonl``, written by ``nodule-detection train``) holds one JSON object per line:
``{"stage": "stage1"|"stage1_refine"|"stage2"|"validation"|"done"|"calibration", "step", "steps", "loss", "val_cpm",
"elapsed_s"}``.
``read_log_records`` reads it incrementally, so a GUI can follow a running training.

Example::

    from NoduleDetectionLib import registry
    entry = registry.add_model("runs/finetune1", "my-finetuned", data="12 scans from the scene")
    [m.name for m in registry.list_models()]     # ['my-finetuned', ...]
    registry.remove_model("my-finetuned")
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_path, check_writable, write_text_atomic
from .errors import InputError, ModelError

#: Environment variable naming the models folder (tests point it at a temporary folder).
MODELS_DIR_ENV = "NODULE_DETECTION_MODELS_DIR"

#: Files ``nodule-detection train`` writes into its output folder.
TRAINED_MODEL_FILE = "model.safetensors"
TRAINED_CARD_FILE = "model_card.md"
TRAIN_LOG_FILE = "train_log.jsonl"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SUFFIXES = (".safetensors", ".md", ".json")


@dataclass(frozen=True)
class RegisteredModel:
    """One model of the models folder.

    Attributes:
        name: the file stem, e.g. ``"my-finetuned"``.
        path: its ``.safetensors`` model file.
        card_path: its ``.md`` model card.
        metadata: the contents of its ``.json`` file (``{}`` if unreadable).
    """

    name: str
    path: Path
    card_path: Path
    metadata: dict


#: Where the shipped model lives, relative to the repository (or installed extension) root.
SHIPPED_MODEL_RELPATH = Path("Resources") / "Models" / "nodule_detector.safetensors"


def shipped_model_path() -> Path:
    """The shipped model file: ``$NODULE_DETECTION_MODEL`` if set, else ``Resources/Models/`` of the
    repository or installed extension (searched upwards from this package)."""
    env = os.environ.get("NODULE_DETECTION_MODEL")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / SHIPPED_MODEL_RELPATH
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the shipped model ({SHIPPED_MODEL_RELPATH.as_posix()}) was not found; pass a model file with --model"
    )


def model_file_threshold(path: os.PathLike) -> Optional[float]:
    """The default probability threshold stored in a model file's config (read from the safetensors header
    alone, without torch); ``None`` when the file is missing or not a NoduleDetection model."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 10_000_000)))
        threshold = float(json.loads(header["__metadata__"]["config"])["threshold"])
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        return None
    return threshold if 0.0 <= threshold <= 1.0 else None


def models_dir() -> Path:
    """The models folder (not created): ``$NODULE_DETECTION_MODELS_DIR`` or the per-user data folder."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "NoduleDetection" / "models"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a model file (letters, digits, ``._-``, at most 100, not starting with a
    dot or dash); raise ``InputError`` otherwise."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise InputError(
            f"model name {name!r} is not usable: use letters, digits, '.', '_' or '-' (start with a letter or digit)"
        )
    return name


def _entry(folder: Path, name: str) -> RegisteredModel:
    try:
        metadata = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metadata = {}
    return RegisteredModel(name, folder / f"{name}.safetensors", folder / f"{name}.md",
                           metadata if isinstance(metadata, dict) else {})


def list_models(folder: Optional[os.PathLike] = None) -> list[RegisteredModel]:
    """The registered models (those whose ``.safetensors`` and ``.json`` both exist), sorted by name.

    ``folder``: the models folder (default ``models_dir()``); a missing folder holds no model.
    """
    folder = Path(folder) if folder is not None else models_dir()
    if not folder.is_dir():
        return []
    names = sorted(p.stem for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    return [_entry(folder, n) for n in names if (folder / f"{n}.json").is_file()]


def get_model(name: str, folder: Optional[os.PathLike] = None) -> RegisteredModel:
    """The registered model ``name``; ``InputError`` if there is none."""
    for entry in list_models(folder):
        if entry.name == name:
            return entry
    raise InputError(f"no registered model named {name!r} in {Path(folder) if folder else models_dir()}")


def read_log_records(path: os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Read the complete lines of a ``train_log.jsonl`` from byte ``offset`` on.

    Returns ``(records, next_offset)``: pass ``next_offset`` to the next call to get only what was added. A
    last line without its newline (being written) is left for the next call. A missing file gives
    ``([], offset)``. Raises ``InputError`` for a complete line that is not a JSON object.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise InputError(f"{path}: new line {number} after byte {offset} is not a JSON object")
        records.append(record)
    return records, offset + end


def training_figures(records: list[dict]) -> dict[str, Any]:
    """Summary figures of a training log: steps run per stage, last loss per stage, best and last
    validation CPM, total time (s), and whether the run finished (a ``done`` record)."""
    figures: dict[str, Any] = {"finished": any(r.get("stage") == "done" for r in records)}
    for stage in ("stage1", "stage1_refine", "stage2"):
        rows = [r for r in records if r.get("stage") == stage]
        if rows:
            figures[f"{stage}_steps"] = int(rows[-1].get("step", len(rows)))
            figures[f"{stage}_last_loss"] = rows[-1].get("loss")
    cpms = [float(r["val_cpm"]) for r in records
            if isinstance(r.get("val_cpm"), (int, float)) and math.isfinite(r["val_cpm"])]
    if cpms:
        figures["val_cpm_best"] = max(cpms)
        figures["val_cpm_last"] = cpms[-1]
    times = [float(r["elapsed_s"]) for r in records if isinstance(r.get("elapsed_s"), (int, float))]
    if times:
        figures["elapsed_s"] = max(times)
    return figures


def _card(name: str, metadata: dict, trained_card: str) -> str:
    figures = metadata["figures"]
    lines = [f"# {name}", "", "NoduleDetection model registered from a training run. Research software, not a "
             "medical device.", "", f"* Registered: {metadata['created']}", f"* Training output: {metadata['source']}",
             f"* Data: {metadata['data'] or 'not stated'}"]
    lines += [f"* {key}: {value}" for key, value in figures.items()]
    if trained_card.strip():
        lines += ["", "---", "", trained_card.strip()]
    return "\n".join(lines) + "\n"


def add_model(
    training_dir: os.PathLike,
    name: str,
    data: str = "",
    extra: Optional[dict] = None,
    folder: Optional[os.PathLike] = None,
    overwrite: bool = False,
) -> RegisteredModel:
    """Register the model of a ``nodule-detection train`` output folder under ``name``.

    Copies ``training_dir/model.safetensors`` to ``<folder>/<name>.safetensors`` and writes ``<name>.md`` (a
    header with the data used and the figures of ``train_log.jsonl``, then the run's ``model_card.md``) and
    ``<name>.json`` (``name, created`` (UTC ISO 8601), ``data, figures, source`` and the ``extra`` items).

    Raises:
        InputError: bad name, or the folder holds no ``model.safetensors``.
        OutputError: a model of that name exists and ``overwrite`` is false.
    """
    check_name(name)
    training_dir = Path(training_dir)
    model_file = training_dir / TRAINED_MODEL_FILE
    if not model_file.is_file():
        raise InputError(f"{training_dir} holds no {TRAINED_MODEL_FILE}: the training has not finished")
    folder = Path(folder) if folder is not None else models_dir()
    for suffix in _SUFFIXES:
        check_writable(folder / f"{name}{suffix}", overwrite)
    records, _ = read_log_records(training_dir / TRAIN_LOG_FILE)
    card_file = training_dir / TRAINED_CARD_FILE
    metadata = {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "figures": training_figures(records),
        "source": str(training_dir.resolve()),
        **(extra or {}),
    }
    with atomic_path(folder / f"{name}.safetensors", overwrite) as tmp:
        shutil.copyfile(model_file, tmp)
    write_text_atomic(folder / f"{name}.md", _card(name, metadata, card_file.read_text(encoding="utf-8")
                                                   if card_file.is_file() else ""), overwrite)
    write_text_atomic(folder / f"{name}.json", json.dumps(metadata, indent=2) + "\n", overwrite)
    return _entry(folder, name)


def remove_model(name: str, folder: Optional[os.PathLike] = None) -> None:
    """Delete a registered model's three files; ``InputError`` if no model has that name."""
    entry = get_model(check_name(name), folder)
    for suffix in _SUFFIXES:
        entry.path.with_suffix(suffix).unlink(missing_ok=True)
