"""LUNA16 FROC evaluation of nodule candidates, with the arithmetic of the official script.

The protocol is that of ``noduleCADEvaluationLUNA16.py`` (LUNA16 challenge, Setio et al. 2017), written
anew here with numpy only:

* **Matching** (world LPS mm): a candidate hits a finding when its squared distance to the finding's
  centre is below the squared radius, radius = diameter / 2; a finding with a negative diameter
  (``-1`` in annotations_excluded.csv) gets the script's default diameter of 10 mm. Each nodule counts
  once, with the highest probability among the candidates that hit it (a candidate may hit two
  overlapping nodules); further hits are ignored (double detections). Candidates on an excluded finding
  or a mass and on no nodule are ignored: neither hits nor false positives. Every other candidate is a
  false positive. A nodule without a hit stays in the denominator.
* **Curve**: the ROC points of (hits + false positives) over all distinct probability thresholds,
  highest first, starting at (0, 0) (as ``sklearn.metrics.roc_curve``); FP/scan = false positives above
  the threshold / number of listed scans (every listed scan counts, also one with no nodule and no
  candidate); sensitivity = hits above the threshold / all nodules, computed with the script's float
  operations ``fpr * (candidates - detected) / scans`` and ``tpr * detected / nodules`` (see ``_scaled``).
* **Operating points**: sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan by linear interpolation of
  that curve (``numpy.interp``); CPM = their mean.
* **Groups**: per size class and, where the annotation table has ``texture``, ``position`` or ``shape``
  columns (inserted lesions), per value of each: nodules, how many any candidate hit (``sensitivity``: the
  fraction at the lowest threshold), and the group's own FROC read off the same FP/scan axis: all false
  positives of all scans against the group's nodules only (``sensitivity_at_1fp`` at 1 FP/scan, ``cpm``).
* **Confidence intervals**: bootstrap over scans (sample the listed scans with replacement, the FP
  divisor stays the number of listed scans), each sample's curve interpolated the same way; bounds =
  the sorted samples at ``floor(0.025 n)`` and ``floor(0.975 n)`` (the script's ``compute_mean_ci``).

Deliberate differences: where no nodule is hit the script's ``tpr`` is 0/0 (NaN); here sensitivity is
0. A bootstrap sample without any nodule has no sensitivity; it is left out of the intervals (the
script would sort NaNs into them). Candidates of scans that are not listed are ignored, as the script
does, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_path, check_writable, write_text_atomic
from .datasets import Dataset, Finding, number, read_findings, read_scan_list, read_table
from .errors import InputError

log = logging.getLogger("nodule_detection.evaluate")

#: False positives per scan at which LUNA16 reads the sensitivity; CPM is the mean over them.
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Diameter the official script gives a finding whose diameter is negative (no size known), mm.
DEFAULT_DIAMETER_MM = 10.0
#: Nodule size classes (mm, lower bound included): name, lower, upper.
SIZE_BINS = (("<3", 0.0, 3.0), ("3-6", 3.0, 6.0), ("6-10", 6.0, 10.0), ("10-20", 10.0, 20.0),
             ("20-30", 20.0, 30.0), (">30", 30.0, math.inf))
#: Annotation columns (``Finding.attributes``) by whose values sensitivity is also reported.
GROUP_COLUMNS = ("texture", "position", "shape")
_BOOTSTRAP_CHUNK = 64


@dataclass(frozen=True)
class Candidate:
    """A CAD mark: ``center_lps`` in world LPS mm, ``probability`` any finite score (higher = surer)."""

    seriesuid: str
    center_lps: tuple[float, float, float]
    probability: float


@dataclass(frozen=True)
class FindingScore:
    """A nodule or mass after matching: ``probability`` is the highest probability among the candidates
    that hit it (``None``: missed), ``hits`` how many candidates did."""

    finding: Finding
    probability: float | None
    hits: int

    @property
    def detected(self) -> bool:
        return self.probability is not None


@dataclass
class Matching:
    """Candidates matched to findings, per the official script.

    Attributes:
        scans: the listed seriesuids (FP/scan divides by ``len(scans)``).
        nodules: one entry per target nodule of a listed scan.
        masses: one entry per mass of a listed scan (neither hit nor FP; reported apart).
        fp_scan: index into ``scans`` of each false positive.
        fp_probability: probability of each false positive.
        n_candidates: candidates of listed scans.
        n_on_excluded: candidates ignored because they lie on an excluded finding (and on no nodule or mass).
        n_on_mass: candidates ignored because they lie on a mass (and on no nodule).
        n_double: hits beyond the first on a nodule (ignored double detections).
        n_unlisted: candidates of scans that are not listed (ignored).
    """

    scans: list[str]
    nodules: list[FindingScore]
    masses: list[FindingScore]
    fp_scan: np.ndarray
    fp_probability: np.ndarray
    n_candidates: int
    n_on_excluded: int
    n_on_mass: int
    n_double: int
    n_unlisted: int


@dataclass
class FROCCurve:
    """FROC points, one per distinct probability threshold (highest first), after a (0, 0) point.

    Attributes:
        fps: mean false positives per scan at or above each threshold.
        sensitivity: fraction of all nodules hit at or above each threshold.
        thresholds: the probability thresholds (``inf`` for the first point).
    """

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray

    def sensitivity_at(self, rates: Sequence[float] = FP_RATES) -> np.ndarray:
        """Sensitivity at each FP/scan rate, by linear interpolation between the points."""
        return np.interp(rates, self.fps, self.sensitivity)


@dataclass
class FROCResult:
    """A full evaluation: matching, curve, operating points, CPM and bootstrap intervals.

    ``ci95`` maps each rate key (``"0.125"`` .. ``"8"``) and ``"cpm"`` to ``(low, high)``; ``band`` is
    ``(fps grid, low, high)`` for the plot. Both are ``None`` without bootstrap.
    """

    matching: Matching
    curve: FROCCurve
    sensitivity: dict[str, float]
    cpm: float
    ci95: dict[str, tuple[float, float]] | None
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    n_bootstrap: int
    seed: int

    def to_dict(self) -> dict:
        """The content of ``froc.json``."""
        m = self.matching
        n_detected = sum(s.detected for s in m.nodules)
        return {
            "cpm": self.cpm,
            "sensitivity": self.sensitivity,
            "ci95": None if self.ci95 is None else {k: list(v) for k, v in self.ci95.items()},
            "bootstrap": {"samples": self.n_bootstrap, "seed": self.seed, "confidence": 0.95, "unit": "scan"},
            "counts": {
                "scans": len(m.scans),
                "nodules": len(m.nodules),
                "nodules_detected": n_detected,
                "nodules_missed": len(m.nodules) - n_detected,
                "candidates": m.n_candidates,
                "hits": n_detected,
                "false_positives": int(m.fp_probability.size),
                "ignored_on_excluded": m.n_on_excluded,
                "ignored_on_mass": m.n_on_mass,
                "ignored_double_detections": m.n_double,
                "ignored_unlisted_scan": m.n_unlisted,
                "masses": len(m.masses),
            },
            "max_sensitivity": n_detected / len(m.nodules),
            "fps_at_max_sensitivity": float(self.curve.fps[-1]),
            "sensitivity_by_size": sensitivity_by_size(m.nodules, m),
            **{f"sensitivity_by_{c}": sensitivity_by_attribute(m, c) for c in GROUP_COLUMNS
               if any(s.finding.attributes.get(c) for s in m.nodules)},
            **{f"detected_by_size_and_{c}": detected_by_size_and(m.nodules, c) for c in GROUP_COLUMNS
               if any(s.finding.attributes.get(c) for s in m.nodules)},
            "missed_nodules": [_finding_dict(s) for s in m.nodules if not s.detected],
            "masses": [_finding_dict(s) | {"detected": s.detected, "probability": s.probability}
                       for s in m.masses],
            "protocol": "LUNA16 (noduleCADEvaluationLUNA16.py): hit = distance < diameter/2 (10 mm "
                        "diameter where negative); FROC by linear interpolation; coordinates world LPS mm",
        }


def rate_key(rate: float) -> str:
    """``0.125`` → ``"0.125"``, ``1.0`` → ``"1"``: the keys of ``froc.json``."""
    return f"{rate:g}"


def match_radius_mm(diameter_mm: float) -> float:
    """Hit radius of a finding (mm): half its diameter, half of 10 mm where the diameter is negative."""
    return (DEFAULT_DIAMETER_MM if diameter_mm < 0.0 else diameter_mm) / 2.0


def read_candidates(path: str | os.PathLike) -> list[Candidate]:
    """Read a LUNA16 result file: ``seriesuid,coordX,coordY,coordZ,probability`` (world LPS mm; further
    columns are ignored). Raises ``InputError`` for a missing file or column or a non-numeric value."""
    path = Path(path)
    rows, _ = read_table(path, ("seriesuid", "coordX", "coordY", "coordZ", "probability"))
    return [Candidate(seriesuid=row["seriesuid"].strip(),
                      center_lps=tuple(number(row, c, path, line) for c in ("coordX", "coordY", "coordZ")),
                      probability=number(row, "probability", path, line))
            for line, row in rows]


def match(findings: Sequence[Finding], candidates: Sequence[Candidate], scans: Sequence[str]) -> Matching:
    """Match candidates to findings scan by scan (see the module docstring for the rules)."""
    scans = list(scans)
    if len(set(scans)) != len(scans):
        raise InputError("the scan list names a scan twice")
    index = {uid: i for i, uid in enumerate(scans)}
    by_scan: dict[str, list[Candidate]] = {}
    n_unlisted = 0
    for c in candidates:
        if c.seriesuid in index:
            by_scan.setdefault(c.seriesuid, []).append(c)
        else:
            n_unlisted += 1
    if n_unlisted:
        unlisted = sorted({c.seriesuid for c in candidates} - set(index))
        log.warning("ignoring %d candidate(s) of %d scan(s) not in the scan list (e.g. %s)",
                    n_unlisted, len(unlisted), unlisted[0])
    findings_of: dict[str, list[Finding]] = {}
    for f in findings:
        findings_of.setdefault(f.seriesuid, []).append(f)

    nodules: list[FindingScore] = []
    masses: list[FindingScore] = []
    fp_scan: list[np.ndarray] = []
    fp_prob: list[np.ndarray] = []
    n_on_excluded = n_on_mass = n_double = 0
    for i, uid in enumerate(scans):
        cands = by_scan.get(uid, [])
        points = np.array([c.center_lps for c in cands], dtype=float).reshape(-1, 3)
        probs = np.array([c.probability for c in cands], dtype=float)
        on = {"nodule": np.zeros(len(cands), bool), "mass": np.zeros(len(cands), bool),
              "excluded": np.zeros(len(cands), bool)}
        for f in findings_of.get(uid, []):
            d = points - np.asarray(f.center_lps, dtype=float)
            hit = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2] < match_radius_mm(f.diameter_mm) ** 2
            on[f.status] |= hit
            if f.status != "excluded":
                n_hits = int(hit.sum())
                score = FindingScore(f, float(probs[hit].max()) if n_hits else None, n_hits)
                (nodules if f.status == "nodule" else masses).append(score)
                if f.status == "nodule":
                    n_double += max(n_hits - 1, 0)
        n_on_mass += int((on["mass"] & ~on["nodule"]).sum())
        n_on_excluded += int((on["excluded"] & ~on["mass"] & ~on["nodule"]).sum())
        false_positive = ~(on["nodule"] | on["mass"] | on["excluded"])
        fp_prob.append(probs[false_positive])
        fp_scan.append(np.full(int(false_positive.sum()), i))
    return Matching(
        scans=scans, nodules=nodules, masses=masses,
        fp_scan=np.concatenate(fp_scan) if fp_scan else np.zeros(0, int),
        fp_probability=np.concatenate(fp_prob) if fp_prob else np.zeros(0),
        n_candidates=sum(len(v) for v in by_scan.values()),
        n_on_excluded=n_on_excluded, n_on_mass=n_on_mass, n_double=n_double, n_unlisted=n_unlisted,
    )


class _Entries:
    """The FROC list of a matching (hits and false positives with their scan), sorted by probability,
    highest first, with the last index of each run of equal probabilities (one curve point per run)."""

    def __init__(self, matching: Matching):
        scan_of = {uid: i for i, uid in enumerate(matching.scans)}
        hits = [s for s in matching.nodules if s.detected]
        probs = np.concatenate([[s.probability for s in hits], matching.fp_probability]).astype(float)
        self.is_hit = np.concatenate([np.ones(len(hits)), np.zeros(matching.fp_probability.size)])
        self.scan = np.concatenate([[scan_of[s.finding.seriesuid] for s in hits], matching.fp_scan]).astype(int)
        self.nodules_per_scan = np.bincount([scan_of[s.finding.seriesuid] for s in matching.nodules],
                                            minlength=len(matching.scans))
        self.n_scans = len(matching.scans)
        order = np.argsort(-probs, kind="stable")
        self.probs, self.is_hit, self.scan = probs[order], self.is_hit[order], self.scan[order]
        self.ends = np.append(np.flatnonzero(np.diff(self.probs)), self.probs.size - 1) if probs.size else \
            np.zeros(0, int)

    def curve(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative (false positives, hits) at each threshold; ``weights`` (samples x entries) counts
        each entry that many times (bootstrap). Shapes: (thresholds,) or (samples, thresholds)."""
        w = np.ones_like(self.is_hit) if weights is None else weights
        hits = np.cumsum(w * self.is_hit, axis=-1)[..., self.ends]
        fps = np.cumsum(w * (1.0 - self.is_hit), axis=-1)[..., self.ends]
        return fps, hits


