"""File-to-file detection: read a CT, run the detector, write every output. What ``detect`` runs."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .detect import DetectionResult, Detector
from .errors import OutputError
from .io import read_ct
from .volume import CTVolume
from .writers import output_paths, write_outputs

log = logging.getLogger(__name__)


class TqdmProgress:
    """A ``progress(stage, fraction)`` callback that draws one tqdm bar per stage on stderr."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar: tqdm | None = None
        self.stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=stage, unit="%", leave=False, disable=self.disable)
        if self.bar is not None:
            self.bar.n = int(round(100 * fraction))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def progress_bar(desc: str, disable: bool = False) -> Iterator[Callable[[str, float], None]]:
    """A ``progress(name, fraction)`` callback drawing one tqdm bar, made at its first call (so that a refused input
    prints no bar) and closed on leaving."""
    bars: list[tqdm] = []

    def progress(name: str, fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=100, desc=desc, unit="%", disable=disable))
        bars[0].update(round(100 * fraction) - bars[0].n)
        bars[0].set_postfix_str(name)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def detect_to_files(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    threshold: float | None = None,
    device: str = "auto",
    series_uid: str | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    detector: Detector | None = None,
) -> dict[str, Path]:
    """Detect nodules in one CT and write ``<name>.mrk.json``, ``.seg.nrrd``, ``.csv``, ``.json``, ``_nodules.png``.

    Args:
        input_path: DICOM folder or image file.
        outdir: output folder (created).
        model: model file (``None``: the shipped model); ignored when ``detector`` is given.
        threshold: reporting threshold (default: the model's).
        device: ``auto``, ``cpu`` or ``cuda``.
        series_uid: the series to read when a DICOM folder holds several.
        overwrite: replace existing outputs; otherwise an existing output is an error, checked before
            any work is done.
        show_progress: draw tqdm progress bars on stderr.
        detector: an already loaded detector (cohorts load the model once).

    Returns:
        Output kind → path.
    """
    t0 = time.perf_counter()
    volume = read_ct(input_path, series_uid=series_uid)
    read_s = time.perf_counter() - t0
    if not overwrite:
        check_outputs_free(outdir, volume.name)
    detector = detector or Detector.load(model, device=device)
    paths, _ = detect_volume_to_files(volume, outdir, detector, threshold=threshold, overwrite=overwrite,
                                      show_progress=show_progress, read_s=read_s)
    return paths


def check_outputs_free(outdir: str | os.PathLike, name: str) -> None:
    """Raise ``OutputError`` if any output of scan ``name`` already exists in ``outdir``."""
    for path in output_paths(outdir, name).values():
        if path.exists():
            raise OutputError(f"{path} already exists; use --overwrite to replace it")


def detect_volume_to_files(
    volume: CTVolume,
    outdir: str | os.PathLike,
    detector: Detector,
    threshold: float | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    read_s: float = 0.0,
) -> tuple[dict[str, Path], DetectionResult]:
    """Detect nodules in an already read CT and write its five outputs (as ``detect_to_files``).

    ``read_s`` (seconds the caller spent reading ``volume``) is recorded as ``timings["read"]``; the
    result's ``timings`` also get ``"write"``, and one log line lists every stage's wall time in seconds
    (``<name>: timings read=… preprocess=… stage1=… masses=… stage2=… postprocess=… write=… s``), which the
    benchmark reads.

    Returns:
        ``(output kind → path, the detection result)``.
    """
    progress = TqdmProgress(disable=not show_progress)
    try:
        result = detector.detect(volume, threshold=threshold, progress=progress)
    finally:
        progress.close()
    result.timings = {"read": read_s, **result.timings}
    for warning in result.warnings:
        log.warning("%s: %s", volume.name, warning)
    log.info("%s: %d finding(s) at probability >= %.2f", volume.name, len(result.nodules), result.threshold)
    t0 = time.perf_counter()
    paths = write_outputs(result, volume, outdir, overwrite=overwrite)
    result.timings["write"] = time.perf_counter() - t0
    log.info("%s: timings %s s", volume.name, " ".join(f"{k}={v:.3f}" for k, v in result.timings.items()))
    return paths, result
