"""Choosing a model's operating point on annotated scans, without changing its networks.

Three numbers of a model decide what the detector reports, besides its weights: stage 1's candidate threshold
(``Stage1Config.candidate_threshold``: a lower one proposes fainter regions), the weight of stage 2 against
stage 1 in a finding's probability (``Stage2Config.weight``, see ``detect.fuse_scores``) and the default
reporting threshold (``ModelConfig.threshold``). Training picks the weight and the threshold on its validation
cases (``Trainer.choose_threshold``); ``calibrate`` picks all three afresh on a data set of annotated scans
(real nodules, or lesions inserted by ``make-lesion-dataset``) and writes a copy of the model with them:

1. per scan, stage 1 runs once; its candidates are taken at each candidate threshold tried, with masses
   as ``Detector.detect`` finds them, and stage 2 scores them (``scan_scores``);
2. the (candidate threshold, stage weight) pair with the best CPM of the project's LUNA16 evaluator wins
   (ties: the higher candidate threshold, then the larger weight; ``choose_operating_point``);
3. the default threshold is the lowest probability with at most ``fp_per_scan`` false positives per scan on
   the same scans (``choose_threshold``).

The scans used here become part of the model's tuning: report a model's accuracy on other scans.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import check_writable, write_text_atomic
from .datasets import Dataset, Finding
from .detect import Detector, fuse_scores
from .errors import InputError
from .evaluate import Candidate, evaluate
from .preprocess import Prepared, prepare
from .volume import CTVolume

log = logging.getLogger(__name__)

#: Stage 2 weights (``Stage2Config.weight``) tried by training and by ``calibrate``.
STAGE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Stage 1 candidate thresholds ``calibrate`` tries by default.
CANDIDATE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


@dataclass
class ValidationScores:
    """Candidates of annotated scans: scan name, centre (LPS mm), stage 1 score, stage 2 probability."""

    scans: list[str]
    centers: np.ndarray
    stage1: np.ndarray
    stage2: np.ndarray

    def candidates(self, weight: float | None) -> list[Candidate]:
        """As evaluation candidates scored by stage 1 alone (``None``) or ``fuse_scores`` with ``weight``."""
        p = self.stage1 if weight is None else fuse_scores(self.stage1, self.stage2, weight)
        return [Candidate(s, tuple(map(float, xyz)), float(v)) for s, xyz, v in zip(self.scans, self.centers, p)]

    @classmethod
    def concat(cls, parts: Sequence[ValidationScores]) -> ValidationScores:
        """One table of several scans' scores."""
        return cls([s for p in parts for s in p.scans],
                   np.concatenate([p.centers for p in parts]) if parts else np.zeros((0, 3)),
                   np.concatenate([p.stage1 for p in parts]) if parts else np.zeros(0, np.float32),
                   np.concatenate([p.stage2 for p in parts]) if parts else np.zeros(0, np.float32))


def scan_scores(detector: Detector, name: str, volume: CTVolume, prep: Prepared, thresholds: Sequence[float],
                use_stage2: bool = True, with_masses: bool = False) -> dict[float, ValidationScores]:
    """One scan's candidates and scores at each stage 1 candidate threshold (stage 1 runs once).

    ``volume``: the scan in HU; ``prep``: ``preprocess.prepare`` of it at the model's spacing. Stage 2
    probabilities are zeros unless ``use_stage2``. ``with_masses``: add the masses ``Detector.detect`` would
    report (scored 1 by both stages) and drop the candidates centred in them, as ``detect`` does.
    """
    prob = detector.probability_map(prep.image)
    out = {}
    for t in thresholds:
        p = prob.copy() if with_masses else prob  # ``Detector.masses`` writes into its map
        cands, regions = detector.candidates(p, prep.lung, prep.geometry, threshold=t)
        masses = detector.masses(prep, p, regions) if with_masses else []
        cands = detector.outside_masses(cands, masses, regions, prep.geometry)
        xyz = np.array([c.center_lps for c in cands]).reshape(-1, 3)
        s2 = detector.classify(volume, xyz) if use_stage2 else np.zeros(len(cands), np.float32)
        out[t] = ValidationScores(
            [name] * (len(cands) + len(masses)),
            np.concatenate([xyz, np.array([m.center_lps for m in masses]).reshape(-1, 3)]),
            np.asarray([c.score for c in cands] + [1.0] * len(masses), np.float32),
            np.concatenate([s2, np.ones(len(masses), np.float32)]),
        )
    return out