def _scaled(cum_fp: np.ndarray, cum_hit: np.ndarray, n_scans: int, n_nodules: float) -> tuple[np.ndarray, np.ndarray]:
    """FP/scan and sensitivity from cumulative counts (a leading 0 added), with the script's float
    operations: ``(fp / n_fp) * n_fp / n_scans`` and ``(hit / n_hit) * n_hit / n_nodules``. The order
    matters: where a vertical step of the curve lies exactly on an FP rate (e.g. 111 FPs over 888
    scans at 1/8), its rounding decides which end of the step ``numpy.interp`` returns."""
    cum_fp, cum_hit = np.append(0.0, cum_fp), np.append(0.0, cum_hit)
    n_fp, n_hit = cum_fp[-1], cum_hit[-1]
    fps = np.zeros_like(cum_fp) if n_fp == 0 else cum_fp / n_fp * n_fp / n_scans
    sens = np.zeros_like(cum_hit) if n_hit == 0 else cum_hit / n_hit * n_hit / n_nodules
    return fps, sens


def froc_curve(matching: Matching) -> FROCCurve:
    """The FROC curve of a matching (see the module docstring)."""
    if not matching.nodules:
        raise InputError("no nodule in the listed scans: sensitivity is undefined")
    e = _Entries(matching)
    fps, sens = _scaled(*e.curve(), e.n_scans, len(matching.nodules))
    return FROCCurve(fps=fps, sensitivity=sens, thresholds=np.append(np.inf, e.probs[e.ends]))


