"""The two networks, their configuration, and the safe model file format.

Stage 1 is a **3D** U-net. 3D rather than 2D/2.5D because a nodule is told from a vessel by its shape
across slices (a vessel continues, a nodule ends), which a 3D receptive field sees directly; the scan is
first resampled to an isotropic working spacing (``Stage1Config.spacing_mm``), which also makes one
network serve 0.6 mm and 5 mm slice scans alike. Cropping to the lungs keeps the 3D cost at a few
seconds on a CPU.

Stage 2 is a small multi-scale 3D CNN: two isotropic patches around each candidate, a fine one (nodule
shape and margin) and a coarse one (context: vessel, pleura, mediastinum), each through its own
convolutional stream, joined by a small classifier head.

Model file: one ``.safetensors`` file (no pickle, so loading never runs code) holding both networks'
weights (``stage1.*``, ``stage2.*``) and, in its metadata, the format name, the format version, the full
JSON config and a SHA-256 checksum of the tensors. A file that is not one of ours, was written for
another format version, was truncated or had a weight changed is refused with a one-line ``ModelError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .errors import ModelError

FORMAT_NAME = "nodule-detection-model"
FORMAT_VERSION = 1


@dataclass
class Stage1Config:
    """U-net settings. ``spacing_mm``: isotropic working voxel size; ``channels``: features per level.

    ``score_temperature``: ``None``, a candidate's stage 1 score is the highest probability in its region; a
    number ``T``, it is ``sigmoid(max logit / T)`` over the region (the logits averaged over overlapping tiles),
    which keeps candidates apart where the probability saturates at 1 (``calibrate`` chooses it).

    ``blob_candidates``: how many proposals of the blob filter (``blobs``) join stage 1's candidates per scan,
    outside its regions (0: none); each is scored by stage 1's output over its outline like the others.

    ``dot_weight``: how much a candidate's shape scales its probability (``detect.shape_prior``; 0: not at all;
    ``calibrate`` chooses it).

    ``cpu_bf16``: on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX; ``detect.cpu_bf16_native``), the
    U-net runs in bfloat16 autocast, markedly faster (``docs/performance.md``), its logits differing from float32's
    in the third significant digit; on other CPUs it runs in float32 (on CUDA, always float16).

    ``bn_adapt``: the share of each scan's own batch-norm statistics in stage 1 (``detect.adapt_batch_norm``,
    AdaBN; 0: the trained statistics only, 1: the scan's only).

    ``outside_lung_hu``: ``None``, the U-net sees the whole working grid; a number (HU), it sees the lungs only:
    every voxel outside the lung mask (the lungs grown by 4 mm, ``preprocess.lung_mask``) is set to that value
    first (``preprocess.lungs_only``), in training and detection alike, so that hosts' chest walls, mediastina and
    abdomens look alike. The blob filter, the mass finder, the outlines and stage 2 still see the whole image.
    """

    spacing_mm: float = 1.5
    channels: tuple[int, ...] = (8, 16, 32, 64)
    tile: int = 128
    candidate_threshold: float = 0.3
    max_candidates: int = 200
    score_temperature: float | None = None
    blob_candidates: int = 0
    dot_weight: float = 0.0
    cpu_bf16: bool = False
    bn_adapt: float = 0.0
    outside_lung_hu: float | None = None

    def __post_init__(self) -> None:
        fill = self.outside_lung_hu
        if fill is not None and (isinstance(fill, bool) or not isinstance(fill, (int, float))
                                 or not -1024.0 <= fill <= 3071.0):
            raise ModelError(f"stage 1 outside_lung_hu must be null or a number of HU (-1024 to 3071), got {fill!r}")


@dataclass
class Stage2Config:
    """Classifier settings: ``patch`` voxels per edge at each spacing in ``scales_mm`` (fine first).

    ``weight`` sets a finding's probability from its stage 1 score ``s1`` and stage 2 probability ``s2`` as
    ``s1 ** (1 - weight) * s2 ** weight`` (1: stage 2 alone); training picks it on validation data. With ``tta``,
    a candidate's logit is the mean over its patches flipped along every combination of the three axes (8 passes).

    ``features``: a logistic model over a candidate's measured features (``features.FeatureModel.to_config``; empty:
    none), fitted on training scans (``calibrate.fit_features``); ``feature_weight`` how much its rating counts in
    a finding's probability (``detect.feature_prior``; 0: not at all; ``calibrate`` chooses it).

    ``spare_large``: findings whose stage 1 outline is at least ``detect.SHAPE_MAX_MM`` wide keep their stage 1
    score (``detect.fuse_scores``): stage 2 learnt from small lesions.
    """

    patch: int = 24
    scales_mm: tuple[float, ...] = (1.0, 2.5)
    channels: tuple[int, ...] = (16, 32, 64)
    weight: float = 1.0
    tta: bool = False
    features: dict = field(default_factory=dict)
    feature_weight: float = 0.0
    spare_large: bool = False


@dataclass
class ModelConfig:
    """Everything needed to rebuild and run a detector; stored inside the model file.

    Attributes:
        hu_window: HU range mapped to [0, 1] before both networks.
        threshold: default probability above which a nodule is reported.
        mass_diameter_mm: findings larger than this are reported as ``mass``.
        card: free-form model card facts (data, command, figures); not used for inference.
    """

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    threshold: float = 0.5
    mass_diameter_mm: float = 30.0
    card: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from ``to_json`` output (tuples restored)."""
        s1 = Stage1Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["stage1"].items()})
        s2 = Stage2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["stage2"].items()})
        rest = {k: v for k, v in data.items() if k not in ("stage1", "stage2")}
        rest["hu_window"] = tuple(rest.get("hu_window", (-1000.0, 400.0)))
        return cls(stage1=s1, stage2=s2, **rest)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
    )


