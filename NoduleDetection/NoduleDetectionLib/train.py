"""Training both stages on annotated cases.

A ``TrainingCase`` is a CT with a lesion label map (the targets) and ignore regions (findings that are
neither positive nor negative, e.g. LUNA16's excluded findings). Training is done in two steps:

1. **Stage 1** (U-net): cubic patches of the working grid, half centred near lesions, half anywhere in
   the lungs; loss = binary cross-entropy + soft Dice, ignore regions masked out of both.
2. **Stage 2** (3D CNN): stage 1 runs over every case; its candidates that fall on a lesion are
   positives, the others (vessels, airways, pleura of the real host scans) are the mined hard negatives,
   and candidates inside ignore regions are dropped. True lesion centres (jittered) are added as
   positives. Loss = binary cross-entropy on class-balanced batches.

The same functions train the tiny test models on phantoms and the shipped model on real host scans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .detect import Detector
from .models import ModelConfig, NoduleModel
from .preprocess import Prepared, normalize_hu, prepare, resample, sample_patches
from .volume import CTVolume

log = logging.getLogger(__name__)


@dataclass
class TrainingCase:
    """One annotated scan.

    Attributes:
        volume: CT in HU.
        label_map: ``[k, j, i]`` on the input grid, > 0 on lesion voxels.
        lesions: ``(center_lps, diameter_mm)`` of each lesion.
        ignore: ``(center_lps, radius_mm)`` regions that are neither positive nor negative.
    """

    volume: CTVolume
    label_map: np.ndarray
    lesions: list[tuple[np.ndarray, float]]
    ignore: list[tuple[np.ndarray, float]] = field(default_factory=list)


@dataclass
class StageSchedule:
    """Optimisation settings of one stage: ``steps`` of ``batch`` samples at learning rate ``lr``."""

    steps: int = 200
    batch: int = 4
    lr: float = 1e-3


@dataclass
class TrainSettings:
    """Settings of a training run. ``patch1``: stage 1 patch edge (working-grid voxels)."""

    stage1: StageSchedule = field(default_factory=StageSchedule)
    stage2: StageSchedule = field(default_factory=lambda: StageSchedule(steps=200, batch=32))
    patch1: int = 48
    positive_fraction: float = 0.5
    seed: int = 0


@dataclass
class _PreparedCase:
    case: TrainingCase
    prep: Prepared
    target: np.ndarray   # float32 [k, j, i] lesion target on the working grid
    weight: np.ndarray   # float32 [k, j, i] 0 inside ignore regions, 1 elsewhere


def _sphere_mask(shape: tuple[int, ...], prep: Prepared, centers: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """``bool [k, j, i]`` on the working grid: union of balls (LPS centre, radius mm)."""
    mask = np.zeros(shape, bool)
    sp = np.asarray(prep.geometry.spacing)
    for centre, radius in centers:
        c = prep.geometry.lps_to_index(np.asarray(centre))
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


def prepare_case(case: TrainingCase, config: ModelConfig) -> _PreparedCase:
    """Bring a case to the working grid (same preprocessing as detection) with its target and weights."""
    prep = prepare(case.volume, config.stage1.spacing_mm, config.hu_window)
    start = (prep.crop[2].start, prep.crop[1].start, prep.crop[0].start)
    target, _ = resample((case.label_map[prep.crop] > 0).astype(np.float32),
                         case.volume.geometry.cropped(start), config.stage1.spacing_mm)
    weight = np.ones(prep.image.shape, np.float32)
    if case.ignore:
        weight[_sphere_mask(prep.image.shape, prep, case.ignore)] = 0.0
    return _PreparedCase(case, prep, (target >= 0.5).astype(np.float32), weight)


def _crop_patch(arrays: Sequence[np.ndarray], centre: np.ndarray, size: int, fill: Sequence[float]) -> list[np.ndarray]:
    """Cut ``size``³ patches centred at ``centre`` ``[k, j, i]`` from arrays of one shape (pad with ``fill``)."""
    shape = np.array(arrays[0].shape)
    lo = np.round(centre).astype(int) - size // 2
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, shape)
    out = []
    for a, f in zip(arrays, fill):
        p = np.full((size, size, size), f, np.float32)
        d_lo = src_lo - lo
        d_hi = d_lo + (src_hi - src_lo)
        p[d_lo[0]:d_hi[0], d_lo[1]:d_hi[1], d_lo[2]:d_hi[2]] = a[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1],
                                                              src_lo[2]:src_hi[2]]
        out.append(p)
    return out


def _augment_flips(batch: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Random flips along each axis and a random axial 90° rotation, the same for all arrays given."""
    axes = [a for a in range(3) if rng.random() < 0.5]
    k = int(rng.integers(4))
    return [np.ascontiguousarray(np.rot90(np.flip(a, axes) if axes else a, k, axes=(1, 2))) for a in batch]


