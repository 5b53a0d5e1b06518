"""Training both stages: the optimisation loops, hard-negative mining and validation by CPM.

A ``TrainingCase`` is a CT with a lesion label map (the targets) and ignore regions (findings that are
neither positive nor negative, e.g. LUNA16's excluded findings). ``Trainer`` trains in two steps:

1. **Stage 1** (U-net): cubic patches of the working grid, half centred near a lesion voxel, half anywhere
   in the lungs, augmented (flips, axial quarter turns, small rotations and scaling, slice thickness,
   intensity and noise); loss = binary cross-entropy + soft Dice, ignore regions masked out of both. With
   ``TrainSettings.balance_lesions`` the lesion patches are centred near a lesion drawn uniformly (each lesion
   as often as any other, whatever its size) and the voxels of small lesions weigh more in the loss
   (``lesion_weight``: a 5 mm lesion's voxels weigh 8, so it counts as much as a 10 mm lesion, whose voxels are
   8 times more).
2. **Stage 2** (3D CNN): stage 1 runs over every case; its candidates that fall on a lesion are
   positives, the others are the mined hard negatives, and candidates inside ignore regions are dropped.
   True lesion centres (jittered) are added as positives, and points of the host's own tissue inside the
   lung mask (vessels, airway walls, fissures, pleura, over ``DENSE_HU``; and parenchyma) as negatives, since
   a stage 1 that has learnt its few training hosts proposes little else than their lesions there.
   Loss = binary cross-entropy on class-balanced, augmented batches.

Each stage is validated every ``validate_every`` steps by the CPM of the project's LUNA16 evaluator on
the validation cases (stage 1 alone scores candidates by its own probability); the best weights are
kept, and a stage stops early after ``patience`` validations without improvement or when its share of
the time budget is spent. Training state is checkpointed so that an interrupted run resumes where it
stopped. At the end, the weight of stage 2 against stage 1 in a finding's probability
(``Stage2Config.weight``, see ``detect.fuse_scores``) is the one of ``calibrate.STAGE_WEIGHTS`` with the best
validation CPM, and the default threshold is set for it on the same validation cases
(``calibrate.choose_operating_point``; ``nodule-detection calibrate`` redoes this choice on other scans).
Under ``torchrun`` the networks are wrapped in ``DistributedDataParallel``; every rank draws its own samples,
and rank 0 writes the files.

The same code trains the tiny test models on phantoms and the shipped model on real host scans.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .augment import (
    Compose,
    RandomAffine,
    RandomConvolution,
    RandomFlip,
    RandomGamma,
    RandomIntensity,
    RandomNoise,
    RandomRot90,
    RandomSharpness,
    RandomSliceThickness,
)
from .blobs import find_blobs
from .calibrate import ValidationScores, choose_operating_point, scan_scores
from .datasets import Finding
from .detect import Detector
from .evaluate import evaluate
from .features import DENSE_HU
from .models import NoduleModel
from .preprocess import Prepared, crop_patches, lungs_only, normalize_hu, prepare, resample, sample_patches
from .volume import CTVolume

log = logging.getLogger(__name__)

#: Radius (mm) of the lesion target region used to decide that a stage 2 candidate is a hit.
MIN_HIT_RADIUS_MM = 3.0
#: Stage 1 loss weight of lesion voxels: ``(LESION_WEIGHT_REF_MM / diameter) ** 3`` (equal total weight per
#: lesion up to that diameter), rounded, between 1 and ``LESION_WEIGHT_MAX``.
LESION_WEIGHT_REF_MM = 10.0
LESION_WEIGHT_MAX = 8
#: Diameter (mm) under which an attached (juxtapleural or juxtavascular) lesion counts as small and attached
#: for ``TrainSettings.small_attached_weight``.
SMALL_LESION_MM = 6.0
ATTACHED_POSITIONS = ("juxtapleural", "juxtavascular")
#: HU above which a voxel of a small lesion's ``min_target_mm`` ball that is not the lesion's own is dense host
#: tissue (chest wall, vessel) for ``TrainSettings.min_target_ignores_dense``.
DENSE_HOST_HU = -300.0
#: Training batches over which ``WeightAverage.apply`` recomputes batch-norm statistics for averaged weights.
BN_BATCHES = 32
#: Each optimisation phase draws its batches from its own random stream, ``[seed, rank, stream]`` (3 is the
#: stream of the batch-norm batches of averaged weights).
PHASE_STREAMS = {"stage1": 1, "stage2": 2, "stage1_refine": 4}
#: The optimisation phases of a run, in order (``Trainer.train``).
PHASES = ("stage1", "stage1_refine", "stage2")
#: Share of the time budget by whose end each phase stops.
PHASE_BUDGET_SHARES = {"stage1": 0.65, "stage1_refine": 0.75, "stage2": 0.95}
#: Blob-filter spots per training case for ``TrainSettings.dot_negative_fraction``, and how far (mm) from a
#: lesion target they must lie.
DOT_NEGATIVES_PER_CASE, DOT_NEGATIVE_MARGIN_MM = 300, 3.0


def lesion_weight(diameter_mm: float) -> int:
    """Stage 1 loss weight of the voxels of a lesion of ``diameter_mm`` (an integer, 1 for 10 mm and over)."""
    w = (LESION_WEIGHT_REF_MM / max(float(diameter_mm), 1e-3)) ** 3
    return int(np.clip(np.round(w), 1, LESION_WEIGHT_MAX))


@dataclass
class TrainingCase:
    """One annotated scan.

    Attributes:
        volume: CT in HU.
        label_map: ``[k, j, i]`` on the input grid, > 0 on lesion voxels.
        lesions: ``(center_lps, diameter_mm)`` of each lesion (LPS mm).
        ignore: ``(center_lps, radius_mm)`` regions that are neither positive nor negative.
        name: identifier used as seriesuid in validation.
        kinds: for inserted lesions, each lesion's ``(texture, shape, position)`` (``lesions`` order); else empty.
        negatives: known non-nodule points (LPS mm; LUNA16's class-0 candidates), stage 2 negatives.
    """

    volume: CTVolume
    label_map: np.ndarray | None
    lesions: list[tuple[np.ndarray, float]]
    ignore: list[tuple[np.ndarray, float]] = field(default_factory=list)
    name: str = ""
    kinds: list[tuple[str, str, str]] = field(default_factory=list)
    negatives: list[np.ndarray] = field(default_factory=list)


@dataclass
class StageSchedule:
    """Optimisation settings of one stage: at most ``steps`` of ``batch`` samples, peak learning rate ``lr``.

    ``constant_lr``: the learning rate stays ``lr`` (else one cycle up to ``lr`` and down). ``average_from``: from
    this step on (1: every step; 0: never) the stage's result is the running mean of its weights after each step
    (``WeightAverage``), validated and kept in place of the weights of the last step."""

    steps: int = 200
    batch: int = 4
    lr: float = 1e-3
    constant_lr: bool = False
    average_from: int = 0


@dataclass
class TrainSettings:
    """Settings of a training run.

    Attributes:
        patch1: stage 1 patch edge in working-grid voxels.
        validate_every: steps between validations (0: validate only at the end of each stage).
        patience: validations without improvement before a stage stops early.
        time_budget_s: wall-clock budget of the training (``None``: unlimited); each phase stops when its share
            of it is spent (``PHASE_BUDGET_SHARES``: stage 1 65 %, its refinement 75 %, stage 2 95 %). A config's
            ``calibration`` runs after it, outside the budget.
        target_fp_per_scan: the default threshold is the lowest probability whose validation false
            positives per scan stay at or below this.
        balance_lesions: stage 1 draws lesion patches per lesion (not per lesion voxel) and weights the voxels of
            small lesions up (``lesion_weight``); off, every lesion voxel is equally likely and weighs 1.
        tissue_negatives: stage 2 negatives drawn per case from the host's dense tissue (``mine_candidates``).
        stage2_rotate: stage 2 augmentation adds small rotations and scaling (``stage2_augmentation``).
        min_target_mm: stage 1 targets of lesions smaller than this (mm) are balls of this diameter around
            their centre, added to their own voxels (0: every lesion's target is its own voxels).
        thick_slices: stage 1 augmentation simulates thicker slices (``RandomSliceThickness``).
        scanner_augmentation: stage 1 augmentation also simulates other scanners (``stage1_augmentation``).
        min_target_ignores_dense: the ``min_target_mm`` ball leaves out the dense host tissue in it (above
            ``DENSE_HOST_HU``, not the lesion's own voxels, e.g. the chest wall behind a juxtapleural lesion):
            those voxels are ignored (weight 0), neither target nor background.
        elastic_mm: stage 1 augmentation bends patches by a smooth random displacement of this standard
            deviation (mm; 0: off; ``stage1_augmentation``).
        dot_negative_fraction: share of stage 1's non-lesion patches centred on the training cases' bright compact
            spots away from lesions (``dot_negatives``: vessels seen end-on, branch points; 0: none, every
            non-lesion patch centred on a random lung voxel).
        small_attached_weight: with ``balance_lesions``, stage 1 draws inserted lesions under ``SMALL_LESION_MM``
            that are juxtapleural or juxtavascular (``TrainingCase.kinds``) this many times as often as the
            others (1: every lesion equally often).
        random_convolution: share of stage 1's patches shown with another texture (``RandomConvolution``; 0:
            none).
        stage2_random_convolution: the same for stage 2's patches, drawn for each scale after its other
            augmentations (``stage2_augmentation``).
        stage1_focal_gamma: stage 1's cross-entropy is a focal loss with this exponent (``_loss_stage1``; 0: plain
            cross-entropy).
        stage1_refine: a second stage 1 phase, run from the first phase's result before stage 2 is trained (0
            steps: none), e.g. a constant learning rate with its weights averaged (``StageSchedule.average_from``).
    """

    stage1: StageSchedule = field(default_factory=StageSchedule)
    stage1_refine: StageSchedule = field(default_factory=lambda: StageSchedule(steps=0))
    stage2: StageSchedule = field(default_factory=lambda: StageSchedule(steps=200, batch=32))
    patch1: int = 48
    positive_fraction: float = 0.5
    seed: int = 0
    validate_every: int = 0
    patience: int = 4
    time_budget_s: float | None = None
    target_fp_per_scan: float = 0.5
    augment: bool = True
    balance_lesions: bool = False
    tissue_negatives: int = 150
    stage2_rotate: bool = False
    min_target_mm: float = 0.0
    thick_slices: bool = True
    scanner_augmentation: bool = False
    small_attached_weight: float = 1.0
    elastic_mm: float = 0.0
    min_target_ignores_dense: bool = False
    dot_negative_fraction: float = 0.0
    random_convolution: float = 0.0
    stage2_random_convolution: float = 0.0
    stage1_focal_gamma: float = 0.0


@dataclass
class PreparedCase:
    """A case on the working grid: ``target`` lesion mask, ``weight`` (0 inside ignore regions, ``lesion_weight``
    on lesion voxels, 1 elsewhere), ``centres``, the centres of the lesions inside that grid as ``[k, j, i]``
    indices, ``lesion_index``, the index of each of those lesions in ``case.lesions``, and ``stage1_image``, what
    the U-net sees of ``prep.image`` (``preprocess.lungs_only``; ``prep.image`` itself unless the model sets
    ``outside_lung_hu``)."""

    case: TrainingCase
    prep: Prepared
    target: np.ndarray
    weight: np.ndarray
    centres: np.ndarray
    lesion_index: np.ndarray
    stage1_image: np.ndarray

    def draw_weights(self, small_attached_weight: float) -> np.ndarray:
        """Relative chance of drawing each of ``centres`` for a lesion patch: ``small_attached_weight`` for
        an inserted lesion under ``SMALL_LESION_MM`` (diameter) that is juxtapleural or juxtavascular, else 1."""
        w = np.ones(len(self.centres))
        if self.case.kinds:
            for n, i in enumerate(self.lesion_index):
                if self.case.lesions[i][1] < SMALL_LESION_MM and self.case.kinds[i][2] in ATTACHED_POSITIONS:
                    w[n] = small_attached_weight
        return w


def sphere_mask(shape: tuple[int, ...], geometry, balls: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """``bool [k, j, i]`` on a grid of ``geometry``: the union of balls ``(center LPS mm, radius mm)``."""
    mask = np.zeros(shape, bool)
    sp = np.asarray(geometry.spacing)
    for centre, radius in balls:
        c = geometry.lps_to_index(np.asarray(centre, dtype=float))
        r = np.ceil(radius / sp).astype(int) + 1
        lo = np.maximum(np.floor(c).astype(int) - r, 0)
        hi = np.minimum(np.ceil(c).astype(int) + r + 1, np.array(shape[::-1]))
        if np.any(hi <= lo):
            continue
        ii, jj, kk = (np.arange(lo[a], hi[a]) for a in range(3))
        d2 = (((kk[:, None, None] - c[2]) * sp[2]) ** 2 + ((jj[None, :, None] - c[1]) * sp[1]) ** 2
              + ((ii[None, None, :] - c[0]) * sp[0]) ** 2)
        mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] |= d2 <= radius ** 2
    return mask


def prepare_case(case: TrainingCase, model: NoduleModel, min_target_mm: float = 0.0,
                 ignore_dense: bool = False) -> PreparedCase:
    """Bring a case to the working grid (the same preprocessing as detection) with its target and weights.

    The target is the case's label map or, without one, the union of the lesions' spheres; a lesion under
    ``min_target_mm`` (diameter, mm) also gets a ball of that diameter around its centre
    (``TrainSettings.min_target_mm``), and its voxels the weight of a lesion of that diameter. With
    ``ignore_dense``, the ball's dense host voxels are ignored instead (``TrainSettings.min_target_ignores_dense``).
    """
    config = model.config
    prep = prepare(case.volume, config.stage1.spacing_mm, config.hu_window)
    if case.label_map is not None:
        start = (prep.crop[2].start, prep.crop[1].start, prep.crop[0].start)
        target, _ = resample((case.label_map[prep.crop] > 0).astype(np.float32),
                             case.volume.geometry.cropped(start), config.stage1.spacing_mm)
        target = target >= 0.5
    else:
        target = sphere_mask(prep.image.shape, prep.geometry, [(c, d / 2) for c, d in case.lesions])
    small = [(c, min_target_mm / 2) for c, d in case.lesions if d < min_target_mm]
    dense = None
    if small:
        ring = sphere_mask(prep.image.shape, prep.geometry, small) & ~target
        if ignore_dense:
            dense = ring & (prep.image > float(normalize_hu(np.float32(DENSE_HOST_HU), *config.hu_window)))
            ring &= ~dense
        target = target | ring
    weight = np.ones(prep.image.shape, np.float32)
    margin = max(prep.geometry.spacing)
    balls_by_weight: dict[int, list[tuple[np.ndarray, float]]] = {}
    for centre, diameter in case.lesions:
        diameter = max(diameter, min_target_mm)
        balls_by_weight.setdefault(lesion_weight(diameter), []).append((centre, diameter / 2 + margin))
    for w in sorted(k for k in balls_by_weight if k > 1):  # ascending: where lesions overlap, the largest weight
        weight[sphere_mask(prep.image.shape, prep.geometry, balls_by_weight[w]) & target] = w
    if case.ignore:
        weight[sphere_mask(prep.image.shape, prep.geometry, case.ignore) & ~target] = 0.0
    if dense is not None:
        weight[dense] = 0.0
    kji = np.round(prep.geometry.lps_to_index(np.array([c for c, _ in case.lesions], float).reshape(-1, 3)))
    kji = kji.reshape(-1, 3)[:, ::-1].astype(int)
    inside = np.all((kji >= 0) & (kji < np.array(prep.image.shape)), axis=1)
    stage1_image = lungs_only(prep.image, prep.lung, config.stage1.outside_lung_hu, config.hu_window)
    return PreparedCase(case, prep, target.astype(np.float32), weight, kji[inside], np.flatnonzero(inside),
                        stage1_image)


def dot_negatives(case: PreparedCase, count: int = DOT_NEGATIVES_PER_CASE) -> np.ndarray:
    """The ``count`` strongest blob-filter spots (``blobs.find_blobs``: bright compact spots, in a host mostly
    vessels seen end-on and branch points) of a prepared case's lungs at least ``DOT_NEGATIVE_MARGIN_MM`` from its
    lesion targets and outside its ignore regions, as ``[k, j, i]`` indices of its working grid."""
    margin = np.ceil(DOT_NEGATIVE_MARGIN_MM / np.array(case.prep.geometry.spacing)[::-1]).astype(int)
    near = ndimage.binary_dilation(case.target > 0, np.ones(tuple(2 * margin + 1), bool)) | (case.weight == 0)
    return find_blobs(case.prep.image, case.prep.lung, case.prep.geometry, count, exclude=near).kji


def stage1_augmentation(spacing_mm: float, thick_slices: bool = True, scanner: bool = False,
                        elastic_mm: float = 0.0, random_convolution: float = 0.0) -> Compose:
    """Augmentation of normalised working-grid patches (intensity offsets in normalised units); ``thick_slices``:
    also simulate slices of 0.6-5 mm; ``scanner``: also other scanners (gamma 0.8-1.25, a smoother or sharper
    kernel, HU scaled by 0.9-1.1 and shifted by up to about 55 HU, noise up to about 40 HU) instead of the mild
    intensity and noise jitter; ``elastic_mm`` > 0: also bend the patch (``RandomAffine``'s elastic displacement,
    that standard deviation in mm at control points 12 mm apart); ``random_convolution`` > 0: last, with that
    probability, another texture (``RandomConvolution``)."""
    if scanner:
        intensity = [RandomGamma((0.8, 1.25)), RandomSharpness(),
                     RandomIntensity(scale=(0.9, 1.1), offset=(-0.04, 0.04)), RandomNoise(std=(0.0, 0.03))]
    else:
        intensity = [RandomIntensity(scale=(0.95, 1.05), offset=(-0.015, 0.015)), RandomNoise(std=(0.0, 0.012))]
    # The grid is isotropic, so the spacing only sets the elastic displacement's units; it is left out when that is
    # off, which keeps the rotation matrix (and so every earlier run) bit for bit as before.
    bend = {"spacing": (spacing_mm,) * 3, "elastic_mm": elastic_mm} if elastic_mm > 0 else {}
    return Compose([
        RandomFlip(), RandomRot90(), RandomAffine(degrees=10.0, scales=(0.85, 1.15), **bend),
        *([RandomSliceThickness((0.6, 5.0), spacing=(spacing_mm,) * 3)] if thick_slices else []), *intensity,
        *([RandomConvolution(p=random_convolution)] if random_convolution > 0 else []),
    ])


def stage2_augmentation(spacing_mm: float, rotate: bool = False, random_convolution: float = 0.0) -> Compose:
    """Augmentation of HU patches around candidates (``rotate``: also rotations up to 15° and scaling ±10%;
    ``random_convolution`` > 0: last, with that probability, another texture, ``RandomConvolution``)."""
    return Compose([
        RandomFlip(), RandomRot90(), *([RandomAffine(degrees=15.0, scales=(0.9, 1.1))] if rotate else []),
        RandomSliceThickness((0.6, 5.0), spacing=(spacing_mm,) * 3),
        RandomIntensity(scale=(0.95, 1.05), offset=(-20.0, 20.0)), RandomNoise(std=(0.0, 15.0)),
        *([RandomConvolution(p=random_convolution)] if random_convolution > 0 else []),
    ])


@dataclass
class Stage2Samples:
    """Sample centres (LPS mm) for stage 2 with labels 1 (lesion) / 0 (negative), their case index, and their
    source (``SAMPLE_SOURCES``: lesion, stage 1 candidate, dense tissue, lung parenchyma, blob candidate, listed
    non-nodule)."""

    case: np.ndarray
    centers: np.ndarray
    labels: np.ndarray
    source: np.ndarray

    def counts(self) -> dict[str, int]:
        """How many samples of each source (and of each label among the stage 1 and blob candidates)."""
        out = {name: int((self.source == i).sum()) for i, name in enumerate(SAMPLE_SOURCES)}
        out["candidate_hits"] = int(((self.source == 1) & (self.labels == 1)).sum())
        out["blob_hits"] = int(((self.source == 4) & (self.labels == 1)).sum())
        return out


#: Where stage 2 samples come from (``Stage2Samples.source``).
SAMPLE_SOURCES = ("lesion", "stage1_candidate", "dense_tissue", "parenchyma", "blob_candidate", "listed_candidate")


def _hits(center: np.ndarray, balls: Sequence[tuple[np.ndarray, float]], min_radius: float = 0.0) -> bool:
    return any(np.linalg.norm(center - np.asarray(p)) < max(r, min_radius) for p, r in balls)


def mine_candidates(model: NoduleModel, cases: Sequence[PreparedCase], rng: np.random.Generator,
                    device: str = "cpu", jitter_mm: float = 2.0, positives_per_lesion: int = 4,
                    dense_per_case: int = 150, parenchyma_per_case: int = 50,
                    listed_per_case: int = 300) -> Stage2Samples:
    """Stage 2 samples of every case: stage 1's candidates and blob-filter proposals (``Detector.blob_candidates``,
    when the model has them; a hit lies within a lesion's radius), jittered
    lesion centres, and negatives drawn from the host's own tissue inside the lung mask (``dense_per_case``
    points of tissue over ``DENSE_HU``, ``parenchyma_per_case`` points anywhere), away from lesions and
    ignore regions, and up to ``listed_per_case`` of the case's listed non-nodules (``TrainingCase.negatives``,
    e.g. LUNA16's class-0 candidates) away from them too. The tissue negatives matter most when stage 1 has learnt
    the training hosts so well that it proposes almost nothing but the lesions there, as it does with one host
    scan."""
    detector = Detector(model, device=device)
    lo, hi = model.config.hu_window
    rows: list[tuple[int, np.ndarray, int, int]] = []  # case, centre, label, source
    for n, c in enumerate(cases):
        prob, logit = detector.stage1_maps(c.prep.image, c.prep.lung)
        cands, regions = detector.candidates(prob, c.prep.lung, c.prep.geometry, logit=logit)
        blobs = detector.blob_candidates(c.prep, prob, regions, logit)
        lesion_balls = [(p, d / 2) for p, d in c.case.lesions]
        for source, found in ((1, cands), (4, blobs)):
            for cand in found:
                hit = _hits(cand.center_lps, lesion_balls, MIN_HIT_RADIUS_MM)
                if not hit and _hits(cand.center_lps, c.case.ignore):
                    continue
                rows.append((n, np.asarray(cand.center_lps), int(hit), source))
        for p, _d in c.case.lesions:
            for _ in range(positives_per_lesion):
                rows.append((n, np.asarray(p) + np.clip(rng.normal(0, jitter_mm / 2, 3), -jitter_mm, jitter_mm), 1, 0))
        clear = [(p, d / 2 + 3.0) for p, d in c.case.lesions] + list(c.case.ignore)
        dense = c.prep.lung & (c.prep.image >= (DENSE_HU - lo) / (hi - lo))
        for source, mask, count in ((2, dense, dense_per_case), (3, c.prep.lung, parenchyma_per_case)):
            voxels = np.argwhere(mask)
            if len(voxels) == 0 or count == 0:
                continue
            picked = voxels[rng.choice(len(voxels), min(count, len(voxels)), replace=False)]
            for p in c.prep.geometry.index_to_lps(picked[:, ::-1].astype(float)).reshape(-1, 3):
                if not _hits(p, clear):
                    rows.append((n, p, 0, source))
        listed = [p for p in c.case.negatives if not _hits(p, clear)]
        if listed and listed_per_case > 0:
            for i in sorted(rng.choice(len(listed), min(listed_per_case, len(listed)), replace=False)):
                rows.append((n, listed[i], 0, 5))
    return Stage2Samples(np.array([r[0] for r in rows], int), np.array([r[1] for r in rows], float).reshape(-1, 3),
                         np.array([r[2] for r in rows], int), np.array([r[3] for r in rows], int))


def validation_scores(model: NoduleModel, cases: Sequence[PreparedCase], use_stage2: bool,
                      device: str = "cpu") -> ValidationScores:
    """Both stages' outputs on the candidates of the validation cases (stage 2: zeros unless ``use_stage2``), with
    their shape (dot filter) when the model weighs it (``Stage1Config.dot_weight``)."""
    detector = Detector(model, device=device)
    t = model.config.stage1.candidate_threshold
    with_dot = model.config.stage1.dot_weight > 0
    return ValidationScores.concat([scan_scores(detector, c.case.name, c.case.volume, c.prep, (t,), use_stage2,
                                                with_dot=with_dot)[t] for c in cases])


def validation_findings(cases: Sequence[PreparedCase]) -> list[Finding]:
    """Lesions as LUNA16 nodules and ignore regions as excluded findings of the validation cases."""
    out = []
    for c in cases:
        out += [Finding(c.case.name, tuple(map(float, p)), float(d), "nodule") for p, d in c.case.lesions]
        out += [Finding(c.case.name, tuple(map(float, p)), 2.0 * float(r), "excluded") for p, r in c.case.ignore]
    return out


StepHook = Callable[[str, int, int, float], bool]


class Trainer:
    """Trains both stages of ``model`` on prepared cases; see the module docs for the recipe.

    Args:
        model: networks and config (trained in place).
        train_cases, val_cases: prepared cases (``prepare_case``); validation may be empty.
        settings: schedules, budget, validation.
        device: ``cpu`` or ``cuda`` (mixed precision on CUDA).
        hook: ``hook(stage, step, steps, loss) -> keep_going``, called after every step (logging,
            checkpoints, Stop).
        rank, world_size: ``torchrun`` process rank and count (1: no distribution).
    """

    def __init__(self, model: NoduleModel, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase],
                 settings: TrainSettings, device: str = "cpu", hook: StepHook | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.model = model
        self.train_cases = list(train_cases)
        self.val_cases = list(val_cases)
        self.settings = settings
        self.device = torch.device(device)
        self.hook = hook
        self.rank, self.world_size = rank, world_size
        self.started = time.perf_counter()
        self.history: list[dict] = []
        self.weight_cpm: dict[float, float] = {}  # validation CPM per stage 2 weight (``choose_threshold``)
        self.val_findings = validation_findings(self.val_cases)
        self._format = torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format

    # ------------------------------------------------------------------ helpers
    def _wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        net.to(self.device).train()
        if self.device.type == "cpu":  # oneDNN convolutions train about 1.7x faster channels-last
            net.to(memory_format=torch.channels_last_3d)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return net

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def _budget_left(self, share: float) -> bool:
        budget = self.settings.time_budget_s
        return budget is None or time.perf_counter() - self.started < share * budget

    def validate(self, use_stage2: bool) -> float | None:
        """CPM on the validation cases (``None`` without validation cases)."""
        if not self.val_cases or not self.val_findings:
            return None
        self.model.stage1.eval()
        self.model.stage2.eval()
        scores = validation_scores(self.model, self.val_cases, use_stage2, device=str(self.device))
        cands = scores.candidates(self.model.config.stage2.weight if use_stage2 else None,
                                  self.model.config.stage1.score_temperature, self.model.config.stage1.dot_weight)
        scans = [c.case.name for c in self.val_cases]
        return evaluate(self.val_findings, cands, scans, n_bootstrap=0).cpm

    def _optimise(self, stage: str, net: torch.nn.Module, batch_fn, loss_fn, schedule: StageSchedule,
                  state: dict | None, checkpoint: Callable[[dict], None] | None) -> None:
        wrapped = self._wrap(net)
        opt = torch.optim.AdamW(net.parameters(), lr=schedule.lr, weight_decay=1e-4)
        lr_sched = (torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0) if schedule.constant_lr else
                    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=schedule.lr, total_steps=max(schedule.steps, 1)))
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        rng = np.random.default_rng([self.settings.seed, self.rank, PHASE_STREAMS[stage]])
        budget_share = PHASE_BUDGET_SHARES[stage]
        start, best, best_state, stale = 0, -1.0, None, 0
        average = WeightAverage() if schedule.average_from else None
        if state is not None and state.get("stage") == stage:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            lr_sched.load_state_dict(state["sched"])
            rng.bit_generator.state = state["rng"]
            start, best, stale = int(state["step"]), float(state["best"]), int(state["stale"])
            best_state = state.get("best_net") or None
            if average is not None:
                average = WeightAverage(state.get("average"))
        every = self.settings.validate_every or schedule.steps
        for step in range(start, schedule.steps):
            x, *rest = batch_fn(rng)
            with self._autocast():
                out = wrapped(x.to(self.device, non_blocking=True).to(memory_format=self._format))
                loss = loss_fn(out.float(), *[r.to(self.device) for r in rest])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            lr_sched.step()
            value = float(loss.detach())
            if average is not None and step + 1 >= schedule.average_from:
                average.update(net)
            record = {"stage": stage, "step": step + 1, "steps": schedule.steps, "loss": value, "val_cpm": None}
            last = step + 1 == schedule.steps or not self._budget_left(budget_share)
            if (step + 1) % every == 0 or last:
                live = None
                if average is not None and average.count:  # validate (and keep) the mean, then train on
                    live = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    bn_rng = np.random.default_rng([self.settings.seed, self.rank, 3])
                    average.apply(net, (batch_fn(bn_rng)[0].to(self.device) for _ in range(BN_BATCHES)))
                cpm = self.validate(use_stage2=stage == "stage2")
                record["val_cpm"] = cpm
                if cpm is None or cpm > best:
                    best, stale = (cpm if cpm is not None else best), 0
                    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                else:
                    stale += 1
                if live is not None:
                    net.load_state_dict(live)
                net.train()
                log.info("%s step %d: loss %.4f, validation CPM %s", stage, step + 1, value,
                         "n/a" if cpm is None else f"{cpm:.3f}")
                if checkpoint is not None:
                    checkpoint({"stage": stage, "step": step + 1, "net": net.state_dict(), "opt": opt.state_dict(),
                                "sched": lr_sched.state_dict(), "rng": rng.bit_generator.state, "best": best,
                                "stale": stale, "best_net": best_state or {},
                                "average": average.state() if average is not None else {}})
            self.history.append(record)
            keep_going = self.hook(stage, step + 1, schedule.steps, value) if self.hook else True
            if record["val_cpm"] is not None and self.hook:
                self.hook("validation", step + 1, schedule.steps, float(record["val_cpm"]))
            if not keep_going or last or stale >= self.settings.patience:
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()

    # ------------------------------------------------------------------ stages
    def train(self, state: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> Stage2Samples:
        """Run stage 1, its refinement (when ``stage1_refine`` has steps) and stage 2 in that order, from the
        phase of a checkpoint's ``state`` on; return stage 2's samples."""
        start = PHASES.index(state["stage"]) if state else 0
        if start == 0:
            self.train_stage1(state, checkpoint)
        if start <= 1 and self.settings.stage1_refine.steps:
            self.train_stage1(state, checkpoint, refine=True)
        return self.train_stage2(state, checkpoint)

    def train_stage1(self, state: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                     refine: bool = False) -> None:
        """Optimise the U-net (patches of the working grid, BCE + soft Dice, ignore regions masked) with the
        ``stage1`` schedule, or, with ``refine``, go on from its result with the ``stage1_refine`` one."""
        s = self.settings
        phase, schedule = ("stage1_refine", s.stage1_refine) if refine else ("stage1", s.stage1)
        size = -(-s.patch1 // self.model.stage1.divisor) * self.model.stage1.divisor
        aug = (stage1_augmentation(self.model.config.stage1.spacing_mm, s.thick_slices, s.scanner_augmentation,
                                   s.elastic_mm, s.random_convolution) if s.augment else None)
        # Lesion patches are centred near a lesion voxel or, when balancing lesions, near a lesion drawn uniformly
        # (``draw`` None: the draw of every run before ``small_attached_weight`` existed) or by those weights.
        lesion_centres = [c.centres if s.balance_lesions and len(c.centres) else np.argwhere(c.target > 0)
                          for c in self.train_cases]
        weighted = s.balance_lesions and s.small_attached_weight != 1.0
        draw = [c.draw_weights(s.small_attached_weight) if weighted and len(c.centres) else None
                for c in self.train_cases]
        draw = [None if p is None else p / p.sum() for p in draw]
        lung_voxels = [np.argwhere(c.prep.lung) for c in self.train_cases]
        dots = [dot_negatives(c) if s.dot_negative_fraction > 0 else np.empty((0, 3), int) for c in self.train_cases]
        if s.dot_negative_fraction > 0:
            log.info("stage 1: %d bright compact spots away from lesions for negative patches",
                     sum(len(d) for d in dots))

        def one(rng: np.random.Generator) -> list[np.ndarray]:
            n = int(rng.integers(len(self.train_cases)))
            c = self.train_cases[n]
            if rng.random() < s.positive_fraction and len(lesion_centres[n]):
                jitter = rng.integers(-size // 4, size // 4 + 1, 3)
                pick = rng.integers(len(lesion_centres[n])) if draw[n] is None else rng.choice(len(draw[n]), p=draw[n])
                centre = lesion_centres[n][pick] + jitter
            elif len(dots[n]) and rng.random() < s.dot_negative_fraction:
                centre = dots[n][rng.integers(len(dots[n]))] + rng.integers(-size // 4, size // 4 + 1, 3)
            elif len(lung_voxels[n]):
                centre = lung_voxels[n][rng.integers(len(lung_voxels[n]))]
            else:
                centre = rng.integers(0, c.prep.image.shape)
            img, tgt, w = crop_patches([c.stage1_image, c.target, c.weight], centre, size)
            if not s.balance_lesions:
                w = np.minimum(w, 1.0)
            if aug is not None:  # one label map carries all: 0 = background, 1 = ignored, k >= 2 = lesion of weight k-1
                label = np.where(w == 0, 1, np.where(tgt > 0, 1 + w, 0)).astype(np.uint8)
                img, label = aug(img, label, rng)
                tgt, w = label >= 2, np.where(label == 1, 0.0, np.maximum(label.astype(np.float32) - 1.0, 1.0))
            return [np.ascontiguousarray(a, dtype=np.float32) for a in (img, tgt, w)]

        def batch(rng: np.random.Generator):
            items = [one(rng) for _ in range(schedule.batch)]
            return [torch.from_numpy(np.stack([it[i] for it in items]))[:, None] for i in range(3)]

        loss = functools.partial(_loss_stage1, focal_gamma=s.stage1_focal_gamma)
        self._optimise(phase, self.model.stage1, batch, loss, schedule, state, checkpoint)

    def train_stage2(self, state: dict | None = None,
                     checkpoint: Callable[[dict], None] | None = None) -> Stage2Samples:
        """Mine candidates with the trained stage 1, then optimise the classifier on balanced batches."""
        s = self.settings
        cfg = self.model.config.stage2
        samples = mine_candidates(self.model, self.train_cases, np.random.default_rng(s.seed + 2), str(self.device),
                                  dense_per_case=s.tissue_negatives)
        pos = np.flatnonzero(samples.labels == 1)
        neg = np.flatnonzero(samples.labels == 0)
        log.info("stage 2: %d positives, %d negatives (%s)", len(pos), len(neg), samples.counts())
        if len(pos) == 0:
            raise ValueError("no positive samples for stage 2: the training cases have no lesions")
        augs = [stage2_augmentation(sc, s.stage2_rotate, s.stage2_random_convolution) if s.augment else None
                for sc in cfg.scales_mm]

        def batch(rng: np.random.Generator):
            half = s.stage2.batch // 2
            idx = np.concatenate([rng.choice(pos, half), rng.choice(neg if len(neg) else pos, s.stage2.batch - half)])
            patches = []
            for i in idx:
                vol = self.train_cases[samples.case[i]].case.volume
                centre = samples.centers[i] + rng.normal(0, 1.0, 3)
                flip_seed = int(rng.integers(2**31))
                scales = []
                for sc, aug in zip(cfg.scales_mm, augs):
                    p = sample_patches(vol.array, vol.geometry, centre[None], cfg.patch, sc)[0]
                    if aug is not None:  # the same geometric draw at both scales
                        p, _ = aug(p, None, np.random.default_rng(flip_seed))
                    scales.append(normalize_hu(p, *self.model.config.hu_window))
                patches.append(np.stack(scales))
            return torch.from_numpy(np.stack(patches)), torch.from_numpy(samples.labels[idx].astype(np.float32))

        self._optimise("stage2", self.model.stage2, batch, F.binary_cross_entropy_with_logits, s.stage2, state,
                       checkpoint)
        return samples

    def choose_threshold(self) -> float | None:
        """Pick the stage weight (``Stage2Config.weight``) with the best validation CPM, then the default threshold
        for it; set both in the model config and return the threshold (``None`` without validation cases)."""
        if not self.val_cases or not self.val_findings:
            return None
        scores = validation_scores(self.model, self.val_cases, True, device=str(self.device))
        t = self.model.config.stage1.candidate_threshold
        point = choose_operating_point(self.val_findings, {t: scores}, [c.case.name for c in self.val_cases],
                                       self.settings.target_fp_per_scan,
                                       temperatures=(self.model.config.stage1.score_temperature,),
                                       dot_weights=(self.model.config.stage1.dot_weight,),
                                       spare_large=self.model.config.stage2.spare_large)
        self.weight_cpm = {w: cpm for (_, _, w, _, _), (cpm, _, _) in point.grid.items()}
        self.model.config.stage2.weight = point.weight
        self.model.config.threshold = point.threshold
        return point.threshold


class WeightAverage:
    """Running mean of a network's parameters over training steps (stochastic weight averaging, Izmailov et al.
    2018: a mean of the weights a constant learning rate visits lies in a flatter part of the loss surface, which
    tends to generalise better). Batch-norm statistics do not average: ``apply`` recomputes them for the mean."""

    def __init__(self, state: dict | None = None) -> None:
        self.mean: dict[str, torch.Tensor] = dict(state["mean"]) if state else {}
        self.count = int(state["count"]) if state else 0

    def update(self, net: torch.nn.Module) -> None:
        """Add the network's present parameters to the mean."""
        self.count += 1
        with torch.no_grad():
            for name, value in net.named_parameters():
                if name not in self.mean:
                    self.mean[name] = value.detach().float().clone()
                else:
                    self.mean[name] += (value.detach().float() - self.mean[name]) / self.count

    def apply(self, net: torch.nn.Module, inputs: Iterable[torch.Tensor]) -> None:
        """Load the mean into ``net`` and recompute its batch-norm statistics over ``inputs`` (training batches,
        forward only)."""
        with torch.no_grad():
            for name, value in net.named_parameters():
                value.copy_(self.mean[name])
        torch.optim.swa_utils.update_bn(inputs, net)

    def state(self) -> dict:
        """For checkpoints (tensors and an int only)."""
        return {"mean": {k: v.clone() for k, v in self.mean.items()}, "count": self.count}


