"""The chained detector: CT volume → nodules (LPS mm) and a label map on the input grid.

``Detector.detect`` is the one code path used by the command line, the Slicer logic, the evaluation
and the benchmark:

1. lung mask, crop to the lungs, resample to the working spacing (``preprocess.prepare``);
2. stage 1, the U-net, gives a nodule probability map (tiled, so memory stays bounded);
3. candidates are the connected regions of that map above ``candidate_threshold``, and the strongest
   ``blob_candidates`` spots of a classical blob filter outside them (``blobs``);
4. stage 2, the multi-scale 3D CNN, scores a fine and a coarse patch around each candidate; a finding's
   probability fuses both stages (``fuse_scores``) and, with ``dot_weight``, the shape of its region
   (``shape_prior``: compact balls keep their probability, vessels and branch points lose some);
5. the kept nodules are outlined on the input grid (stage 1 probability ≥ 0.5 inside the candidate's
   region), measured there (volume, equivalent-sphere diameter) and numbered by falling probability.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .blobs import TOPHAT_SIZE_MM, ShapeFilter, blob_outline, find_blobs
from .errors import NoduleDetectionError
from .features import DENSE_HU, FeatureModel, candidate_features
from .geometry import Geometry
from .io import validate_ct
from .masses import find_masses
from .models import ModelConfig, NoduleModel
from .preprocess import Prepared, crop_patches, lungs_only, normalize_hu, prepare, sample_patches
from .regions import region_centroids, region_counts, region_max, region_sums
from .registry import shipped_model_path
from .volume import CTVolume

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
CancelCallback = Callable[[], bool]

#: ``shape_prior``: dot filter values (``blobs.ShapeFilter.region_dotness``) from this up leave a probability
#: unchanged; the largest seen on 1125 candidates of 200 inserted validation lesions was 0.13.
DOT_FULL = 0.2
#: ``shape_prior``: added to every dot filter value, so that a region with none (a plate, a tube) keeps a little.
DOT_FLOOR = 0.005
#: ``shape_prior`` leaves findings whose stage 1 outline is at least this wide (mm, equivalent sphere) unchanged: the
#: dot filter works on a top-hat by a cube of ``blobs.TOPHAT_SIZE_MM``, which fits inside a ball from √3 times its
#: side on, so the top-hat keeps only the rim of such a ball and the filter cannot see the ball.
SHAPE_MAX_MM = TOPHAT_SIZE_MM * 3.0**0.5


class Cancelled(NoduleDetectionError):
    """The run was cancelled by the caller; nothing was produced."""


@dataclass
class Nodule:
    """One detected finding.

    Attributes:
        label: its value in the label map (1..N, N = number of findings).
        center_lps: centre in world LPS mm ``(x, y, z)``.
        diameter_mm: equivalent-sphere diameter of its outline in mm.
        volume_mm3: volume of its outline in mm³.
        probability: probability that it is a nodule (0..1; ``fuse_scores`` of both stages, then ``shape_prior``
            when the model weighs the shape); 1 for a mass found by morphology (``masses.find_masses``).
        kind: ``"nodule"``, or ``"mass"`` when larger than the model's mass diameter (30 mm).
    """

    label: int
    center_lps: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    probability: float
    kind: str = "nodule"


@dataclass
class DetectionResult:
    """What the detector found in one scan.

    Attributes:
        nodules: findings sorted by falling probability; ``nodules[n].label == n + 1``.
        label_map: ``uint16 [k, j, i]`` on the input grid; voxel value = nodule label, 0 = background.
        geometry: the input grid's geometry (LPS).
        name: scan name used for output files.
        series_uid: LUNA16 seriesuid of the scan.
        threshold: probability threshold that was applied.
        timings: seconds spent per stage.
        warnings: notes on the input (e.g. partial lung field).
        model_info: model name, format and card facts.
    """

    nodules: list[Nodule]
    label_map: np.ndarray
    geometry: Geometry
    name: str
    series_uid: str
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)


@dataclass
class Candidate:
    """A stage 1 proposal: region id on the working grid, centre (LPS mm), size and stage 1 score."""

    region: int
    center_lps: np.ndarray
    diameter_mm: float
    score: float


def fuse_scores(stage1: np.ndarray, stage2: np.ndarray, weight: float,
                outline_mm: np.ndarray | None = None) -> np.ndarray:
    """A finding's probability from its stage 1 score and stage 2 probability: ``s1 ** (1 - w) * s2 ** w``.

    ``outline_mm``: the findings' outline diameters (``outline_diameters``), given to spare large findings
    (``Stage2Config.spare_large``): those of at least ``SHAPE_MAX_MM`` keep their stage 1 score.
    """
    s1 = np.asarray(stage1, dtype=np.float64)
    s2 = np.asarray(stage2, dtype=np.float64)
    w = weight if outline_mm is None else np.where(np.asarray(outline_mm) >= SHAPE_MAX_MM, 0.0, weight)
    return (s1 ** (1.0 - w) * s2**w).astype(np.float32)


def shape_prior(probability: np.ndarray, dotness: np.ndarray, weight: float,
                outline_mm: np.ndarray | None = None) -> np.ndarray:
    """A finding's probability scaled by its region's shape: ``p * min(1, (dot + DOT_FLOOR) / DOT_FULL) ** weight``.

    ``dotness``: the highest Hessian dot filter value in the region (``blobs.ShapeFilter``; dimensionless, high
    for a compact ball, low for a vessel, a branch point or a fissure); ``weight`` 0 returns ``probability`` itself.
    ``outline_mm``: the findings' outline diameters (``outline_diameters``); those of at least ``SHAPE_MAX_MM`` keep
    their probability.
    """
    if weight == 0:
        return np.asarray(probability)
    factor = np.minimum(1.0, (np.asarray(dotness, np.float64) + DOT_FLOOR) / DOT_FULL)
    if outline_mm is not None:
        factor = np.where(np.asarray(outline_mm) >= SHAPE_MAX_MM, 1.0, factor)
    return np.asarray(probability, np.float64) * factor**weight


def outline_diameters(prob: np.ndarray, regions: np.ndarray, ids: Sequence[int], geometry: Geometry,
                      first_blob: int) -> np.ndarray:
    """Equivalent-sphere diameters (mm) of the stage 1 outlines of regions ``ids`` of the working-grid label map
    ``regions`` ``[k, j, i]`` (``geometry``: its grid, LPS): each region's voxels with stage 1 probability ``prob``
    at least 0.5, or all of them for a blob proposal (ids from ``first_blob``); ``float64 (len(ids),)``."""
    ids = np.asarray(ids, int).reshape(-1)
    if ids.size == 0:
        return np.zeros(0)
    labelled = regions > 0  # read the labelled voxels only: a small part of the grid
    labels = regions[labelled]
    core = labels[(prob[labelled] >= 0.5) | (labels >= first_blob)]
    return _equivalent_diameter(region_counts(core, ids), geometry)


def feature_prior(probability: np.ndarray, rating: np.ndarray, weight: float) -> np.ndarray:
    """A finding's probability weighed with its candidate-feature rating (``features.FeatureModel``):
    ``p ** (1 - weight) * rating ** weight``; ``weight`` 0 returns ``probability`` itself."""
    if weight == 0:
        return np.asarray(probability)
    return np.asarray(probability, np.float64) ** (1.0 - weight) * np.asarray(rating, np.float64) ** weight


def logit_score(max_logit: np.ndarray, temperature: float) -> np.ndarray:
    """A candidate's stage 1 score from its region's highest logit: ``sigmoid(max_logit / temperature)`` (float64)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(max_logit, np.float64) / temperature))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NoduleDetectionError("--device cuda was asked for, but no CUDA GPU is available to PyTorch")
    if device not in ("cpu", "cuda"):
        raise NoduleDetectionError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


