"""Two other ways to run a trained stage 1, scored as the model card's pinned ``calibrate`` command scores a model.

* ``ensemble``: stage 1's logits are the mean of the model's U-net and the U-nets of other model files (each with
  its own depth and widths; a deep ensemble of independently trained networks);
* ``grids``: stage 1 also runs on a second working grid (``--also`` mm; the image zoomed linearly) and its
  probabilities and logits, zoomed back, are averaged with those of the model's own grid (test-time multi-scale).

Each prepares the scans of DATASET as ``calibrate`` does, with the card's pinned settings (100 blob proposals, a
1.2 mm grid, bfloat16 where the CPU has it, candidate threshold 0.05, stage 2 weight 0.25, shape weight 0.25), tries
the score temperatures and prints the CPM of each; nothing is written::

    .venv/bin/python benchmarks/stage1_probes.py ensemble valdata2000 --with shallow/model.safetensors
    .venv/bin/python benchmarks/stage1_probes.py grids valdata2000 --also 1.0

Figures: ``Resources/Models/EXPERIMENTS.md``, "Session 17".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.calibrate import SCORE_TEMPERATURES, choose_operating_point, dataset_scores  # noqa: E402
from NoduleDetectionLib.datasets import Dataset  # noqa: E402
from NoduleDetectionLib.detect import Detector  # noqa: E402
from NoduleDetectionLib.models import NoduleModel  # noqa: E402
from NoduleDetectionLib.registry import shipped_model_path  # noqa: E402

#: The card's pinned calibration settings.
PINNED = {"blob_candidates": 100, "spacing_mm": 1.2, "cpu_bf16": True}
CANDIDATE_THRESHOLD, STAGE2_WEIGHT, SHAPE_WEIGHT = 0.05, 0.25, 0.25


class MeanLogits(nn.Module):
    """The mean output (logit) of several networks on the same input."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self.nets]).mean(0)


class EnsembleDetector(Detector):
    """The model's detector whose stage 1 is the mean logit of its U-net and ``others``' (model files)."""

    def __init__(self, model: NoduleModel, others: list[Path], device: str = "auto") -> None:
        super().__init__(model, device)
        self.members = [Detector(NoduleModel.load(path), device).stage1 for path in others]

    def stage1_network(self, image: np.ndarray, lung: np.ndarray | None = None) -> nn.Module:
        return MeanLogits([super().stage1_network(image, lung), *self.members])


class GridsDetector(Detector):
    """The model's detector whose stage 1 maps are averaged with those made on a second grid of ``also_mm``."""

    def __init__(self, model: NoduleModel, also_mm: float, device: str = "auto") -> None:
        super().__init__(model, device)
        self.also_mm = also_mm

    def stage1_maps(self, image, lung=None, progress=None, cancel=None, logits=None):
        prob, logit = super().stage1_maps(image, lung, progress, cancel, logits)
        factor = self.config.stage1.spacing_mm / self.also_mm
        other_lung = None if lung is None else ndimage.zoom(lung.astype(np.uint8), factor, order=0) > 0
        prob2, logit2 = super().stage1_maps(ndimage.zoom(image, factor, order=1), other_lung, None, cancel, logits)

        def back(a: np.ndarray) -> np.ndarray:  # zoom's output shape is round(a.shape × ratio): image.shape
            return ndimage.zoom(a, np.array(image.shape) / np.array(a.shape), order=1)

        prob = ((prob + back(prob2)) / 2).astype(np.float32)
        return prob, None if logit is None else ((logit + back(logit2)) / 2).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("ensemble", "grids"))
    parser.add_argument("dataset", type=Path, help="annotated folder (LUNA16 or shared layout)")
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--with", dest="others", type=Path, nargs="+", default=[],
                        help="ensemble: other model files whose U-nets join")
    parser.add_argument("--also", type=float, default=1.0, help="grids: the second working grid (mm; default 1.0)")
    args = parser.parse_args()
    model = NoduleModel.load(args.model or shipped_model_path())
    for key, value in PINNED.items():
        setattr(model.config.stage1, key, value)
    if args.probe == "ensemble":
        if not args.others:
            parser.error("ensemble needs --with MODEL ...")
        detector: Detector = EnsembleDetector(model, args.others)
    else:
        detector = GridsDetector(model, args.also)
    ds = Dataset.open(args.dataset)
    scores = dataset_scores(detector, ds, [CANDIDATE_THRESHOLD], with_dot=True)
    point = choose_operating_point(ds.findings(), scores, ds.seriesuids, 0.5, [STAGE2_WEIGHT],
                                   list(SCORE_TEMPERATURES), [SHAPE_WEIGHT])
    for key, (cpm, threshold, _) in sorted(point.grid.items(), key=lambda item: -item[1][0]):
        temperature = "probability" if key[1] is None else f"logit / {key[1]:g}"
        print(f"{temperature}: CPM {cpm:.3f} (default threshold {threshold:.3f})")


if __name__ == "__main__":
    main()