def bootstrap_sensitivity(matching: Matching, samples: np.ndarray, rates: Sequence[float] = FP_RATES) -> np.ndarray:
    """Sensitivity at ``rates`` for each bootstrap sample of scans.

    ``samples`` (n_samples x n_scans) holds indices into ``matching.scans`` (drawn with replacement); a
    scan drawn k times counts k times. The FP divisor stays ``len(matching.scans)``. Returns an
    (n_samples x len(rates)) array; rows of samples without any nodule are NaN.
    """
    e = _Entries(matching)
    samples = np.asarray(samples, dtype=int)
    out = np.full((len(samples), len(rates)), np.nan)
    for start in range(0, len(samples), _BOOTSTRAP_CHUNK):
        chunk = samples[start:start + _BOOTSTRAP_CHUNK]
        counts = np.stack([np.bincount(row, minlength=e.n_scans) for row in chunk]).astype(float)
        fps, hits = e.curve(counts[:, e.scan])
        n_nodules = counts @ e.nodules_per_scan
        for r in range(len(chunk)):
            if n_nodules[r] > 0:
                out[start + r] = np.interp(rates, *_scaled(fps[r], hits[r], e.n_scans, n_nodules[r]))
    return out


def confidence_bounds(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bounds as the official ``compute_mean_ci``: the sorted values at
    ``floor(Pz n)`` and ``floor((1 - Pz) n)``, Pz = (1 - confidence) / 2. NaNs are left out."""
    v = np.sort(values[~np.isnan(values)])
    if v.size == 0:
        return (math.nan, math.nan)
    pz = (1.0 - confidence) / 2.0
    return (float(v[math.floor(pz * v.size)]), float(v[min(math.floor((1.0 - pz) * v.size), v.size - 1)]))


def evaluate(findings: Sequence[Finding], candidates: Sequence[Candidate], scans: Sequence[str],
             n_bootstrap: int = 1000, seed: int = 0, band_points: int = 97) -> FROCResult:
    """Score candidates against findings (world LPS mm) over the listed scans.

    ``n_bootstrap`` scan-level bootstrap samples (0: none) drawn with ``numpy.random.default_rng(seed)``
    give the 95% intervals and a band on ``band_points`` log-spaced FP rates from 1/8 to 8.
    """
    matching = match(findings, candidates, scans)
    curve = froc_curve(matching)
    sens = curve.sensitivity_at(FP_RATES)
    ci95 = band = None
    if n_bootstrap > 0:
        n = len(matching.scans)
        samples = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
        grid = np.geomspace(FP_RATES[0], FP_RATES[-1], band_points)
        boot = bootstrap_sensitivity(matching, samples, (*FP_RATES, *grid))
        at_rates = boot[:, :len(FP_RATES)]
        ci95 = {rate_key(r): confidence_bounds(at_rates[:, i]) for i, r in enumerate(FP_RATES)}
        ci95["cpm"] = confidence_bounds(at_rates.mean(axis=1))
        bounds = np.array([confidence_bounds(boot[:, len(FP_RATES) + j]) for j in range(band_points)])
        band = (grid, bounds[:, 0], bounds[:, 1])
    return FROCResult(matching=matching, curve=curve,
                      sensitivity={rate_key(r): float(s) for r, s in zip(FP_RATES, sens)},
                      cpm=float(sens.mean()), ci95=ci95, band=band, n_bootstrap=n_bootstrap, seed=seed)


def sensitivity_by_size(scores: Sequence[FindingScore], matching: Matching | None = None) -> list[dict]:
    """Per size class (``SIZE_BINS``): nodules, how many any candidate hit, and that fraction (``None``
    for an empty class). The ``<3`` class is listed only when it holds a nodule. With ``matching`` (whose
    nodules ``scores`` are), also the class's sensitivity at 1 FP/scan and CPM (see ``group_sensitivity``)."""
    rows = []
    for name, low, high in SIZE_BINS:
        inside = [s for s in scores if low <= s.finding.diameter_mm < high]
        if name == "<3" and not inside:
            continue
        rows.append({"size_mm": name, **group_sensitivity(inside, matching)})
    return rows


def sensitivity_by_attribute(matching: Matching, column: str) -> list[dict]:
    """Per value of the annotation column ``column`` (e.g. ``texture``; ``""`` where a nodule has none),
    in order of first appearance: the counts and sensitivities of ``group_sensitivity``."""
    groups: dict[str, list[FindingScore]] = {}
    for s in matching.nodules:
        groups.setdefault(s.finding.attributes.get(column, ""), []).append(s)
    return [{column: value, **group_sensitivity(scores, matching)} for value, scores in groups.items()]


def detected_by_size_and(scores: Sequence[FindingScore], column: str) -> list[dict]:
    """Per size class that holds a nodule (``SIZE_BINS``): ``{value: [detected, nodules]}`` for each value of the
    annotation column ``column`` (values in order of first appearance; ``[0, 0]`` where a class has none)."""
    values = list(dict.fromkeys(s.finding.attributes.get(column, "") for s in scores))
    rows = []
    for name, low, high in SIZE_BINS:
        inside = [s for s in scores if low <= s.finding.diameter_mm < high]
        if inside:
            cells = {v: [sum(s.detected for s in inside if s.finding.attributes.get(column, "") == v),
                         sum(s.finding.attributes.get(column, "") == v for s in inside)] for v in values}
            rows.append({"size_mm": name, **cells})
    return rows


def group_sensitivity(scores: Sequence[FindingScore], matching: Matching | None = None) -> dict:
    """``nodules``, ``detected`` (hit by any candidate) and ``sensitivity`` (their fraction; ``None`` for no
    nodule) of a group of nodules; with ``matching``, also ``sensitivity_at_1fp`` and ``cpm`` of the group's
    FROC: the group's hits against every false positive of the matching, on the same FP/scan axis."""
    detected = sum(s.detected for s in scores)
    row = {"nodules": len(scores), "detected": detected, "sensitivity": detected / len(scores) if scores else None}
    if matching is not None:
        at = froc_curve(replace(matching, nodules=list(scores))).sensitivity_at() if scores else None
        row["sensitivity_at_1fp"] = None if at is None else float(at[FP_RATES.index(1.0)])
        row["cpm"] = None if at is None else float(at.mean())
    return row


def froc_output_paths(outdir: str | os.PathLike) -> dict[str, Path]:
    """Where ``write_froc_outputs`` writes: froc.json, froc.png, froc_curve.csv, missed_nodules.csv."""
    outdir = Path(outdir)
    return {"json": outdir / "froc.json", "png": outdir / "froc.png", "curve": outdir / "froc_curve.csv",
            "missed": outdir / "missed_nodules.csv"}


def write_froc_outputs(result: FROCResult, outdir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write the evaluation into ``outdir`` (atomically; existing files only with ``overwrite``)."""
    paths = froc_output_paths(outdir)
    for p in paths.values():
        check_writable(p, overwrite)
    write_text_atomic(paths["json"], json.dumps(result.to_dict(), indent=2) + "\n", overwrite)
    c = result.curve
    write_text_atomic(paths["curve"], "fps_per_scan,sensitivity,threshold\n" + "".join(
        f"{f:.9g},{s:.9g},{t:.9g}\n" for f, s, t in zip(c.fps, c.sensitivity, c.thresholds)), overwrite)
    write_text_atomic(paths["missed"], "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(
        f"{s.finding.seriesuid},{','.join(f'{v:g}' for v in s.finding.center_lps)},{s.finding.diameter_mm:g}\n"
        for s in result.matching.nodules if not s.detected), overwrite)
    with atomic_path(paths["png"], overwrite) as tmp:
        _plot(result, tmp)
    return paths


def evaluate_files(annotations: str | os.PathLike, candidates: str | os.PathLike, outdir: str | os.PathLike,
                   excluded: str | os.PathLike | None = None, scans: str | os.PathLike | None = None,
                   n_bootstrap: int = 1000, seed: int = 0, overwrite: bool = False) -> tuple[FROCResult, dict]:
    """Read LUNA16-style files, evaluate, write the outputs; returns the result and the written paths.

    ``annotations``: LUNA16 annotations.csv (nodules) or a table with a ``status`` column (the layout of
    ``../shared/data/annotations.csv``). ``excluded``: annotations_excluded.csv. ``scans``: list of the
    seriesuids that count (default: every seriesuid of the annotation files).
    """
    for p in froc_output_paths(outdir).values():
        check_writable(p, overwrite)
    findings = read_findings(annotations, status="nodule")
    if excluded is not None:
        findings += read_findings(excluded, status="excluded")
    if scans is None:
        scan_list = list(dict.fromkeys(f.seriesuid for f in findings))
        log.info("counting the %d scans of the annotation files; pass a scan list to count scans "
                 "without any annotation", len(scan_list))
    else:
        scan_list = read_scan_list(scans)
    result = evaluate(findings, read_candidates(candidates), scan_list, n_bootstrap=n_bootstrap, seed=seed)
    return result, write_froc_outputs(result, outdir, overwrite)


def evaluate_detector(dataset: str | os.PathLike, outdir: str | os.PathLike, model: str | os.PathLike | None = None,
                      threshold: float = 0.0, device: str = "auto", scans: Sequence[str] | None = None,
                      n_bootstrap: int = 1000, seed: int = 0, overwrite: bool = False,
                      progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Run the detector over every scan of a data set and score it with ``evaluate``.

    ``dataset``: a LUNA16 or shared-layout folder (see ``datasets``); ``scans`` restricts it (seriesuids
    or entry names). ``threshold``: candidates with probability >= it are kept (default 0: all, so that
    the FROC covers the whole curve). Writes ``candidates.csv``, ``report.json``, ``report.md`` and the
    FROC outputs into ``outdir``; returns their paths. ``progress(scan name, fraction done)``.
    """
    from .detect import Detector  # torch is only needed here, not for scoring files

    ds = Dataset.open(dataset, list(scans) if scans is not None else None)
    if not any(s.annotations for s in ds.scans):
        raise InputError(f"no nodule annotation in the chosen scans of {ds.root}: sensitivity is undefined")
    outdir = Path(outdir)
    paths = {"candidates": outdir / "candidates.csv", "report_json": outdir / "report.json",
             "report_md": outdir / "report.md", **froc_output_paths(outdir)}
    for p in paths.values():
        check_writable(p, overwrite)
    detector = Detector.load(model, device)
    candidates: list[Candidate] = []
    csv_rows = ["seriesuid,coordX,coordY,coordZ,probability,diameter_mm,kind\n"]
    per_scan = []
    model_info: dict = {}
    for n, scan in enumerate(ds.scans):
        if progress is not None:
            progress(scan.name, n / len(ds.scans))
        t0 = time.perf_counter()
        volume = scan.read()
        t1 = time.perf_counter()
        result = detector.detect(volume, threshold=threshold)
        t2 = time.perf_counter()
        for nod in result.nodules:
            center = tuple(float(v) for v in nod.center_lps)
            candidates.append(Candidate(scan.seriesuid, center, float(nod.probability)))
            csv_rows.append(f"{scan.seriesuid},{','.join(f'{float(v):.3f}' for v in nod.center_lps)},"
                            f"{nod.probability:.6f},{nod.diameter_mm:.2f},{nod.kind}\n")
        model_info = result.model_info
        per_scan.append({"seriesuid": scan.seriesuid, "path": str(scan.path), "candidates": len(result.nodules),
                         "nodules": len(scan.annotations), "seconds_read": t1 - t0, "seconds_detect": t2 - t1,
                         "timings": dict(result.timings)})
        log.info("%d/%d %s: %d candidates, %.1f s", n + 1, len(ds.scans), scan.name, len(result.nodules), t2 - t0)
    if progress is not None:
        progress("done", 1.0)
    froc = evaluate(ds.findings(), candidates, ds.seriesuids, n_bootstrap=n_bootstrap, seed=seed)
    write_text_atomic(paths["candidates"], "".join(csv_rows), overwrite)
    write_froc_outputs(froc, outdir, overwrite)
    seconds = [s["seconds_read"] + s["seconds_detect"] for s in per_scan]
    report = {"dataset": str(ds.root), "layout": ds.layout, "model": str(model) if model else "shipped",
              "model_info": model_info, "device": device, "threshold": threshold,
              "scans": per_scan, "seconds_per_scan": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))},
              "operating_point": operating_point(froc.matching, detector.threshold),
              "froc": froc.to_dict()}
    write_text_atomic(paths["report_json"], json.dumps(report, indent=2, default=str) + "\n", overwrite)
    write_text_atomic(paths["report_md"], _report_markdown(report, froc), overwrite)
    return paths