def choose_threshold(findings: Sequence[Finding], candidates: Sequence[Candidate], scans: Sequence[str],
                     fp_per_scan: float, bounds: tuple[float, float] = (0.3, 0.98)) -> float:
    """Lowest probability threshold whose false positives per scan stay ≤ ``fp_per_scan`` (clipped)."""
    result = evaluate(findings, candidates, scans, n_bootstrap=0)
    fps = np.sort(result.matching.fp_probability)[::-1]
    allowed = int(np.floor(fp_per_scan * len(scans)))
    t = float(np.nextafter(fps[allowed], 1.0)) if len(fps) > allowed else bounds[0]
    return float(np.clip(t, *bounds))


@dataclass
class OperatingPoint:
    """What ``choose_operating_point`` chose, and the CPM of every pair it tried (``grid[(t, w)]``)."""

    candidate_threshold: float
    weight: float
    threshold: float
    cpm: float
    grid: dict[tuple[float, float], float]


def choose_operating_point(findings: Sequence[Finding], scores: dict[float, ValidationScores], scans: Sequence[str],
                           fp_per_scan: float, weights: Sequence[float] = STAGE_WEIGHTS) -> OperatingPoint:
    """The (candidate threshold, stage weight) pair of best CPM, then the default threshold for it.

    ``scores``: candidates per candidate threshold (``scan_scores``, all scans). Ties go to the higher
    candidate threshold (fewer candidates), then to the larger stage 2 weight.
    """
    grid = {(t, w): evaluate(findings, s.candidates(w), scans, n_bootstrap=0).cpm
            for t, s in scores.items() for w in weights}
    t, w = max(grid, key=lambda tw: (round(grid[tw], 6), tw[0], tw[1]))
    threshold = choose_threshold(findings, scores[t].candidates(w), scans, fp_per_scan)
    log.info("CPM by (candidate threshold, stage 2 weight): %s; chosen (%g, %g), threshold %.3f",
             ", ".join(f"({a:g}, {b:g}): {v:.3f}" for (a, b), v in grid.items()), t, w, threshold)
    return OperatingPoint(float(t), float(w), threshold, grid[(t, w)], grid)


