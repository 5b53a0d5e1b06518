"""Run ``nodule-detection train`` in a separate process and follow it, so that Slicer's GUI never waits on it.

The child is the project's own training command, started with a Python interpreter that has torch::

    [python, -m, NoduleDetectionLib.cli, train, CONFIG.json, -o, OUTDIR, --device, DEVICE] (+ --resume)

``python`` is ``PythonSlicer`` inside Slicer (the launcher that sets up Slicer's Python environment; it is on the
``PATH`` of Slicer's own process, as SlicerMONAIAuto3DSeg relies on) and ``sys.executable`` elsewhere (plain
Python, tests). ``NoduleDetectionLib``'s parent folder is put first on the child's ``PYTHONPATH``, so the child
runs the same code as the module even where the extension's folder is not on Slicer's default path.

Progress comes from ``OUTDIR/train_log.jsonl`` (one JSON record per line, see ``registry.read_log_records``),
read incrementally by ``poll()``; the child's console output goes to a text file (no pipe that could fill
up and block it), read incrementally by ``read_console()``. A GUI calls both from a timer.

Stop: on Linux and macOS, SIGINT first (Python raises ``KeyboardInterrupt`` in the child, so the training
command can finish its step and keep its checkpoint), then SIGKILL if it has not ended after ``timeout``
seconds; on Windows, ``TerminateProcess``. The last ``OUTDIR/checkpoint.pt`` written by the training is kept;
``resume=True`` (``--resume``) continues from it.

No Qt and no ``slicer`` import here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import NoduleDetectionLib
from NoduleDetectionLib.atomic import write_text_atomic
from NoduleDetectionLib.errors import InputError
from NoduleDetectionLib.registry import TRAIN_LOG_FILE, read_log_records

#: Devices the training command accepts.
DEVICES = ("auto", "cpu", "cuda")
#: Console output file of a run, next to its output folder: ``<OUTDIR>.console.txt``.
CONSOLE_SUFFIX = ".console.txt"
#: Seconds a Stop waits for the child to end by itself before killing it.
STOP_TIMEOUT_S = 30.0


def python_executable() -> str:
    """The interpreter for the child: ``PythonSlicer`` when it is on the ``PATH`` (inside Slicer), else
    ``sys.executable``."""
    return shutil.which("PythonSlicer") or sys.executable


def training_config(
    train: Sequence[dict],
    validation: Sequence[dict] = (),
    init_model: Optional[str] = None,
    model: Optional[dict] = None,
    stage1: Optional[dict] = None,
    stage2: Optional[dict] = None,
    patch1: Optional[int] = None,
    time_budget_minutes: Optional[float] = None,
    validate_every: Optional[int] = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """A CONFIG.json for ``nodule-detection train`` (see its schema in the training command's docs).

    Args:
        train, validation: SOURCE dicts ``{"path": data set folder, "scans": [names] | None,
            "insert": None | {"lesions_per_scan", "copies", "seed"}}`` (see ``source``).
        init_model: model file to fine-tune (``None``: train from scratch).
        model: ``ModelConfig`` fields for a model trained from scratch (``None``: the defaults).
        stage1, stage2: ``{"steps", "batch", "lr"}`` (missing keys: the command's defaults).
        patch1: stage 1 patch edge (working-grid voxels). time_budget_minutes: stop after this long.
        validate_every: steps between validation runs. seed: random seed.
        options: other settings of the command, written as given (e.g. ``augment=False``, ``patience=4``).

    Only the given settings are written; the training command fills in its defaults for the rest.
    """
    if not train:
        raise InputError("no training data: give at least one data set folder")
    config: dict[str, Any] = {"seed": int(seed), "init_model": init_model, "train": list(train),
                              "validation": list(validation)}
    optional = {"model": model, "stage1": stage1, "stage2": stage2, "patch1": patch1,
                "time_budget_minutes": time_budget_minutes, "validate_every": validate_every}
    config.update({key: value for key, value in optional.items() if value is not None})
    config.update(options)
    return config


def source(path: str | os.PathLike, scans: Optional[Sequence[str]] = None,
           insert: Optional[dict] = None) -> dict[str, Any]:
    """A SOURCE entry of the config: a data set folder (LUNA16 layout, shared layout, or unannotated scans),
    optionally some of its scans and lesion insertion ``{"lesions_per_scan", "copies", "seed"}``."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"data set folder {path} does not exist")
    return {"path": str(path.resolve()), "scans": list(scans) if scans else None, "insert": insert}


def write_config(config: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``config`` as JSON (atomically; ``OutputError`` if it exists and ``overwrite`` is false)."""
    return write_text_atomic(path, json.dumps(config, indent=2) + "\n", overwrite)


class TrainingProcess:
    """One ``nodule-detection train`` child process, followed through its log.

    Example::

        run = TrainingProcess("run/config.json", "run/output", device="cpu").start()
        while run.running:            # in Slicer: from a qt.QTimer, never a blocking loop
            for record in run.poll():
                print(record["stage"], record["step"], record["steps"], record["loss"])
            print(run.read_console(), end="")
        run.returncode                # 0: OUTDIR/model.safetensors was written
    """

    def __init__(self, config: str | os.PathLike, outdir: str | os.PathLike, device: str = "auto",
                 resume: bool = False, python: Optional[str] = None) -> None:
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
        self.config = Path(config)
        self.outdir = Path(outdir)
        self.console = self.outdir.with_name(self.outdir.name + CONSOLE_SUFFIX)
        self.command = [python or python_executable(), "-m", "NoduleDetectionLib.cli", "train", str(self.config),
                        "-o", str(self.outdir), "--device", device] + (["--resume"] if resume else [])
        self.records: list[dict] = []
        self._popen: Optional[subprocess.Popen] = None
        self._log_offset = 0
        self._console_offset = 0
        self.stop_requested = False

    def start(self) -> TrainingProcess:
        """Start the child (console output appended to ``<OUTDIR>.console.txt``); returns ``self``."""
        if not self.config.is_file():
            raise InputError(f"training configuration {self.config} does not exist")
        self.console.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        core_parent = str(Path(NoduleDetectionLib.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (core_parent, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self._console_offset = self.console.stat().st_size if self.console.exists() else 0
        with self.console.open("ab") as console:
            console.write(("$ " + " ".join(self.command) + "\n").encode())
            console.flush()
            self._popen = subprocess.Popen(self.command, stdout=console, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env)
        return self

    @property
    def running(self) -> bool:
        """True while the child runs."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The child's exit status (``None`` while it runs or before ``start``)."""
        return self._popen.poll() if self._popen is not None else None

    def poll(self) -> list[dict]:
        """The log records written since the last call (also appended to ``records``)."""
        new, self._log_offset = read_log_records(self.outdir / TRAIN_LOG_FILE, self._log_offset)
        self.records += new
        return new

    def read_console(self) -> str:
        """The child's console output written since the last call."""
        try:
            with self.console.open("rb") as f:
                f.seek(self._console_offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._console_offset += len(data)
        return data.decode("utf-8", errors="replace")

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the child ends (or ``timeout`` s pass); return its exit status (``None``: still running)."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self) -> None:
        """Ask the child to end, without waiting: SIGINT (Windows: terminate). A GUI calls this, then
        ``kill()`` from its timer if the child is still running ``STOP_TIMEOUT_S`` later."""
        if self.running:
            self.stop_requested = True
            if sys.platform.startswith("win"):
                self._popen.terminate()
            else:
                self._popen.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """End the child at once (SIGKILL; the training cannot save anything more)."""
        if self.running:
            self._popen.kill()
            self._popen.wait()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> Optional[int]:
        """End the child and wait: ``interrupt()``, up to ``timeout`` s, then ``kill()``.

        Returns its exit status (130 after a clean interruption). The training's last checkpoint stays in
        OUTDIR for ``resume``.
        """
        self.interrupt()
        if self.wait(timeout) is None:
            self.kill()
        return self.returncode