def operating_point(matching: Matching, threshold: float) -> dict:
    """Sensitivity and false positives per scan at one probability ``threshold`` (the model's default), with
    every nodule's and mass's best probability (``None``: no candidate hit it)."""
    def row(score: FindingScore) -> dict:
        return _finding_dict(score) | {"probability": score.probability,
                                       "found": score.probability is not None and score.probability >= threshold}

    nodules = [row(s) for s in matching.nodules]
    n_fp = int(np.sum(matching.fp_probability >= threshold))
    return {"threshold": threshold,
            "sensitivity": sum(r["found"] for r in nodules) / len(nodules) if nodules else None,
            "false_positives": n_fp, "fp_per_scan": n_fp / len(matching.scans),
            "nodules": nodules, "masses": [row(s) for s in matching.masses]}


def _finding_dict(score: FindingScore) -> dict:
    f = score.finding
    return {"seriesuid": f.seriesuid, "center_lps": list(f.center_lps), "diameter_mm": f.diameter_mm}


def _report_markdown(report: dict, froc: FROCResult) -> str:
    lines = [f"# Detector evaluation: {report['dataset']}", "",
             f"Model: {report['model']}; device: {report['device']}; threshold: {report['threshold']}; "
             f"{len(report['scans'])} scans, {report['seconds_per_scan']['mean']:.1f} s per scan on average.", "",
             f"**CPM {froc.cpm:.3f}**" + (f" (95% CI {froc.ci95['cpm'][0]:.3f}-{froc.ci95['cpm'][1]:.3f})"
                                          if froc.ci95 else ""), "",
             "| FP/scan | sensitivity | 95% CI |", "|---|---|---|"]
    for key, value in froc.sensitivity.items():
        ci = f"{froc.ci95[key][0]:.3f}-{froc.ci95[key][1]:.3f}" if froc.ci95 else "-"
        lines.append(f"| {key} | {value:.3f} | {ci} |")
    lines += ["", "| scan | nodules | candidates | read s | detect s |", "|---|---|---|---|---|"]
    lines += [f"| {s['seriesuid']} | {s['nodules']} | {s['candidates']} | {s['seconds_read']:.1f} | "
              f"{s['seconds_detect']:.1f} |" for s in report["scans"]]
    froc_dict = report["froc"]
    for key, title in [("sensitivity_by_size", "size_mm"), *((f"sensitivity_by_{c}", c) for c in GROUP_COLUMNS)]:
        if key not in froc_dict:
            continue
        lines += ["", f"Sensitivity by {title} (any hit; at 1 FP/scan; CPM of the group):", "",
                  f"| {title} | nodules | detected | sensitivity | at 1 FP/scan | CPM |", "|---|---|---|---|---|---|"]
        lines += [f"| {r[title] or '(none)'} | {r['nodules']} | {r['detected']} | {_fmt(r['sensitivity'])} | "
                  f"{_fmt(r.get('sensitivity_at_1fp'))} | {_fmt(r.get('cpm'))} |" for r in froc_dict[key]]
    for c in GROUP_COLUMNS:
        rows = froc_dict.get(f"detected_by_size_and_{c}")
        if not rows:
            continue
        values = [k for k in rows[0] if k != "size_mm"]
        lines += ["", f"Nodules detected (any hit) by size_mm and {c}:", "",
                  f"| size_mm | {' | '.join(v or '(none)' for v in values)} |", "|---" * (len(values) + 1) + "|"]
        lines += [f"| {r['size_mm']} | " + " | ".join(f"{r[v][0]}/{r[v][1]}" for v in values) + " |" for r in rows]
    op = report.get("operating_point")
    if op is not None:
        lines += ["", f"At the model's default threshold {op['threshold']:.3f}: sensitivity {_fmt(op['sensitivity'])}, "
                  f"{op['false_positives']} false positives ({op['fp_per_scan']:.2f} per scan).", "",
                  "| finding | diameter mm | best probability | found at threshold |", "|---|---|---|---|"]
        lines += [f"| {kind} {r['seriesuid']} ({', '.join(f'{v:.1f}' for v in r['center_lps'])}) | "
                  f"{r['diameter_mm']:.1f} | {_fmt(r['probability'])} | {'yes' if r['found'] else 'no'} |"
                  for kind, rows in (("nodule", op["nodules"]), ("mass", op["masses"])) for r in rows]
    missed = [s for s in froc.matching.nodules if not s.detected]
    lines += ["", f"Missed nodules: {len(missed)}"]
    lines += [f"- {s.finding.seriesuid} at ({', '.join(f'{v:.1f}' for v in s.finding.center_lps)}) mm LPS, "
              f"{s.finding.diameter_mm:.1f} mm" for s in missed]
    for m in froc.matching.masses:
        lines.append(f"- mass {m.finding.seriesuid} ({m.finding.diameter_mm:g} mm): "
                     + (f"detected, p={m.probability:.3f}" if m.detected else "not detected"))
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _plot(result: FROCResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 200)
    ax.plot(grid, result.curve.sensitivity_at(grid), color="C0", lw=2, label=f"CPM {result.cpm:.3f}")
    if result.band is not None:
        ax.fill_between(result.band[0], result.band[1], result.band[2], color="C0", alpha=0.15, label="95% CI")
    ax.plot(FP_RATES, list(result.sensitivity.values()), "o", color="C3", label="LUNA16 operating points")
    ax.set_xscale("log", base=2)
    ax.set_xticks(FP_RATES)
    ax.set_xticklabels([rate_key(r) for r in FP_RATES])
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0, 1)
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.grid(True, which="both", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"FROC: {len(result.matching.nodules)} nodules, {len(result.matching.scans)} scans")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