def _loss_stage1(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 focal_gamma: float = 0.0) -> torch.Tensor:
    """Voxel-weighted binary cross-entropy (≥ 0) + voxel-weighted soft Dice loss (in [0, 1] for a 0/1 target).

    ``focal_gamma`` > 0: each voxel's cross-entropy is scaled by ``(1 - p_t) ** focal_gamma``, ``p_t`` the
    probability it gives the voxel's true class (the focal loss of Lin et al., 2017: voxels already classified
    well weigh little, so the hard ones, faint small lesions and lesion-like vessels, weigh more).
    """
    p = torch.sigmoid(logits)
    if focal_gamma > 0:
        p_true = torch.where(target > 0.5, p, 1 - p)
        voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (1 - p_true).pow(focal_gamma)
        bce = (weight * voxel).sum() / weight.sum().clamp(min=1)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
        bce = bce / weight.sum().clamp(min=1)
    dice = 1 - (2 * (weight * p * target).sum() + 1) / ((weight * p).sum() + (weight * target).sum() + 1)
    return bce + dice


def train_model(cases: Sequence[TrainingCase], model: NoduleModel, settings: TrainSettings | None = None,
                val_cases: Sequence[TrainingCase] = (), hook: StepHook | None = None) -> NoduleModel:
    """Train both stages on ``cases`` in memory (no files) and return the model in eval mode."""
    settings = settings or TrainSettings()
    trainer = Trainer(model, [prepare_case(c, model, settings.min_target_mm, settings.min_target_ignores_dense)
                              for c in cases],
                      [prepare_case(c, model) for c in val_cases],
                      settings, hook=hook)
    trainer.train()
    trainer.choose_threshold()
    return model


def phantom_cases(n: int, seed: int = 0, **phantom_kwargs) -> list[TrainingCase]:
    """``n`` synthetic phantom cases (see ``synthetic.make_phantom``) for tests and smoke runs."""
    from .synthetic import make_phantom

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ph = make_phantom(rng, name=f"phantom-{seed}-{i}", **phantom_kwargs)
        out.append(TrainingCase(ph.volume, ph.label_map, ph.nodules, name=ph.volume.name))
    return out
