"""Choosing a model's operating point on annotated scans, without changing its networks.

Six numbers of a model decide what the detector reports, besides its weights: stage 1's candidate threshold
(``Stage1Config.candidate_threshold``: a lower one proposes fainter regions), how stage 1 scores a candidate
(``Stage1Config.score_temperature``: its highest probability, or its highest logit through a temperature, which
keeps candidates apart where the probability saturates at 1), the weight of stage 2 against stage 1 in a
finding's probability (``Stage2Config.weight``, see ``detect.fuse_scores``), the weight of the candidate's shape
(``Stage1Config.dot_weight``, see ``detect.shape_prior``), the weight of its candidate-feature model where it has
one (``Stage2Config.feature_weight``, see ``detect.feature_prior``) and the default reporting threshold
(``ModelConfig.threshold``). Training picks the stage 2 weight and the threshold on its validation cases
(``Trainer.choose_threshold``); ``calibrate`` picks all six afresh on a data set of annotated scans (real
nodules, or lesions inserted by ``make-lesion-dataset``) and writes a copy of the model with them:

1. per scan, stage 1 runs once; its candidates are taken at each candidate threshold tried, with masses
   as ``Detector.detect`` finds them, stage 2 scores them, the dot filter rates their shape and the feature model
   their measured features (``scan_scores``);
2. every (candidate threshold, score temperature, stage weight, shape weight, feature weight) setting is scored by
   the CPM of the project's LUNA16 evaluator, and its default threshold is the lowest probability with at most
   ``fp_per_scan`` false positives per scan on the same scans (``choose_threshold``, clipped to 0.3-0.98);
3. the best CPM wins; ties go to a setting whose clipped threshold still keeps to ``fp_per_scan``, then to the
   higher candidate threshold, the larger weight, the highest-probability score (no temperature), the lowest
   temperature, then the smallest shape weight and the smallest feature weight (``choose_operating_point``).

``calibrate`` can first set, as given and without choosing them, how stage 1 runs (its number of blob-filter
proposals, working grid, bfloat16, and the share of each scan's own batch-norm statistics) and whether stage 2
spares large findings; the six numbers are then chosen for those settings.

The scans used here become part of the model's tuning: report a model's accuracy on other scans. ``fit_features``
fits the candidate-feature model itself (``features.FeatureModel``) on training scans' candidates.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import check_writable, write_text_atomic
from .blobs import ShapeFilter
from .datasets import Dataset, Finding
from .detect import Detector, feature_prior, fuse_scores, logit_score, outline_diameters, shape_prior
from .errors import InputError
from .evaluate import Candidate, evaluate
from .features import FEATURE_NAMES, FeatureModel, candidate_labels, fit
from .preprocess import Prepared, prepare
from .regions import region_max
from .volume import CTVolume

log = logging.getLogger(__name__)

#: Stage 2 weights (``Stage2Config.weight``) tried by training and by ``calibrate``.
STAGE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Stage 1 candidate thresholds ``calibrate`` tries by default.
CANDIDATE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
#: Stage 1 score temperatures (``Stage1Config.score_temperature``) ``calibrate`` tries by default.
SCORE_TEMPERATURES = (None, 1.0, 2.0, 4.0, 8.0, 16.0)
#: Shape weights (``Stage1Config.dot_weight``) ``calibrate`` tries by default.
DOT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Candidate-feature weights (``Stage2Config.feature_weight``) ``calibrate`` tries for a model with a feature model.
FEATURE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ValidationScores:
    """Candidates of annotated scans: scan name, centre (LPS mm), stage 1 highest probability and highest logit
    in the candidate's region, stage 2 probability, the region's dot filter value (``blobs.ShapeFilter``;
    infinite for a mass, which keeps probability 1), the candidate-feature model's rating (1 where the model has
    none, and for a mass), where asked for, the measured features ``(N, F)`` (``features.FEATURE_NAMES``; NaN
    for a mass), and the outline diameters (mm, ``detect.outline_diameters``; infinite for a mass) that
    ``shape_prior`` weighs with the dot filter values (``None``: none is large)."""

    scans: list[str]
    centers: np.ndarray
    stage1: np.ndarray
    stage1_logit: np.ndarray
    stage2: np.ndarray
    dot: np.ndarray
    rating: np.ndarray | None = None
    features: np.ndarray | None = None
    outline_mm: np.ndarray | None = None

    def candidates(self, weight: float | None, temperature: float | None = None,
                   dot_weight: float = 0.0, feature_weight: float = 0.0, spare_large: bool = False) -> list[Candidate]:
        """As evaluation candidates scored by stage 1 alone (``weight`` ``None``) or ``fuse_scores`` with
        ``weight`` (sparing large findings with ``spare_large``); stage 1's score is its highest probability, or
        ``sigmoid(logit / temperature)``; then ``shape_prior`` with ``dot_weight`` and ``feature_prior`` with
        ``feature_weight``."""
        s1 = self.stage1 if temperature is None else logit_score(self.stage1_logit, temperature)
        fused = None if weight is None else fuse_scores(s1, self.stage2, weight,
                                                        self.outline_mm if spare_large else None)
        p = shape_prior(s1 if fused is None else fused, self.dot, dot_weight, self.outline_mm)
        if feature_weight:
            p = feature_prior(p, self.rating, feature_weight)
        return [Candidate(s, tuple(map(float, xyz)), float(v)) for s, xyz, v in zip(self.scans, self.centers, p)]

    @classmethod
    def concat(cls, parts: Sequence[ValidationScores]) -> ValidationScores:
        """One table of several scans' scores."""
        if not parts:
            return cls([], np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
        joined = {name: np.concatenate([getattr(p, name) for p in parts])
                  for name in ("centers", "stage1", "stage1_logit", "stage2", "dot")}
        for name in ("rating", "features", "outline_mm"):
            values = [getattr(p, name) for p in parts]
            joined[name] = None if any(v is None for v in values) else np.concatenate(values)
        return cls([s for p in parts for s in p.scans], **joined)


def scan_scores(detector: Detector, name: str, volume: CTVolume, prep: Prepared, thresholds: Sequence[float],
                use_stage2: bool = True, with_masses: bool = False, with_dot: bool = False,
                with_features: bool = False) -> dict[float, ValidationScores]:
    """One scan's candidates and scores at each stage 1 candidate threshold (stage 1 runs once).

    The candidates are ``Detector.detect``'s: stage 1 regions, then blob-filter proposals outside them (when the
    model has ``blob_candidates``). ``volume``: the scan in HU; ``prep``: ``preprocess.prepare`` of it at the
    model's spacing. Stage 2 probabilities are zeros unless ``use_stage2``. ``with_masses``: add the masses
    ``Detector.detect`` would report (scored 1 by both stages) and drop the candidates centred in them, as
    ``detect`` does. Dot filter values are ones unless ``with_dot``. The candidate-feature model's ratings are
    made where the model has one, and the features themselves with ``with_features``.
    """
    prob, logit = detector.stage1_maps(prep.image, prep.lung, logits=True)
    feature_model = detector.feature_model()
    rate = with_features or feature_model is not None
    shapes = (ShapeFilter(prep.image, prep.geometry)
              if with_dot or rate or detector.config.stage1.blob_candidates > 0 else None)
    found_masses = detector.find_masses(prep) if with_masses else []
    out = {}
    for t in thresholds:
        p = prob.copy() if with_masses else prob  # ``Detector.masses`` writes into its map
        cands, regions = detector.candidates(p, prep.lung, prep.geometry, threshold=t, logit=logit)
        blob_cands = detector.blob_candidates(prep, p, regions, logit, shapes)
        first_blob = blob_cands[0].region if blob_cands else int(regions.max()) + 1
        cands += blob_cands
        ids = [c.region for c in cands]  # each region's highest probability and logit, before masses are marked
        best = {name: dict(zip(ids, region_max(m, regions, ids)))
                for name, m in (("prob", p), ("logit", logit))}
        masses = detector.masses(prep, p, regions, found_masses)
        cands = detector.outside_masses(cands, masses, regions, prep.geometry)
        ids = [c.region for c in cands]
        xyz = np.array([c.center_lps for c in cands]).reshape(-1, 3)
        s2 = detector.classify(volume, xyz) if use_stage2 else np.zeros(len(cands), np.float32)
        dot = shapes.region_dotness(regions, ids) if with_dot or rate else None
        with_outline = with_dot or detector.config.stage2.spare_large
        outline = outline_diameters(p, regions, ids, prep.geometry, first_blob) if with_outline else None
        features = (detector.candidate_features(prep, shapes, regions, cands, logit, s2, dot, first_blob)
                    if rate else None)
        ones = np.ones(len(masses))
        rating = None if feature_model is None else np.concatenate([feature_model.score(features), ones])
        out[t] = ValidationScores(
            [name] * (len(cands) + len(masses)),
            np.concatenate([xyz, np.array([m.center_lps for m in masses]).reshape(-1, 3)]),
            np.concatenate([[best["prob"][i] for i in ids], ones]),
            np.concatenate([[best["logit"][i] for i in ids], ones * np.inf]),
            np.concatenate([s2.astype(float), ones]),
            np.concatenate([dot if with_dot else np.ones(len(cands)), ones * np.inf]),
            rating,
            np.concatenate([features, np.full((len(masses), features.shape[1]), np.nan)]) if with_features else None,
            np.concatenate([outline, ones * np.inf]) if with_outline else None,
        )
    return out


def choose_threshold(findings: Sequence[Finding], candidates: Sequence[Candidate], scans: Sequence[str],
                     fp_per_scan: float, bounds: tuple[float, float] = (0.3, 0.98)) -> float:
    """Lowest probability threshold whose false positives per scan stay ≤ ``fp_per_scan`` (clipped)."""
    fp_probability = evaluate(findings, candidates, scans, n_bootstrap=0).matching.fp_probability
    return _threshold_for(fp_probability, len(scans), fp_per_scan, bounds)


def _threshold_for(fp_probability: np.ndarray, n_scans: int, fp_per_scan: float,
                   bounds: tuple[float, float] = (0.3, 0.98)) -> float:
    """``choose_threshold`` from the false positives' probabilities of an evaluation over ``n_scans`` scans."""
    fps = np.sort(fp_probability)[::-1]
    allowed = int(np.floor(fp_per_scan * n_scans))
    t = float(np.nextafter(fps[allowed], 1.0)) if len(fps) > allowed else bounds[0]
    return float(np.clip(t, *bounds))


@dataclass
class OperatingPoint:
    """What ``choose_operating_point`` chose, and what every setting it tried gave: ``grid[(t, T, w, a, f)]`` =
    (CPM, default threshold, false positives per scan at that threshold)."""

    candidate_threshold: float
    temperature: float | None
    weight: float
    dot_weight: float
    feature_weight: float
    threshold: float
    cpm: float
    grid: dict[tuple[float, float | None, float, float, float], tuple[float, float, float]]


def choose_operating_point(findings: Sequence[Finding], scores: dict[float, ValidationScores], scans: Sequence[str],
                           fp_per_scan: float, weights: Sequence[float] = STAGE_WEIGHTS,
                           temperatures: Sequence[float | None] = (None,), dot_weights: Sequence[float] = (0.0,),
                           feature_weights: Sequence[float] = (0.0,), spare_large: bool = False) -> OperatingPoint:
    """The (candidate threshold, score temperature, stage weight, shape weight, feature weight) setting of best CPM
    and its default threshold.

    ``scores``: candidates per candidate threshold (``scan_scores``, all scans). ``spare_large``: large findings
    keep their stage 1 score in ``fuse_scores`` (``Stage2Config.spare_large``). Ties: see the module docs.
    """
    grid = {}
    for t, s in scores.items():
        for temp in temperatures:
            for w in weights:
                for a, f in itertools.product(dot_weights, feature_weights):
                    cands = s.candidates(w, temp, a, f, spare_large)
                    result = evaluate(findings, cands, scans, n_bootstrap=0)
                    threshold = _threshold_for(result.matching.fp_probability, len(scans), fp_per_scan)
                    fps = float((result.matching.fp_probability >= threshold).sum()) / len(scans)
                    grid[(t, temp, w, a, f)] = (result.cpm, threshold, fps)

    def preference(key):
        t, temp, w, a, f = key
        cpm, _, fps = grid[key]
        return round(cpm, 6), fps <= fp_per_scan, t, w, temp is None, -(temp or 0.0), -a, -f

    t, temp, w, a, f = max(grid, key=preference)
    cpm, threshold, fps = grid[(t, temp, w, a, f)]
    log.info("chosen: candidate threshold %g, score temperature %s, stage 2 weight %g, shape weight %g, feature "
             "weight %g: CPM %.3f; threshold %.3f (%.2f FP/scan)", t, temp, w, a, f, cpm, threshold, fps)
    return OperatingPoint(float(t), temp, float(w), float(a), float(f), threshold, cpm, grid)


def _check_blob_candidates(blob_candidates: int | None) -> None:
    if blob_candidates is not None and not 0 <= blob_candidates <= 1000:
        raise InputError(f"--blob-candidates must be between 0 and 1000, got {blob_candidates}")


def dataset_scores(detector: Detector, ds: Dataset, thresholds: Sequence[float], with_dot: bool = False,
                   with_features: bool = False,
                   progress: Callable[[str, float], None] | None = None) -> dict[float, ValidationScores]:
    """``scan_scores`` of every scan of ``ds`` (masses as ``detect`` reports them), joined per candidate threshold.
    ``progress(scan name, fraction done)``."""

    cfg = detector.config
    parts: dict[float, list[ValidationScores]] = {float(t): [] for t in thresholds}
    for n, scan in enumerate(ds.scans):
        if progress is not None:
            progress(scan.name, n / len(ds.scans))
        volume = scan.read()
        prep = prepare(volume, cfg.stage1.spacing_mm, cfg.hu_window)
        for t, s in scan_scores(detector, scan.seriesuid, volume, prep, list(parts), with_masses=True,
                                with_dot=with_dot, with_features=with_features).items():
            parts[t].append(s)
    if progress is not None:
        progress("done", 1.0)
    return {t: ValidationScores.concat(p) for t, p in parts.items()}


def check_options(candidate_thresholds: Sequence[float] | None = None, weights: Sequence[float] | None = None,
                  temperatures: Sequence[float | None] | None = None, dot_weights: Sequence[float] | None = None,
                  feature_weights: Sequence[float] | None = None, blob_candidates: int | None = None,
                  stage1_spacing_mm: float | None = None, bn_adapt: float | None = None,
                  fp_per_scan: float = 0.5) -> None:
    """Raise ``InputError`` with a one-line reason if an option of ``calibrate`` is out of range (``None``: its
    default, always valid), before any scan is read."""
    if (candidate_thresholds is not None and not candidate_thresholds) or (weights is not None and not weights):
        raise InputError("give at least one candidate threshold and one stage 2 weight")
    if temperatures is not None and any(x is not None and x <= 0 for x in temperatures):
        raise InputError(f"score temperatures must be positive, got {list(temperatures)}")
    if dot_weights is not None and (not dot_weights or any(not 0.0 <= float(a) <= 4.0 for a in dot_weights)):
        raise InputError(f"shape weights must be between 0 and 4, got {list(dot_weights)}")
    if feature_weights is not None and (not feature_weights
                                        or any(not 0.0 <= float(f) <= 1.0 for f in feature_weights)):
        raise InputError(f"feature weights must be between 0 and 1, got {list(feature_weights)}")
    _check_blob_candidates(blob_candidates)
    if stage1_spacing_mm is not None and not 0.5 <= stage1_spacing_mm <= 3.0:
        raise InputError(f"--stage1-spacing must be between 0.5 and 3 mm, got {stage1_spacing_mm}")
    if bn_adapt is not None and not 0.0 <= bn_adapt <= 1.0:
        raise InputError(f"--bn-adapt must be between 0 and 1, got {bn_adapt}")
    for t in list(candidate_thresholds or []) + list(weights or []):
        if not 0.0 <= float(t) <= 1.0:
            raise InputError(f"candidate thresholds and stage 2 weights must be between 0 and 1, got {t}")
    if fp_per_scan <= 0:
        raise InputError(f"--fp-per-scan must be positive, got {fp_per_scan}")


def calibrate(dataset: str | os.PathLike, outdir: str | os.PathLike, model: str | os.PathLike | None = None,
              scans: Sequence[str] | None = None, candidate_thresholds: Sequence[float] | None = None,
              weights: Sequence[float] | None = None, temperatures: Sequence[float | None] | None = None,
              dot_weights: Sequence[float] | None = None, feature_weights: Sequence[float] | None = None,
              blob_candidates: int | None = None,
              stage1_spacing_mm: float | None = None, stage1_bf16: bool | None = None,
              bn_adapt: float | None = None, spare_large: bool | None = None, fp_per_scan: float = 0.5,
              device: str = "auto",
              overwrite: bool = False, progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Choose ``model``'s operating point on the annotated scans of ``dataset`` (see the module docs).

    ``dataset``: a LUNA16 or shared-layout folder (``datasets``); ``scans`` restricts it. The settings tried are
    ``candidate_thresholds`` (default ``CANDIDATE_THRESHOLDS``) × ``temperatures`` (default ``SCORE_TEMPERATURES``;
    ``None``: score by the highest probability) × ``weights`` (default ``STAGE_WEIGHTS``) × ``dot_weights``
    (default ``DOT_WEIGHTS``) × ``feature_weights`` (default ``FEATURE_WEIGHTS`` for a model with a
    candidate-feature model, ``fit_features``; else 0). ``blob_candidates``: set the model's number of blob-filter
    proposals per scan first (default: keep it). ``stage1_spacing_mm``: run stage 1 on a working grid of this
    spacing (mm) first (default: keep it; a finer grid than the one it was trained on shows it every structure
    magnified). ``stage1_bf16``: set the model's ``cpu_bf16`` first (default: keep it). ``bn_adapt``: set the
    share of each scan's own batch-norm statistics in stage 1 first (``Stage1Config.bn_adapt``; default: keep it).
    ``spare_large``: set ``Stage2Config.spare_large`` first (default: keep it).
    Writes ``model.safetensors`` (the model with the chosen values and a ``calibration`` entry in its card),
    ``calibration.json`` and ``calibration.md`` into ``outdir``; returns their paths.
    ``progress(scan name, fraction done)``.
    """
    check_options(candidate_thresholds, weights, temperatures, dot_weights, feature_weights, blob_candidates,
                  stage1_spacing_mm, bn_adapt, fp_per_scan)
    candidate_thresholds = CANDIDATE_THRESHOLDS if candidate_thresholds is None else candidate_thresholds
    weights = STAGE_WEIGHTS if weights is None else weights
    temperatures = SCORE_TEMPERATURES if temperatures is None else temperatures
    dot_weights = DOT_WEIGHTS if dot_weights is None else dot_weights
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
    before = {"candidate_threshold": cfg.stage1.candidate_threshold,
              "score_temperature": cfg.stage1.score_temperature, "stage2_weight": cfg.stage2.weight,
              "dot_weight": cfg.stage1.dot_weight, "feature_weight": cfg.stage2.feature_weight,
              "blob_candidates": cfg.stage1.blob_candidates,
              "stage1_spacing_mm": cfg.stage1.spacing_mm, "stage1_bf16": cfg.stage1.cpu_bf16,
              "bn_adapt": cfg.stage1.bn_adapt, "spare_large": cfg.stage2.spare_large, "threshold": cfg.threshold}
    if blob_candidates is not None:
        cfg.stage1.blob_candidates = int(blob_candidates)
    if stage1_spacing_mm is not None:
        cfg.stage1.spacing_mm = float(stage1_spacing_mm)
    if stage1_bf16 is not None:
        cfg.stage1.cpu_bf16 = bool(stage1_bf16)
    if bn_adapt is not None:
        cfg.stage1.bn_adapt = float(bn_adapt)
    if spare_large is not None:
        cfg.stage2.spare_large = bool(spare_large)
    with_dot = any(float(a) > 0 for a in dot_weights)
    if feature_weights is None:
        feature_weights = FEATURE_WEIGHTS if cfg.stage2.features else (0.0,)
    elif not cfg.stage2.features and any(float(f) > 0 for f in feature_weights):
        raise InputError("the model has no candidate-feature model to weigh: fit one first (fit-features)")
    t0 = time.perf_counter()
    scores = dataset_scores(detector, ds, sorted({float(t) for t in candidate_thresholds}), with_dot=with_dot,
                            progress=progress)
    point = choose_operating_point(ds.findings(), scores, ds.seriesuids, fp_per_scan, sorted(set(map(float, weights))),
                                   list(temperatures), sorted(set(map(float, dot_weights))),
                                   sorted(set(map(float, feature_weights))), cfg.stage2.spare_large)
    cfg.stage1.candidate_threshold = point.candidate_threshold
    cfg.stage1.score_temperature = point.temperature
    cfg.stage2.weight = point.weight
    cfg.stage1.dot_weight = point.dot_weight
    cfg.stage2.feature_weight = point.feature_weight
    cfg.threshold = point.threshold
    record = {
        "dataset": str(ds.root), "scans": len(ds.scans),
        "nodules": sum(1 for f in ds.findings() if f.status == "nodule"),
        "model": str(model) if model else "shipped", "fp_per_scan": fp_per_scan, "before": before,
        "chosen": {"candidate_threshold": point.candidate_threshold, "score_temperature": point.temperature,
                   "stage2_weight": point.weight, "dot_weight": point.dot_weight,
                   "feature_weight": point.feature_weight,
                   "blob_candidates": cfg.stage1.blob_candidates, "stage1_spacing_mm": cfg.stage1.spacing_mm,
                   "stage1_bf16": cfg.stage1.cpu_bf16, "bn_adapt": cfg.stage1.bn_adapt,
                   "spare_large": cfg.stage2.spare_large,
                   "threshold": point.threshold, "cpm": point.cpm},
        "tried": [{"candidate_threshold": t, "score_temperature": temp, "stage2_weight": w, "dot_weight": a,
                   "feature_weight": f,
                   "cpm": cpm, "threshold": th, "fp_per_scan_at_threshold": fps}
                  for (t, temp, w, a, f), (cpm, th, fps) in point.grid.items()],
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
    chosen, before = record["chosen"], record["before"]
    rows = sorted(record["tried"], key=lambda r: (-r["cpm"], r["fp_per_scan_at_threshold"]))

    def temp(value: float | None) -> str:
        return "probability" if value is None else f"logit / {value:g}"

    def yes(value: bool) -> str:
        return "yes" if value else "no"

    lines = [
        f"# Calibration on {record['dataset']}", "",
        f"Model: {record['model']}; {record['scans']} scans, {record['nodules']} nodules; {record['seconds']:.0f} s.",
        "", f"The {min(len(rows), 15)} best of {len(rows)} settings tried (all in calibration.json):", "",
        "| candidate threshold | stage 1 score | stage 2 weight | shape weight | feature weight | CPM "
        "| default threshold | FP/scan there |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("candidate_threshold", "score_temperature", "stage2_weight", "dot_weight", "feature_weight")
    for r in rows[:15]:
        mark = "**" if all(r[k] == chosen[k] for k in keys) else ""
        lines.append(f"| {mark}{r['candidate_threshold']:g}{mark} | {temp(r['score_temperature'])} | "
                     f"{r['stage2_weight']:g} | {r['dot_weight']:g} | {r['feature_weight']:g} | {r['cpm']:.3f} | "
                     f"{r['threshold']:.3f} | {r['fp_per_scan_at_threshold']:.2f} |")
    lines += [
        "", f"Chosen: candidate threshold {chosen['candidate_threshold']:g} (was {before['candidate_threshold']:g}), "
        f"stage 1 score {temp(chosen['score_temperature'])} (was {temp(before['score_temperature'])}), stage 2 weight "
        f"{chosen['stage2_weight']:g} (was {before['stage2_weight']:g}), shape weight {chosen['dot_weight']:g} (was "
        f"{before['dot_weight']:g}), feature weight {chosen['feature_weight']:g} (was {before['feature_weight']:g}), "
        f"{chosen['blob_candidates']} blob-filter proposals per scan (was "
        f"{before['blob_candidates']}), stage 1 grid {chosen['stage1_spacing_mm']:g} mm (was "
        f"{before['stage1_spacing_mm']:g}), stage 1 in bfloat16 where the CPU has it: {yes(chosen['stage1_bf16'])} "
        f"(was {yes(before['stage1_bf16'])}), scans' own batch-norm statistics {chosen.get('bn_adapt', 0.0):g} "
        f"(was {before.get('bn_adapt', 0.0):g}), large findings spared by stage 2: "
        f"{yes(chosen.get('spare_large', False))} (was {yes(before.get('spare_large', False))}), "
        f"default threshold {chosen['threshold']:.3f} "
        f"(was {before['threshold']:.3f}; the lowest with at most {record['fp_per_scan']:g} false positives per scan "
        "here, within 0.3-0.98). These scans tuned the model: measure its accuracy on others.", "",
    ]
    return "\n".join(lines)


def fit_features(dataset: str | os.PathLike, outdir: str | os.PathLike, model: str | os.PathLike | None = None,
                 scans: Sequence[str] | None = None, blob_candidates: int | None = None, l2: float = 1e-3,
                 device: str = "auto", overwrite: bool = False,
                 progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Fit ``model``'s candidate-feature model (``features.FeatureModel``) on the annotated scans of ``dataset``.

    Every scan's candidates are found as ``Detector.detect`` finds them (``scan_scores``), measured
    (``features.candidate_features``) and labelled by the evaluator's hit rule (``features.candidate_labels``;
    those on excluded findings and masses left out); the logistic model is fitted to them (``features.fit``, ridge
    ``l2``). Use training scans: those of a model's validation or test sets must stay out. ``blob_candidates``: set
    the model's number of blob-filter proposals per scan first (default: keep it). The model's feature weight is
    left as it is (0 for a model that had none): ``calibrate`` chooses it. Writes ``model.safetensors``,
    ``features.csv`` (every candidate: scan, centre LPS mm, label, features) and ``features.md`` into ``outdir``;
    returns their paths. ``progress(scan name, fraction done)``.
    """
    _check_blob_candidates(blob_candidates)
    if l2 < 0:
        raise InputError(f"--l2 must not be negative, got {l2}")
    ds = Dataset.open(dataset, list(scans) if scans is not None else None)
    if not any(s.annotations for s in ds.scans):
        raise InputError(f"no nodule annotation in the chosen scans of {ds.root}: nothing to fit on")
    outdir = Path(outdir)
    paths = {"model": outdir / "model.safetensors", "csv": outdir / "features.csv", "md": outdir / "features.md"}
    for p in paths.values():
        check_writable(p, overwrite)
    detector = Detector.load(model, device)
    cfg = detector.config
    if blob_candidates is not None:
        cfg.stage1.blob_candidates = int(blob_candidates)
    t0 = time.perf_counter()
    t = cfg.stage1.candidate_threshold
    scores = dataset_scores(detector, ds, [t], with_features=True, progress=progress)[t]
    labels = candidate_labels(ds.findings(), scores.scans, scores.centers)
    measured = ~np.isnan(scores.features).any(axis=1)  # masses are not measured
    labels = np.where(measured, labels, -1)
    try:
        fitted = fit(np.nan_to_num(scores.features), labels, l2)
    except ValueError as e:
        raise InputError(str(e)) from None
    cfg.stage2.features = fitted.to_config()
    record = {"dataset": str(ds.root), "scans": len(ds.scans), "model": str(model) if model else "shipped",
              "blob_candidates": cfg.stage1.blob_candidates, "l2": l2, "candidates": int((labels >= 0).sum()),
              "hits": int((labels == 1).sum()), "left_out": int((labels < 0).sum()),
              "coefficients": dict(zip(FEATURE_NAMES, map(float, fitted.coef))), "bias": fitted.bias,
              "seconds": round(time.perf_counter() - t0, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cfg.card = {**cfg.card, "feature_fit": record}
    header = "seriesuid,coordX,coordY,coordZ,label," + ",".join(FEATURE_NAMES)
    rows = [",".join([s, *(f"{v:.3f}" for v in xyz), str(int(lab)), *(f"{v:.6g}" for v in f)])
            for s, xyz, lab, f in zip(scores.scans, scores.centers, labels, scores.features)]
    outdir.mkdir(parents=True, exist_ok=True)
    detector.model.save(paths["model"], overwrite=overwrite)
    write_text_atomic(paths["csv"], "\n".join([header, *rows]) + "\n", overwrite)
    write_text_atomic(paths["md"], _feature_fit_markdown(record, fitted), overwrite)
    return paths


def _feature_fit_markdown(record: dict, fitted: FeatureModel) -> str:
    lines = [f"# Candidate-feature model fitted on {record['dataset']}", "",
             f"Model: {record['model']}; {record['scans']} scans, {record['blob_candidates']} blob-filter proposals "
             f"per scan; {record['candidates']} candidates ({record['hits']} on nodules; {record['left_out']} on "
             f"excluded findings or masses left out); ridge {record['l2']:g}; {record['seconds']:.0f} s.", "",
             "| feature | median | interquartile range | coefficient (per range) |", "|---|---|---|---|"]
    for name, c, s, w in zip(FEATURE_NAMES, fitted.center, fitted.scale, fitted.coef):
        lines.append(f"| {name} | {c:.4g} | {s:.4g} | {w:+.3f} |")
    lines += ["", f"Bias {fitted.bias:+.3f}. The feature weight is chosen by `calibrate` on other scans.", ""]
    return "\n".join(lines)