def _stage1_sampler(cases: list[_PreparedCase], size: int, positive_fraction: float, rng: np.random.Generator):
    lesion_voxels = [np.argwhere(c.target > 0) for c in cases]
    lung_voxels = [np.argwhere(c.prep.lung) for c in cases]

    def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = int(rng.integers(len(cases)))
        c = cases[n]
        if rng.random() < positive_fraction and len(lesion_voxels[n]):
            centre = lesion_voxels[n][rng.integers(len(lesion_voxels[n]))] + rng.integers(-size // 4, size // 4 + 1, 3)
        elif len(lung_voxels[n]):
            centre = lung_voxels[n][rng.integers(len(lung_voxels[n]))]
        else:
            centre = rng.integers(0, c.prep.image.shape)
        img, tgt, w = _crop_patch([c.prep.image, c.target, c.weight], centre, size, (0.0, 0.0, 0.0))
        return tuple(_augment_flips([img, tgt, w], rng))

    return sample


def _loss_stage1(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp(min=1)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


def train_stage1(model: NoduleModel, cases: list[_PreparedCase], settings: TrainSettings,
                 progress: Callable[[str, int, int, float], None] | None = None) -> list[float]:
    """Optimise the U-net; returns the loss per step. ``progress(stage, step, steps, loss)``."""
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    sched = settings.stage1
    size = -(-settings.patch1 // model.stage1.divisor) * model.stage1.divisor
    sample = _stage1_sampler(cases, size, settings.positive_fraction, rng)
    net = model.stage1.train()
    opt = torch.optim.AdamW(net.parameters(), lr=sched.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sched.lr, total_steps=max(sched.steps, 1))
    losses = []
    for step in range(sched.steps):
        batch = [sample() for _ in range(sched.batch)]
        img, tgt, w = (torch.from_numpy(np.stack([b[i] for b in batch]))[:, None] for i in range(3))
        loss = _loss_stage1(net(img), tgt, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("stage1", step + 1, sched.steps, losses[-1])
    net.eval()
    return losses


@dataclass
class Stage2Samples:
    """Candidate centres (LPS mm) with labels 1 (lesion) / 0 (hard negative), per case index."""

    case: np.ndarray
    centers: np.ndarray
    labels: np.ndarray


def mine_candidates(model: NoduleModel, cases: list[_PreparedCase], rng: np.random.Generator,
                    jitter_mm: float = 2.0, positives_per_lesion: int = 4) -> Stage2Samples:
    """Run stage 1 over every case and label its candidates (hit = within the lesion's radius)."""
    detector = Detector(model, device="cpu")
    case_ids, centres, labels = [], [], []
    for n, c in enumerate(cases):
        prob = detector.probability_map(c.prep.image)
        cands, _ = detector.candidates(prob, c.prep.lung, c.prep.geometry)
        for cand in cands:
            d_lesion = [np.linalg.norm(cand.center_lps - np.asarray(p)) < max(d / 2, 3.0) for p, d in c.case.lesions]
            d_ignore = [np.linalg.norm(cand.center_lps - np.asarray(p)) < r for p, r in c.case.ignore]
            if any(d_ignore) and not any(d_lesion):
                continue
            case_ids.append(n)
            centres.append(cand.center_lps)
            labels.append(1 if any(d_lesion) else 0)
        for p, _d in c.case.lesions:
            for _ in range(positives_per_lesion):
                case_ids.append(n)
                centres.append(np.asarray(p) + rng.normal(0, jitter_mm / 2, 3).clip(-jitter_mm, jitter_mm))
                labels.append(1)
    return Stage2Samples(np.array(case_ids, int), np.array(centres, float).reshape(-1, 3), np.array(labels, int))


def train_stage2(model: NoduleModel, cases: list[_PreparedCase], samples: Stage2Samples, settings: TrainSettings,
                 progress: Callable[[str, int, int, float], None] | None = None) -> list[float]:
    """Optimise the classifier on mined candidates with class-balanced batches; returns losses."""
    rng = np.random.default_rng(settings.seed + 1)
    torch.manual_seed(settings.seed + 1)
    cfg = model.config.stage2
    sched = settings.stage2
    pos = np.flatnonzero(samples.labels == 1)
    neg = np.flatnonzero(samples.labels == 0)
    if len(pos) == 0:
        raise ValueError("no positive samples for stage 2: the cases have no lesions")
    net = model.stage2.train()
    opt = torch.optim.AdamW(net.parameters(), lr=sched.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sched.lr, total_steps=max(sched.steps, 1))
    losses = []
    for step in range(sched.steps):
        half = sched.batch // 2
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, sched.batch - half) if len(neg) else
                              rng.choice(pos, sched.batch - half)])
        patches = []
        for i in idx:
            vol = cases[samples.case[i]].case.volume
            centre = samples.centers[i] + rng.normal(0, 1.0, 3)
            scales = [sample_patches(vol.array, vol.geometry, centre[None], cfg.patch, s)[0] for s in cfg.scales_mm]
            patches.append(_augment_flips([normalize_hu(np.stack(scales), *model.config.hu_window)], rng)[0])
        x = torch.from_numpy(np.stack(patches))
        y = torch.from_numpy(samples.labels[idx].astype(np.float32))
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("stage2", step + 1, sched.steps, losses[-1])
    net.eval()
    return losses


def train_model(cases: Sequence[TrainingCase], config: ModelConfig | None = None,
                settings: TrainSettings | None = None,
                progress: Callable[[str, int, int, float], None] | None = None) -> NoduleModel:
    """Train both stages from scratch on ``cases`` and return the model (eval mode)."""
    config = config or ModelConfig()
    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    model = NoduleModel.build(config, seed=settings.seed)
    prepared = [prepare_case(c, config) for c in cases]
    train_stage1(model, prepared, settings, progress)
    samples = mine_candidates(model, prepared, np.random.default_rng(settings.seed + 2))
    log.info("stage 2: %d positives, %d hard negatives", int(samples.labels.sum()),
             int((samples.labels == 0).sum()))
    train_stage2(model, prepared, samples, settings, progress)
    config.card.setdefault("training_seconds", round(time.perf_counter() - t0, 1))
    return model


def phantom_cases(n: int, seed: int = 0, **phantom_kwargs) -> list[TrainingCase]:
    """``n`` synthetic phantom cases (see ``synthetic.make_phantom``) for tests and smoke runs."""
    from .synthetic import make_phantom

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ph = make_phantom(rng, **phantom_kwargs)
        out.append(TrainingCase(ph.volume, ph.label_map, ph.nodules))
    return out