class UNet3D(nn.Module):
    """3D U-net: ``(B, 1, D, H, W)`` normalised CT → ``(B, 1, D, H, W)`` nodule logits.

    Each side of the input must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for c in channels:
            self.down.append(_conv_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        for c_skip in reversed(channels[:-1]):
            self.up.append(_conv_block(cin + c_skip, c_skip))
            cin = c_skip
        self.head = nn.Conv3d(cin, 1, 1)
        self.divisor = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = nn.functional.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class _Stream(nn.Module):
    """One scale of the classifier: conv blocks with pooling, then global average pooling."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(channels):
            if i:
                layers.append(nn.MaxPool3d(2))
            layers.append(_conv_block(cin, c))
            cin = c
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3, 4))


class NoduleClassifier3D(nn.Module):
    """Multi-scale 3D CNN: ``(B, S, P, P, P)`` patches (one channel per scale) → ``(B,)`` nodule logits."""

    def __init__(self, scales: int = 2, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.streams = nn.ModuleList(_Stream(channels) for _ in range(scales))
        width = channels[-1] * scales
        self.head = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [s(x[:, i : i + 1]) for i, s in enumerate(self.streams)]
        return self.head(torch.cat(feats, dim=1))[:, 0]


@dataclass
class NoduleModel:
    """A complete detector model: config plus both networks (in eval mode after loading)."""

    config: ModelConfig
    stage1: UNet3D
    stage2: NoduleClassifier3D

    @classmethod
    def build(cls, config: ModelConfig | None = None, seed: int | None = None) -> NoduleModel:
        """Fresh networks for ``config`` (random weights; ``seed`` makes them reproducible)."""
        config = config or ModelConfig()
        if seed is not None:
            torch.manual_seed(seed)
        return cls(
            config,
            UNet3D(config.stage1.channels),
            NoduleClassifier3D(len(config.stage2.scales_mm), config.stage2.channels),
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All weights and buffers, keyed ``stage1.*`` / ``stage2.*``, contiguous on the CPU."""
        out = {}
        for prefix, net in (("stage1", self.stage1), ("stage2", self.stage2)):
            for k, v in net.state_dict().items():
                out[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model file atomically (safetensors + config/format/checksum metadata)."""
        from safetensors.torch import save_file

        tensors = self.state_tensors()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": self.config.to_json(),
            "sha256": tensor_checksum(tensors),
        }
        with atomic_path(path, overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NoduleModel:
        """Read a model file written by ``save``; raise ``ModelError`` for anything else."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path.name} is not a readable model file ({str(exc).splitlines()[0]})") from None
        if metadata.get("format") != FORMAT_NAME:
            raise ModelError(f"{path.name} is not a NoduleDetection model file")
        version = metadata.get("format_version", "?")
        if version != str(FORMAT_VERSION):
            raise ModelError(
                f"{path.name} has model format version {version}; this version of NoduleDetection reads "
                f"version {FORMAT_VERSION}"
            )
        if tensor_checksum(tensors) != metadata.get("sha256"):
            raise ModelError(f"{path.name} failed its checksum: the file is corrupt or was modified")
        try:
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
            model = cls.build(config)
            for prefix, net in (("stage1", model.stage1), ("stage2", model.stage2)):
                sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                net.load_state_dict(sub, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path.name} does not match its config ({str(exc).splitlines()[0]})") from None
        model.stage1.eval()
        model.stage2.eval()
        return model


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(np.prod(p.shape) for p in module.parameters() if p.requires_grad))
