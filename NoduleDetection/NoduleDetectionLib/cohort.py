"""Cohorts: ``detect`` over many scans with one model load, resumable, shardable under ``torchrun``.

What counts as a cohort (``cohort_scans``):

* several inputs on the command line, each one scan (image file or DICOM folder);
* a ``.txt`` list: one scan path per line (relative paths are relative to the list's folder; blank lines and
  lines starting with ``#`` are skipped);
* a **cohort folder**: a folder that directly holds image files (``.nrrd``, ``.nhdr``, ``.nii``,
  ``.nii.gz``, ``.mha``, ``.mhd``) or holds nothing but subfolders. Each image file and each subfolder (a
  DICOM series, read recursively) is one scan; other files (``.raw`` beside ``.mhd``, CSV, README) are
  ignored. A folder with any other file directly inside (DICOM slices) is one DICOM series, not a cohort.

Outputs, all in ``OUTDIR``: each scan's five files (``<name>.mrk.json``, ``.seg.nrrd``, ``.csv``, ``.json``,
``_nodules.png``, as ``detect`` on one scan writes them), its status ``status/<name>.json`` (``running``,
``done`` or ``failed`` with a one-line reason; written atomically, ``done`` only after all five outputs),
and the cohort summaries ``cohort_candidates.csv`` (every scan's findings in one LUNA16-style file, world
LPS mm, the columns of ``<name>.csv``) and ``cohort_status.csv`` (one row per scan).

Resuming: running the same command again skips scans whose status is ``done`` for the same model and
threshold and whose outputs are all there; scans left ``running`` by an interruption are redone (their
partial outputs are replaced); failed scans are retried. Running with another model or threshold into the
same folder runs every scan again and needs ``--overwrite`` to replace their outputs.

Several processes or machines: under ``torchrun`` (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment) rank ``r`` of ``w`` takes scans ``r, r + w, r + 2w, ...`` of the cohort, writes their outputs
and statuses, waits for the others (a gloo barrier) and rank 0 writes the summaries. Across machines
``OUTDIR`` must be a folder all ranks share (network file system); each rank reads its own scans.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from .atomic import write_text_atomic
from .detect import Detector
from .errors import InputError, NoduleDetectionError
from .io import READ_SUFFIXES, read_ct
from .models import tensor_checksum
from .pipeline import check_outputs_free, detect_volume_to_files
from .volume import CTVolume
from .writers import CSV_COLUMNS, output_paths

log = logging.getLogger(__name__)

STATUS_DIR = "status"
CANDIDATES_FILE = "cohort_candidates.csv"
STATUS_FILE = "cohort_status.csv"
STATUS_COLUMNS = ("scan", "input", "status", "reason", "findings", "seconds", "rank")
#: How long rank 0 waits for the slowest rank before giving up (a cohort can take days).
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class ScanStatus:
    """What happened to one scan of a cohort (stored as ``OUTDIR/status/<scan>.json``).

    Attributes:
        scan: the scan's name (its outputs are ``<scan>.*``).
        input: the path it was read from.
        status: ``running``, ``done``, ``failed`` or ``missing`` (no status: not run yet, or run on a
            machine whose ``OUTDIR`` this one does not see).
        reason: one line saying why it failed (empty otherwise).
        findings: number of findings written (``done`` only).
        seconds: wall time of the scan (read, detection, writing).
        rank: the process (``torchrun`` rank) that ran it.
        model_sha256: checksum of the model's weights, and ``threshold`` the probability threshold used:
            a finished scan is skipped on resume only when both match.
        timings_s: seconds per stage (read, preprocess, stage1, blobs, masses, stage2, postprocess, write).
    """

    scan: str
    input: str
    status: str
    reason: str = ""
    findings: int = 0
    seconds: float = 0.0
    rank: int = 0
    model_sha256: str = ""
    threshold: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class CohortResult:
    """The statuses of all scans (cohort order) and the summary files (written on rank 0 only)."""

    statuses: list[ScanStatus]
    paths: dict[str, Path]

    @property
    def failed(self) -> list[ScanStatus]:
        """Scans that failed or have no status."""
        return [s for s in self.statuses if s.status != "done"]


def scan_name(path: str | os.PathLike) -> str:
    """The name ``read_ct`` gives a scan: the file name without its image suffix, or the folder name."""
    path = Path(path)
    lower = path.name.lower()
    for suffix in READ_SUFFIXES:
        if lower.endswith(suffix) and not path.is_dir():
            return path.name[: -len(suffix)]
    return path.name


def is_cohort_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding image files directly, or only subfolders (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    files = [e for e in entries if e.is_file()]
    if any(e.name.lower().endswith(READ_SUFFIXES) for e in files):
        return True
    return not files and any(e.is_dir() for e in entries)


def is_cohort(inputs: Sequence[str | os.PathLike]) -> bool:
    """Whether ``detect``'s inputs form a cohort: several inputs, a ``.txt`` list or a cohort folder."""
    if len(inputs) != 1:
        return True
    path = Path(inputs[0])
    return (path.is_file() and path.suffix.lower() == ".txt") or is_cohort_folder(path)