#: Findings whose stage 1 outline is at least this wide (mm, equivalent sphere) are grown (``grow_outlines``) ...
GROW_FROM_MM = 12.0
#: ... into the connected voxels of at least this density (HU) ...
GROW_HU = DENSE_HU
#: ... up to this fraction of their radius away.
GROW_FRACTION = 0.5
#: One growing step: from a voxel to its 18 face and edge neighbours.
GROW_STEP = ndimage.generate_binary_structure(3, 2)

#: A stage 1 tile may hold up to this many times ``Stage1Config.tile ** 3`` voxels. Tiles are boxes, not cubes,
#: chosen per scan to cover the working grid with the fewest voxels computed (overlap included): on a chest CT
#: this halves the stage 1 work of fixed cubic tiles. Memory: about 0.27 kB per tile voxel on the CPU with the
#: default channels, so about 1.8 GB for the default 128³ × 3.2 (6.7 M voxels), enough for the lungs of most
#: chest CTs at 1.5 mm in one tile, which saves the overlap (a quarter of stage 1 on LIDC-IDRI-0002).
TILE_VOXELS_FACTOR = 3.2


def _axis_tiles(n: int, count: int, overlap: int, divisor: int) -> tuple[int, list[int]]:
    """Tile length (a multiple of ``divisor``) and evenly spaced starts of ``count`` tiles over ``n`` voxels that
    overlap by at least ``overlap``; ``n`` is a multiple of ``divisor``."""
    if count == 1:
        return n, [0]
    length = -(-(n + (count - 1) * overlap) // count)
    length = -(-length // divisor) * divisor
    return length, [round(t * (n - length) / (count - 1)) for t in range(count)]


def tile_layout(shape: tuple[int, ...], tile: int, divisor: int) -> tuple[tuple[int, ...], list[list[int]]]:
    """Box tiles for stage 1 over an image of ``shape`` ``[k, j, i]`` (each side a multiple of ``divisor``).

    Among tilings with at most ``TILE_VOXELS_FACTOR * tile ** 3`` voxels per tile and an overlap of at least
    ``tile // 4`` voxels between neighbours, the one computing the fewest voxels in all (then the fewest tiles).

    Returns:
        The tile shape ``[k, j, i]`` and, per axis, the tile starts.
    """
    overlap, budget = tile // 4, TILE_VOXELS_FACTOR * tile**3
    best = None
    for counts in itertools.product(range(1, 9), repeat=3):
        axes = [_axis_tiles(n, c, overlap, divisor) for n, c in zip(shape, counts)]
        lengths = tuple(a[0] for a in axes)
        if any(length > n for length, n in zip(lengths, shape)) or int(np.prod(lengths)) > budget:
            continue
        cost = (int(np.prod(counts)) * int(np.prod(lengths)), int(np.prod(counts)))
        if best is None or cost < best[0]:
            best = (cost, lengths, [a[1] for a in axes])
    if best is None:  # only for sides far beyond 8 tiles: fall back to cubic tiles of ``tile``
        starts = [[*range(0, n - tile, tile - overlap), n - tile] if n > tile else [0] for n in shape]
        return tuple(min(tile, n) for n in shape), starts
    return best[1], best[2]


def cpu_bf16_native() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _for_inference(net: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy of ``net`` on ``device`` with each BatchNorm folded into the convolution before it
    (same outputs up to float rounding, one pass less over every feature map) and in-place ReLUs.

    A copy, so that a model still being trained (validation during training) is left untouched.
    """
    net = copy.deepcopy(net).eval().to(device)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        for i, (conv, bn) in enumerate(zip(layers, layers[1:])):
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d) and bn.track_running_stats:
                scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
                fused = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bias=True).to(device)
                with torch.no_grad():
                    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1, 1))
                    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
                seq[i], seq[i + 1] = fused, nn.Identity()
        for i, layer in enumerate(seq):
            if isinstance(layer, nn.ReLU):
                seq[i] = nn.ReLU(inplace=True)
    return net


#: Patches (edge in working-grid voxels, how many, per batch) over which ``adapt_batch_norm`` measures a scan.
BN_ADAPT_PATCH, BN_ADAPT_PATCHES, BN_ADAPT_BATCH = 48, 8, 4


def adapt_batch_norm(net: nn.Module, image: np.ndarray, lung: np.ndarray | None, weight: float) -> nn.Module:
    """A copy of ``net`` whose batch-norm statistics are ``weight`` times those of ``image`` plus ``1 - weight``
    times its own (adaptive batch normalisation, Li et al. 2016: the scan re-measures what the network normalises
    by, without labels).

    The scan's statistics come from ``BN_ADAPT_PATCHES`` patches of ``image`` (a normalised working-grid image
    ``[k, j, i]``) centred on voxels of ``lung`` (same shape; ``None`` or empty: anywhere), drawn by a generator of
    fixed seed, so that the same scan always gives the same network.
    """
    rng = np.random.default_rng(0)
    where = np.flatnonzero(lung) if lung is not None else np.empty(0, np.int64)
    flat = (rng.choice(where, BN_ADAPT_PATCHES) if len(where)
            else rng.integers(0, image.size, BN_ADAPT_PATCHES))
    centres = np.stack(np.unravel_index(flat, image.shape), axis=1)
    patches = np.stack([crop_patches([image], c, BN_ADAPT_PATCH)[0] for c in centres])[:, None]
    adapted = copy.deepcopy(net)
    device = next(adapted.parameters()).device
    norms = [m for m in adapted.modules() if isinstance(m, nn.BatchNorm3d)]
    trained = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    batches = [torch.from_numpy(patches[i:i + BN_ADAPT_BATCH]).to(device)
               for i in range(0, len(patches), BN_ADAPT_BATCH)]
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, adapted)
        for m, (mean, var) in zip(norms, trained):
            m.running_mean.mul_(weight).add_(mean, alpha=1.0 - weight)
            m.running_var.mul_(weight).add_(var, alpha=1.0 - weight)
    return adapted.eval()


class Detector:
    """Two-stage lung nodule detector.

    Example:
        >>> from NoduleDetectionLib.io import read_ct           # doctest: +SKIP
        >>> detector = Detector.load()                           # doctest: +SKIP
        >>> result = detector.detect(read_ct("scan.nrrd"))       # doctest: +SKIP
        >>> [(n.center_lps, n.probability) for n in result.nodules]  # doctest: +SKIP
    """

    def __init__(self, model: NoduleModel, device: str = "auto", name: str = "model") -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.device = resolve_device(device)
        self.name = name
        self.model.stage1.eval().to(self.device)
        self.model.stage2.eval().to(self.device)
        # What inference runs: folded copies (see _for_inference), channels-last on the CPU.
        self.stage1 = _for_inference(self.model.stage1, self.device)
        self.stage2 = _for_inference(self.model.stage2, self.device)
        if self.device.type == "cpu":
            self.stage1.to(memory_format=torch.channels_last_3d)
            self.stage2.to(memory_format=torch.channels_last_3d)
            # Every CPU this process may use, unless OMP_NUM_THREADS says otherwise (torchrun sets it to 1
            # per process when it starts several on one machine).
            threads = os.environ.get("OMP_NUM_THREADS", "").strip()
            torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                                  else max(1, len(os.sched_getaffinity(0))))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto") -> Detector:
        """Load a model file (``None``: the shipped model) onto ``device`` (auto, cpu or cuda)."""
        path = shipped_model_path() if path is None else path
        return cls(NoduleModel.load(path), device=device, name=os.path.basename(str(path)))

    @property
    def threshold(self) -> float:
        """The model's default reporting threshold."""
        return self.config.threshold

    def _autocast(self, cpu_bf16: bool = False):
        """Float16 autocast on CUDA; on CPU bfloat16 when ``cpu_bf16`` and the CPU has it natively, else none."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16 and cpu_bf16_native())

    def probability_map(self, image: np.ndarray, lung: np.ndarray | None = None,
                        progress: ProgressCallback | None = None, cancel: CancelCallback | None = None) -> np.ndarray:
        """Stage 1 on a normalised working-grid image ``[k, j, i]`` → probability ``float32 [k, j, i]``."""
        return self.stage1_maps(image, lung, progress, cancel, logits=False)[0]

    def stage1_network(self, image: np.ndarray, lung: np.ndarray | None = None) -> nn.Module:
        """The U-net that runs on ``image``: the folded one, or with the model's ``bn_adapt`` its copy adapted to
        the image (``adapt_batch_norm``, patches centred in ``lung``)."""
        weight = self.config.stage1.bn_adapt
        if not weight:
            return self.stage1
        net = _for_inference(adapt_batch_norm(self.model.stage1, image, lung, weight), self.device)
        return net.to(memory_format=torch.channels_last_3d) if self.device.type == "cpu" else net

    def stage1_maps(self, image: np.ndarray, lung: np.ndarray | None = None,
                    progress: ProgressCallback | None = None, cancel: CancelCallback | None = None,
                    logits: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage 1 on a normalised working-grid image ``[k, j, i]`` → probability and mean logit ``float32 [k, j, i]``.

        ``lung``: the image's lung mask (same shape), where ``bn_adapt`` measures the scan, and outside which the
        U-net sees ``outside_lung_hu`` when the model sets it (then ``lung`` is required). Runs in overlapping box
        tiles (``tile_layout``), averaged where they overlap. The logit map is made when ``logits`` is true
        (``None``: when the model scores candidates by logits, ``score_temperature``), else it is ``None``.
        """
        fill = self.config.stage1.outside_lung_hu
        if fill is not None:
            if lung is None:
                raise ValueError("this model's stage 1 sees the lungs only (outside_lung_hu): pass the lung mask")
            image = lungs_only(image, lung, fill, self.config.hu_window)
        net = self.stage1_network(image, lung)
        if logits is None:
            logits = self.config.stage1.score_temperature is not None
        div = self.model.stage1.divisor
        pads = [(0, (-n) % div) for n in image.shape]
        padded = np.pad(image, pads, mode="constant", constant_values=0.0)
        acc = np.zeros(padded.shape, np.float32)
        acc_logit = np.zeros(padded.shape, np.float32) if logits else None
        cnt = np.zeros(padded.shape, np.float32)
        (tz, ty, tx), starts = tile_layout(padded.shape, self.config.stage1.tile, div)
        boxes = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        fmt = torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        with torch.inference_mode(), self._autocast(self.config.stage1.cpu_bf16):
            for n, (z, y, x) in enumerate(boxes):
                if cancel is not None and cancel():
                    raise Cancelled("detection cancelled")
                sl = (slice(z, z + tz), slice(y, y + ty), slice(x, x + tx))
                t = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None].to(self.device)
                out = net(t.to(memory_format=fmt)).float()
                acc[sl] += torch.sigmoid(out)[0, 0].cpu().numpy()
                if acc_logit is not None:
                    acc_logit[sl] += out[0, 0].cpu().numpy()
                cnt[sl] += 1.0
                if progress:
                    progress("stage 1 (U-net)", (n + 1) / len(boxes))
        crop = (slice(0, image.shape[0]), slice(0, image.shape[1]), slice(0, image.shape[2]))
        cnt = np.maximum(cnt, 1.0)
        prob = (acc / cnt)[crop]
        return prob, None if acc_logit is None else (acc_logit / cnt)[crop]

    def candidates(self, prob: np.ndarray, lung: np.ndarray, geometry: Geometry, threshold: float | None = None,
                   logit: np.ndarray | None = None) -> tuple[list[Candidate], np.ndarray]:
        """Connected regions of ``prob`` above ``threshold`` (default: the model's candidate threshold) inside
        the lung mask.

        A region's score is its highest probability or, with ``logit`` (``stage1_maps``) and the model's
        ``score_temperature`` T, ``sigmoid(max logit / T)``. Returns the candidates (highest score first, at most
        ``max_candidates``) and the region map ``int32 [k, j, i]`` on the working grid.
        """
        cfg = self.config.stage1
        threshold = cfg.candidate_threshold if threshold is None else threshold
        regions, n = ndimage.label((prob >= threshold) & lung)
        if n == 0:
            return [], regions
        index = np.arange(1, n + 1)
        score = self.region_scores(prob, regions, index, logit)
        centres_kji = region_centroids(prob, regions, index)
        core = region_sums(prob >= 0.5, regions, index)
        size = region_counts(regions, index)
        diam = _equivalent_diameter(np.where(core > 0, core, size), geometry)
        centres_lps = geometry.index_to_lps(centres_kji[:, ::-1])
        order = np.argsort(-score, kind="stable")[: cfg.max_candidates]
        cands = [Candidate(int(index[o]), centres_lps[o], float(diam[o]), float(score[o])) for o in order]
        return cands, regions

    def blob_candidates(self, prep: Prepared, prob: np.ndarray, regions: np.ndarray,
                        logit: np.ndarray | None = None, shapes: ShapeFilter | None = None) -> list[Candidate]:
        """The model's ``blob_candidates`` strongest blob-filter proposals (``blobs.find_blobs``) of a prepared scan
        outside the regions of ``regions``, each outlined there as a new region (``regions`` changed in place).

        A proposal is scored by stage 1's output over its outline as ``candidates`` scores a region (``prob``,
        or ``logit`` with the model's score temperature); its diameter is that of its outline. ``shapes``:
        ``blobs.ShapeFilter`` of ``prep.image``, if already made.
        """
        cfg = self.config.stage1
        if cfg.blob_candidates <= 0:
            return []
        free = regions == 0
        blobs = find_blobs(prep.image, prep.lung, prep.geometry, cfg.blob_candidates, exclude=~free, shapes=shapes)
        kept, counts = [], []
        region = int(regions.max())
        for n in range(len(blobs.kji)):
            box, mask = blob_outline(blobs, n, prep.geometry, free)
            if not mask.any():  # its peak was taken by an earlier, stronger proposal's outline
                continue
            region += 1
            regions[box][mask] = region
            free[box][mask] = False
            kept.append(n)
            counts.append(int(mask.sum()))
        if not kept:
            return []
        index = np.arange(region - len(kept) + 1, region + 1)
        score = self.region_scores(prob, regions, index, logit)
        diam = _equivalent_diameter(np.array(counts), prep.geometry)
        centres = prep.geometry.index_to_lps(blobs.kji[kept][:, ::-1].astype(float)).reshape(-1, 3)
        return [Candidate(int(r), c, float(d), float(v)) for r, c, d, v in zip(index, centres, diam, score)]

    def region_scores(self, prob: np.ndarray, regions: np.ndarray, index: np.ndarray,
                      logit: np.ndarray | None = None) -> np.ndarray:
        """Stage 1 score of the regions ``index`` of ``regions`` (working grid): the highest probability in each, or,
        with ``logit`` and the model's ``score_temperature`` T, ``sigmoid(max logit / T)``."""
        temperature = self.config.stage1.score_temperature
        if logit is not None and temperature is not None:
            return logit_score(region_max(logit, regions, index), temperature)
        return region_max(prob, regions, index)

    def classify(self, volume: CTVolume, centers_lps: np.ndarray, batch: int = 64) -> np.ndarray:
        """Stage 2 probabilities for candidate centres ``(N, 3)`` LPS mm, from the input HU volume."""
        cfg = self.config.stage2
        if len(centers_lps) == 0:
            return np.zeros(0, np.float32)
        scales = [
            normalize_hu(sample_patches(volume.array, volume.geometry, centers_lps, cfg.patch, s),
                         *self.config.hu_window)
            for s in cfg.scales_mm
        ]
        patches = np.stack(scales, axis=1)
        flips = [[a for a, bit in zip((2, 3, 4), f"{n:03b}") if bit == "1"] for n in range(8 if cfg.tta else 1)]
        out = []
        fmt = torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        with torch.inference_mode(), self._autocast():
            for b in range(0, len(patches), batch):
                t = torch.from_numpy(patches[b : b + batch]).to(self.device)
                logit = sum(self.stage2((t.flip(dims) if dims else t).to(memory_format=fmt)).float() for dims in flips)
                out.append(torch.sigmoid(logit / len(flips)).cpu().numpy())
        return np.concatenate(out)

    def feature_model(self) -> FeatureModel | None:
        """The model's candidate-feature model (``Stage2Config.features``), or ``None`` where it has none."""
        return FeatureModel.from_config(self.config.stage2.features) if self.config.stage2.features else None

    def candidate_features(self, prep: Prepared, shapes: ShapeFilter, regions: np.ndarray, cands: list[Candidate],
                           logit: np.ndarray, stage2: np.ndarray, dot: np.ndarray, first_blob: int) -> np.ndarray:
        """``features.candidate_features`` of candidates of a prepared scan (``regions``: their label map, ``logit``:
        stage 1's logit map, ``stage2``: their stage 2 probabilities, ``dot``: their regions' dot filter values;
        regions numbered ``first_blob`` and up are blob proposals); ``float64 (N, F)``."""
        ids = np.array([c.region for c in cands], int)
        centres = np.array([c.center_lps for c in cands], float).reshape(-1, 3)
        centres_kji = prep.geometry.lps_to_index(centres).reshape(-1, 3)[:, ::-1]
        return candidate_features(prep.image, prep.lung, shapes, regions, ids, centres_kji,
                                  region_max(logit, regions, ids), stage2, dot, ids >= first_blob,
                                  self.config.hu_window)

    def find_masses(self, prep: Prepared) -> list[np.ndarray]:
        """The masks ``bool [k, j, i]`` of the masses (``masses.find_masses``) of a prepared scan."""
        return find_masses(prep.image, prep.lung, prep.geometry, self.config.hu_window, self.config.mass_diameter_mm)

    def masses(self, prep: Prepared, prob: np.ndarray, regions: np.ndarray,
               found: list[np.ndarray] | None = None) -> list[Candidate]:
        """Masses of a prepared scan as candidates with score 1 (``found``: ``find_masses`` of it, if already made).

        Each mass becomes a region of ``regions`` (a new id, overwriting stage 1 regions there) with
        probability 1 in ``prob``; both arrays are changed in place.
        """
        out = []
        for mask in self.find_masses(prep) if found is None else found:
            region = int(regions.max()) + 1
            regions[mask] = region
            prob[mask] = 1.0
            voxels = np.argwhere(mask)
            centre = prep.geometry.index_to_lps(voxels.mean(axis=0)[::-1])
            diameter = float((6.0 * len(voxels) * np.prod(prep.geometry.spacing) / np.pi) ** (1.0 / 3.0))
            out.append(Candidate(region, centre, diameter, 1.0))
        return out

    @staticmethod
    def outside_masses(cands: list[Candidate], masses: list[Candidate], regions: np.ndarray,
                       geometry: Geometry) -> list[Candidate]:
        """The candidates whose centre lies outside every mass of ``regions`` (one centred in a mass is part of it)."""
        if not masses or not cands:
            return cands
        mass_ids = {m.region for m in masses}
        kji = np.round(geometry.lps_to_index(np.array([c.center_lps for c in cands]).reshape(-1, 3)))
        kji = np.clip(kji[:, ::-1].astype(int), 0, np.array(regions.shape) - 1)
        return [c for c, (k, j, i) in zip(cands, kji) if int(regions[k, j, i]) not in mass_ids]

    def _image_filters(self, prep: Prepared, shape_needed: bool) -> tuple[ShapeFilter | None, list[np.ndarray]]:
        """What ``detect`` computes from the prepared image alone: its shape filter, with the dot filter at the
        voxels where blobs are sought when the model proposes blobs, and its masses."""
        shapes = None
        if shape_needed:
            shapes = ShapeFilter(prep.image, prep.geometry)
            if self.config.stage1.blob_candidates > 0:
                shapes.dot(shapes.candidate_voxels(prep.lung))
        return shapes, self.find_masses(prep)

    def detect(self, volume: CTVolume, threshold: float | None = None,
               progress: ProgressCallback | None = None, cancel: CancelCallback | None = None) -> DetectionResult:
        """Find nodules in ``volume``.

        Args:
            volume: CT in HU with its LPS geometry.
            threshold: report findings with probability ≥ this (default: the model's threshold); a finding's
                probability is ``fuse_scores`` of its two stages' outputs.
            progress: called with ``(stage name, fraction done)``.
            cancel: polled between steps; returning true raises ``Cancelled``.

        Returns:
            ``DetectionResult`` with nodules in LPS mm and a label map on the input grid.
        """
        threshold = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise NoduleDetectionError(f"threshold must be between 0 and 1, got {threshold}")
        timings: dict[str, float] = {}

        def step(name: str, fraction: float) -> None:
            if cancel is not None and cancel():
                raise Cancelled("detection cancelled")
            if progress:
                progress(name, fraction)

        t0 = time.perf_counter()
        step("preprocess", 0.0)
        input_warnings = validate_ct(volume)
        prep = prepare(volume, self.config.stage1.spacing_mm, self.config.hu_window)
        timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        dot_weight = self.config.stage1.dot_weight
        feature_weight = self.config.stage2.feature_weight
        shape_needed = self.config.stage1.blob_candidates > 0 or dot_weight > 0 or feature_weight > 0
        # The shape filter and the masses need the image alone, so they run beside stage 1 (numpy and scipy release
        # the interpreter lock; on 2 CPU cores stage 1 alone leaves part of them idle). Same results as in turn.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-filters") as pool:
            filters = pool.submit(self._image_filters, prep, shape_needed)
            prob, logit = self.stage1_maps(prep.image, prep.lung, progress, cancel,
                                           logits=True if feature_weight else None)
            cands, regions = self.candidates(prob, prep.lung, prep.geometry, logit=logit)
            timings["stage1"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            step("blob filter", 0.0)
            shapes, found_masses = filters.result()
        blob_cands = self.blob_candidates(prep, prob, regions, logit, shapes)
        first_blob = blob_cands[0].region if blob_cands else int(regions.max()) + 1
        if blob_cands:  # the proposals' regions are numbered after stage 1's, the first lowest
            prob[regions >= first_blob] = 1.0  # a kept proposal is outlined by its region (``_outline``)
        cands += blob_cands
        timings["blobs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        step("masses", 0.0)
        masses = self.masses(prep, prob, regions, found_masses)
        cands = self.outside_masses(cands, masses, regions, prep.geometry)
        timings["masses"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        step("stage 2 (3D CNN)", 0.0)
        centres = np.array([c.center_lps for c in cands]).reshape(-1, 3)
        s2 = self.classify(volume, centres)
        ids = [c.region for c in cands]
        outline = (outline_diameters(prob, regions, ids, prep.geometry, first_blob)
                   if self.config.stage2.spare_large else None)
        p2 = fuse_scores([c.score for c in cands], s2, self.config.stage2.weight, outline)
        timings["stage2"] = time.perf_counter() - t0
        if dot_weight or feature_weight:
            t0 = time.perf_counter()
            step("candidate shapes", 0.0)
            dot = shapes.region_dotness(regions, ids)
            if outline is None:
                outline = outline_diameters(prob, regions, ids, prep.geometry, first_blob)
            p2 = shape_prior(p2, dot, dot_weight, outline)
            if feature_weight:
                features = self.candidate_features(prep, shapes, regions, cands, logit, s2, dot, first_blob)
                p2 = feature_prior(p2, self.feature_model().score(features), feature_weight)
            timings["shape"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        step("outlining nodules", 0.0)
        kept = [(c, float(p)) for c, p in zip(cands, p2) if p >= threshold]
        kept.sort(key=lambda cp: (-cp[1], -cp[0].score))
        grow_outlines(prep, prob, regions, [c.region for c, _ in kept], self.config.hu_window)
        kept = [(m, 1.0) for m in masses] + kept
        nodules, label_map = self._outline(volume, prep, prob, regions, kept)
        timings["postprocess"] = time.perf_counter() - t0
        step("done", 1.0)
        return DetectionResult(
            nodules=nodules, label_map=label_map, geometry=volume.geometry, name=volume.name,
            series_uid=volume.series_uid, threshold=threshold, timings=timings,
            warnings=input_warnings + list(prep.lungs.warnings),
            model_info={"name": self.name, "device": str(self.device), "card": self.config.card},
        )

    def _outline(self, volume: CTVolume, prep, prob: np.ndarray, regions: np.ndarray,
                 kept: list[tuple[Candidate, float]]) -> tuple[list[Nodule], np.ndarray]:
        """Bring kept regions to the input grid, measure them there, and number them 1..N.

        Works box by box (each kept region's bounding box), so memory grows with the nodules, not the scan.
        """
        label_map = np.zeros(volume.array.shape, np.uint16)
        if not kept:
            return [], label_map
        crop_shape = tuple(s.stop - s.start for s in prep.crop)
        crop_start = np.array([s.start for s in prep.crop])
        objects = ndimage.find_objects(regions)
        in_crop = label_map[prep.crop]
        boxes = []
        for n, (c, _) in enumerate(kept, start=1):
            box, inside = _upsampled_region(prob, regions, c.region, objects[c.region - 1], crop_shape)
            in_crop[box][inside] = n
            boxes.append(box)
        counts, centroids = [], []
        for n, box in enumerate(boxes, start=1):
            voxels = np.argwhere(in_crop[box] == n)
            counts.append(len(voxels))
            start = crop_start + [s.start for s in box]
            centroids.append(voxels.mean(axis=0) + start if len(voxels) else None)
        voxel_mm3 = volume.voxel_volume_mm3
        nodules = []
        for n, ((cand, p), count, com) in enumerate(zip(kept, counts, centroids), start=1):
            if count == 0:
                # Too small to survive the outline threshold: mark the voxel at its centre.
                i, j, k = np.clip(np.round(volume.geometry.lps_to_index(cand.center_lps)).astype(int), 0,
                                  np.array(volume.shape_ijk) - 1)
                if label_map[k, j, i] == 0:
                    label_map[k, j, i] = n
                    count = 1
                centre = np.asarray(cand.center_lps)
            else:
                centre = volume.geometry.index_to_lps(com[::-1])
            vol = float(count) * voxel_mm3
            diameter = float((6.0 * vol / np.pi) ** (1.0 / 3.0))
            kind = "mass" if diameter > self.config.mass_diameter_mm else "nodule"
            nodules.append(Nodule(n, tuple(float(v) for v in centre), diameter, vol, p, kind))
        return nodules, label_map


def grow_outlines(prep: Prepared, prob: np.ndarray, regions: np.ndarray, ids: list[int],
                  hu_window: tuple[float, float]) -> None:
    """Grow the outlines of large findings into the dense tissue around them (``regions`` and ``prob`` changed
    in place, on the working grid ``[k, j, i]``).

    Stage 1 outlines a finding by its 0.5 contour; on a working grid finer than it was trained on it sees a
    large nodule magnified and outlines only its core. A finding of ``ids`` whose outline is at least
    ``GROW_FROM_MM`` wide (equivalent sphere) takes in the voxels of at least ``GROW_HU`` connected to it inside
    the lungs and not in another region, up to ``GROW_FRACTION`` of its radius away (in steps of one voxel to its
    18 neighbours); they get probability 1. ``hu_window``: the HU range the image's 0-1 spans.
    """
    if not ids:
        return
    spacing_kji = np.array(prep.geometry.spacing, float)[::-1]
    lo, hi = hu_window
    level = (GROW_HU - lo) / (hi - lo)
    objects = ndimage.find_objects(regions)
    for region in ids:
        box = objects[region - 1]
        if box is None:
            continue
        core = (regions[box] == region) & (prob[box] >= 0.5)
        diameter = float(_equivalent_diameter(core.sum(), prep.geometry))
        if diameter < GROW_FROM_MM:
            continue
        steps = int(np.ceil(GROW_FRACTION * diameter / 2.0 / spacing_kji.min()))
        big = tuple(slice(max(0, b.start - steps), min(n, b.stop + steps)) for b, n in zip(box, regions.shape))
        seed = (regions[big] == region) & (prob[big] >= 0.5)
        allowed = (prep.image[big] >= level) & prep.lung[big] & ((regions[big] == 0) | (regions[big] == region))
        grown = ndimage.binary_dilation(seed, GROW_STEP, iterations=steps, mask=allowed | seed)
        regions[big][grown] = region
        prob[big][grown & ~seed] = 1.0


def _equivalent_diameter(voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Equivalent-sphere diameters (mm) of regions of ``voxels`` voxels of ``geometry``, at least its smallest
    voxel side."""
    vox = np.asarray(voxels) * float(np.prod(geometry.spacing))
    return np.maximum((6.0 * vox / np.pi) ** (1.0 / 3.0), min(geometry.spacing))


def _upsampled_region(prob: np.ndarray, regions: np.ndarray, region: int, box: tuple[slice, ...],
                      crop_shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Where working-grid region ``region`` (bounding box ``box``) lies on the crop grid ``crop_shape`` with
    upsampled probability >= 0.5: the crop-grid box that holds it and a boolean mask over that box.

    The mapping of ``F.interpolate`` to ``crop_shape`` (regions: ``nearest-exact``; probability: trilinear,
    ``align_corners=False``; source indices in float32 as PyTorch computes them), evaluated only inside the box.
    """
    out_box, nearest, lower, upper, weight = [], [], [], [], []
    for sl, n_in, n_out in zip(box, regions.shape, crop_shape):
        scale = np.float32(n_in / n_out)
        start = max(0, int(sl.start / scale) - 1)
        stop = min(n_out, int(np.ceil(sl.stop / scale)) + 1)
        centre = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
        nearest.append(np.minimum(np.floor(centre * scale).astype(np.int64), n_in - 1))
        source = np.maximum(centre * scale - np.float32(0.5), np.float32(0.0))
        low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
        lower.append(low)
        upper.append(np.minimum(low + 1, n_in - 1))
        weight.append(source - low)
        out_box.append(slice(start, stop))
    p = prob
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = -1
        a, b = np.take(p, lower[axis], axis=axis), np.take(p, upper[axis], axis=axis)
        p = a + (b - a) * weight[axis].reshape(shape)
    inside = (regions[np.ix_(*nearest)] == region) & (p >= 0.5)
    return tuple(out_box), inside