def calibrate(dataset: str | os.PathLike, outdir: str | os.PathLike, model: str | os.PathLike | None = None,
              scans: Sequence[str] | None = None, candidate_thresholds: Sequence[float] | None = None,
              weights: Sequence[float] | None = None, fp_per_scan: float = 0.5, device: str = "auto",
              overwrite: bool = False, progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Choose ``model``'s operating point on the annotated scans of ``dataset`` (see the module docs).

    ``dataset``: a LUNA16 or shared-layout folder (``datasets``); ``scans`` restricts it. The pairs tried are
    ``candidate_thresholds`` (default ``CANDIDATE_THRESHOLDS``) × ``weights`` (default ``STAGE_WEIGHTS``). Writes
    ``model.safetensors`` (the model with the chosen candidate threshold, stage weight and threshold, and a
    ``calibration`` entry in its card), ``calibration.json`` and ``calibration.md`` into ``outdir``; returns
    their paths. ``progress(scan name, fraction done)``.
    """
    from .io import read_ct

    candidate_thresholds = CANDIDATE_THRESHOLDS if candidate_thresholds is None else candidate_thresholds
    weights = STAGE_WEIGHTS if weights is None else weights
    if not candidate_thresholds or not weights:
        raise InputError("give at least one candidate threshold and one stage 2 weight")
    for t in list(candidate_thresholds) + list(weights):
        if not 0.0 <= float(t) <= 1.0:
            raise InputError(f"candidate thresholds and stage 2 weights must be between 0 and 1, got {t}")
    if fp_per_scan <= 0:
        raise InputError(f"--fp-per-scan must be positive, got {fp_per_scan}")
    ds = Dataset.open(dataset, list(scans) if scans is not None else None)
    if not any(s.annotations for s in ds.scans):
        raise InputError(f"no nodule annotation in the chosen scans of {ds.root}: nothing to calibrate on")
    outdir = Path(outdir)
    paths = {"model": outdir / "model.safetensors", "json": outdir / "calibration.json",
             "md": outdir / "calibration.md"}
    for p in paths.values():
        check_writable(p, overwrite)
    detector = Detector.load(model, device)
    cfg = detector.config
    thresholds = sorted({float(t) for t in candidate_thresholds})
    t0 = time.perf_counter()
    parts: dict[float, list[ValidationScores]] = {t: [] for t in thresholds}
    for n, scan in enumerate(ds.scans):
        if progress is not None:
            progress(scan.name, n / len(ds.scans))
        volume = read_ct(scan.path, series_uid=scan.seriesuid if scan.path.is_dir() else None)
        prep = prepare(volume, cfg.stage1.spacing_mm, cfg.hu_window)
        for t, s in scan_scores(detector, scan.seriesuid, volume, prep, thresholds, with_masses=True).items():
            parts[t].append(s)
    if progress is not None:
        progress("done", 1.0)
    scores = {t: ValidationScores.concat(p) for t, p in parts.items()}
    before = {"candidate_threshold": cfg.stage1.candidate_threshold, "stage2_weight": cfg.stage2.weight,
              "threshold": cfg.threshold}
    point = choose_operating_point(ds.findings(), scores, ds.seriesuids, fp_per_scan, sorted(set(map(float, weights))))
    cfg.stage1.candidate_threshold, cfg.stage2.weight, cfg.threshold = point.candidate_threshold, point.weight, \
        point.threshold
    record = {
        "dataset": str(ds.root), "scans": len(ds.scans),
        "nodules": sum(1 for f in ds.findings() if f.status == "nodule"),
        "model": str(model) if model else "shipped", "fp_per_scan": fp_per_scan, "before": before,
        "chosen": {"candidate_threshold": point.candidate_threshold, "stage2_weight": point.weight,
                   "threshold": point.threshold, "cpm": point.cpm},
        "cpm_by_candidate_threshold_and_weight": {
            f"{t:g}": {f"{w:g}": v for (tt, w), v in point.grid.items() if tt == t} for t in thresholds},
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    cfg.card = {**cfg.card, "calibration": record}
    outdir.mkdir(parents=True, exist_ok=True)
    detector.model.save(paths["model"], overwrite=overwrite)
    write_text_atomic(paths["json"], json.dumps(record, indent=2) + "\n", overwrite)
    write_text_atomic(paths["md"], calibration_markdown(record), overwrite)
    return paths


def calibration_markdown(record: dict) -> str:
    """A calibration record (``calibrate``) as a short Markdown report."""
    grid = record["cpm_by_candidate_threshold_and_weight"]
    weights = list(next(iter(grid.values())))
    chosen = record["chosen"]
    lines = [
        f"# Calibration on {record['dataset']}", "",
        f"Model: {record['model']}; {record['scans']} scans, {record['nodules']} nodules; {record['seconds']:.0f} s.",
        "", "CPM by stage 1 candidate threshold (rows) and stage 2 weight (columns):", "",
        "| candidate threshold | " + " | ".join(f"w = {w}" for w in weights) + " |",
        "|---|" + "---|" * len(weights),
    ]
    for t, row in grid.items():
        cells = [f"**{v:.3f}**" if (float(t), float(w)) == (chosen["candidate_threshold"], chosen["stage2_weight"])
                 else f"{v:.3f}" for w, v in row.items()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    before = record["before"]
    lines += [
        "", f"Chosen: candidate threshold {chosen['candidate_threshold']:g} (was {before['candidate_threshold']:g}), "
        f"stage 2 weight {chosen['stage2_weight']:g} (was {before['stage2_weight']:g}), default threshold "
        f"{chosen['threshold']:.3f} (was {before['threshold']:.3f}; the lowest with at most {record['fp_per_scan']:g} "
        "false positives per scan here). These scans tuned the model: measure its accuracy on others.", "",
    ]
    return "\n".join(lines)