def cohort_scans(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand ``detect``'s inputs (scans, ``.txt`` lists, cohort folders) into the cohort's scans, in order.

    A listed scan that does not exist is kept (it fails alone, with its reason, when the cohort runs).

    Raises:
        InputError: an input does not exist, a list is empty, or two scans have the same name (their
            outputs would collide).
    """
    scans: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise InputError(f"{item} does not exist")
        if item.is_file() and item.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in item.read_text(encoding="utf-8-sig").splitlines()]
            listed = [item.parent / ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise InputError(f"scan list {item} lists no scan")
            scans += listed
        elif is_cohort_folder(item):
            scans += sorted(
                e for e in item.iterdir()
                if not e.name.startswith(".") and (e.is_dir() or e.name.lower().endswith(READ_SUFFIXES))
            )
        else:
            scans.append(item)
    seen: dict[str, Path] = {}
    for scan in scans:
        other = seen.setdefault(scan_name(scan), scan)
        if other != scan:
            raise InputError(f"two scans are named {scan_name(scan)!r} ({other} and {scan}): outputs would collide")
    if not scans:
        raise InputError("no scan to process")
    return scans


def _status_path(outdir: Path, name: str) -> Path:
    return outdir / STATUS_DIR / f"{name}.json"


def read_status(outdir: str | os.PathLike, name: str) -> ScanStatus | None:
    """The stored status of scan ``name`` in ``outdir``, or ``None`` if it has none (or it is unreadable)."""
    path = _status_path(Path(outdir), name)
    try:
        return ScanStatus(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_status(outdir: Path, status: ScanStatus) -> None:
    write_text_atomic(_status_path(outdir, status.scan), json.dumps(asdict(status), indent=2) + "\n",
                      overwrite=True)


def _finished(outdir: Path, status: ScanStatus | None, model_sha256: str, threshold: float) -> bool:
    return (
        status is not None and status.status == "done" and status.model_sha256 == model_sha256
        and abs(status.threshold - threshold) < 1e-12
        and all(p.exists() for p in output_paths(outdir, status.scan).values())
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, NoduleDetectionError) else f"{type(exc).__name__}: {message}"


def _timed_read(path: Path) -> tuple[CTVolume, float]:
    t0 = time.perf_counter()
    volume = read_ct(path)
    return volume, time.perf_counter() - t0


def distributed_context() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from ``torchrun``'s environment; ``(0, 1, 0)`` outside it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def detect_cohort(
    inputs: Sequence[str | os.PathLike],
    outdir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    threshold: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = False,
    detector: Detector | None = None,
) -> CohortResult:
    """Run detection over a cohort (see the module docstring), loading the model once.

    While one scan is detected the next is read in a background thread. Scans already finished in
    ``outdir`` (same model and threshold) are skipped. A scan that fails gets status ``failed`` with a
    one-line reason and the cohort goes on.

    Args:
        inputs: scans, ``.txt`` lists and cohort folders.
        outdir: output folder (created); every scan's outputs, ``status/``, and the summaries.
        model: model file (``None``: the shipped model); ignored when ``detector`` is given.
        threshold: reporting threshold (default: the model's).
        device: ``auto``, ``cpu`` or ``cuda``; under ``torchrun`` each rank uses GPU ``LOCAL_RANK``.
        overwrite: replace outputs of unfinished scans that exist in ``outdir`` without a status of this
            cohort; without it such a scan fails, naming the file.
        show_progress: draw per-stage progress bars (rank 0 only).
        detector: an already loaded detector.

    Returns:
        ``CohortResult``: every scan's status (from all ranks on rank 0; this rank's scans on the others)
        and, on rank 0, the paths of ``cohort_candidates.csv`` and ``cohort_status.csv``.
    """
    import torch

    scans = cohort_scans(inputs)
    outdir = Path(outdir)
    (outdir / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    rank, world, local_rank = distributed_context()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
    try:
        mine = scans[rank::world]
        log.info("cohort of %d scan(s) into %s; this process (rank %d of %d) runs %d", len(scans), outdir,
                 rank, world, len(mine))
        detector = detector or Detector.load(model, device=device)
        used_threshold = detector.threshold if threshold is None else float(threshold)
        sha = tensor_checksum(detector.model.state_tensors())
        statuses = _run_scans(mine, outdir, detector, used_threshold, sha, overwrite,
                              show_progress and rank == 0, rank)
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return CohortResult(statuses, {})
    return merge_cohort(scans, outdir)


def _run_scans(scans: list[Path], outdir: Path, detector: Detector, threshold: float, sha: str,
               overwrite: bool, show_progress: bool, rank: int) -> list[ScanStatus]:
    todo = []
    statuses: dict[str, ScanStatus] = {}
    for scan in scans:
        old = read_status(outdir, scan_name(scan))
        if _finished(outdir, old, sha, threshold):
            statuses[old.scan] = old
        else:
            todo.append((scan, old))
    if len(todo) < len(scans):
        log.info("rank %d: %d scan(s) already finished, %d to run", rank, len(scans) - len(todo), len(todo))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        ahead: Future | None = pool.submit(_timed_read, todo[0][0]) if todo else None
        for n, (scan, old) in enumerate(todo):
            current, ahead = ahead, (pool.submit(_timed_read, todo[n + 1][0]) if n + 1 < len(todo) else None)
            name = scan_name(scan)
            # Outputs left by an interrupted run of this cohort are ours to replace.
            replace = overwrite or (old is not None and old.status == "running")
            status = ScanStatus(name, str(scan), "running", rank=rank, model_sha256=sha, threshold=threshold)
            _write_status(outdir, status)
            t0 = time.perf_counter()
            try:
                volume, read_s = current.result()
                if volume.name != name:  # read_ct names files and folders as scan_name does
                    raise InputError(f"{scan}: read as {volume.name!r}, expected {name!r}")
                if not replace:
                    check_outputs_free(outdir, name)
                _, result = detect_volume_to_files(volume, outdir, detector, threshold=threshold, overwrite=replace,
                                                   show_progress=show_progress, read_s=read_s)
                del volume
                status.status, status.findings, status.timings_s = "done", len(result.nodules), result.timings
                status.seconds = time.perf_counter() - t0 + read_s
            except Exception as exc:  # one bad scan must not stop the cohort: record it and go on
                log.debug("%s failed", scan, exc_info=True)
                status.status, status.reason = "failed", _one_line(exc)
                status.seconds = time.perf_counter() - t0
            _write_status(outdir, status)
            statuses[name] = status
            log.info("[%d/%d] %s: %s%s (%.1f s)", n + 1, len(todo), name, status.status,
                     f": {status.reason}" if status.reason else f", {status.findings} finding(s)", status.seconds)
    return [statuses[scan_name(s)] for s in scans]


def merge_cohort(scans: Sequence[str | os.PathLike], outdir: str | os.PathLike) -> CohortResult:
    """Write ``cohort_status.csv`` and ``cohort_candidates.csv`` from the per-scan statuses and CSVs.

    Scans are listed in cohort order; a scan without a status is ``missing``. The candidates file holds
    the rows of every ``done`` scan's ``<name>.csv`` (world LPS mm), under the same header.
    """
    outdir = Path(outdir)
    statuses = []
    header: list[str] | None = None
    rows: list[list[str]] = []
    for scan in scans:
        name = scan_name(scan)
        status = read_status(outdir, name) or ScanStatus(name, str(scan), "missing", "no status in this folder")
        statuses.append(status)
        if status.status != "done":
            continue
        with output_paths(outdir, name)["csv"].open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows += list(reader)
    header = header or list(CSV_COLUMNS)
    paths = {"candidates": outdir / CANDIDATES_FILE, "status": outdir / STATUS_FILE}
    write_text_atomic(paths["candidates"], _csv_text([header, *rows]), overwrite=True)
    write_text_atomic(paths["status"], _csv_text([list(STATUS_COLUMNS)] + [
        [s.scan, s.input, s.status, s.reason, s.findings, f"{s.seconds:.2f}", s.rank] for s in statuses
    ]), overwrite=True)
    return CohortResult(statuses, paths)


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
