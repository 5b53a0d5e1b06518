"""Does stage 1 fit its own training lesions? Stage 1's response to the lesions of a config's training copies.

Rebuilds the first training copies of a training config exactly as ``nodule-detection train`` does (same hosts,
insertion seeds, lesions; ``cases_from_source``), runs each model's stage 1 over them (the working grid of
detection, no augmentation) and counts, by position and size band, the lesions whose highest stage 1 probability
within 3 voxels of their centre reaches ``--threshold``. For the model trained with that config these are lesions
it was trained on; for another model (e.g. a stage 1 ablation run on the half-resolution host with the same
insertion seed) they are lesions of the same shapes in the same host::

    .venv/bin/python benchmarks/training_fit.py Resources/Training/min_target.json \\
        Resources/Models/nodule_detector.safetensors --copies 2 --out fit.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.detect import Detector  # noqa: E402
from NoduleDetectionLib.lesions import POSITIONS  # noqa: E402
from NoduleDetectionLib.models import NoduleModel  # noqa: E402
from NoduleDetectionLib.preprocess import prepare  # noqa: E402
from NoduleDetectionLib.train import SMALL_LESION_MM  # noqa: E402
from NoduleDetectionLib.train_run import cases_from_source, load_config  # noqa: E402

#: Size bands (mm): under 6, 6-10, 10 and over (an inserted lesion's measured diameter may fall just under 3 mm).
BAND_EDGES_MM = (SMALL_LESION_MM, 10.0)
BAND_NAMES = ("< 6 mm", "6-10 mm", "≥ 10 mm")
#: Half-size (working-grid voxels) of the box around a lesion's centre searched for stage 1's highest probability.
SEARCH_VOXELS = 3


def fit_table(config_path: Path, models: list[Path], copies: int, threshold: float) -> str:
    """Markdown: per model, lesions with stage 1 ≥ ``threshold`` near their centre, by position and size band."""
    config = load_config(config_path)
    source = next((s for s in config["train"] if s.get("insert")), None)
    if source is None:
        raise SystemExit(f"{config_path} inserts no lesions into its training scans: nothing to rebuild")
    source = {**source, "insert": {**source["insert"], "copies": copies}}
    cases = cases_from_source(source, int(config.get("seed", 0)))
    head = " | ".join(f"{p} {band}" for p in POSITIONS for band in BAND_NAMES)
    total = sum(len(c.lesions) for c in cases)
    lines = [f"Lesions of the first {copies} training copies of `{config_path.name}` ({total} lesions) with stage 1 "
             f"≥ {threshold} within {SEARCH_VOXELS} voxels of their centre:", "",
             f"| model | {head} |", "|---|" + "---|" * (len(POSITIONS) * len(BAND_NAMES))]
    prepared: dict[tuple, list] = {}  # per working grid (spacing, HU window): each case prepared once
    for path in models:
        detector = Detector(NoduleModel.load(path), device="cpu")
        grid = (detector.config.stage1.spacing_mm, tuple(detector.config.hu_window))
        if grid not in prepared:
            prepared[grid] = [prepare(case.volume, *grid) for case in cases]
        counts = np.zeros((len(POSITIONS), len(BAND_NAMES), 2), int)
        for case, prep in zip(cases, prepared[grid]):
            prob, _ = detector.stage1_maps(prep.image, prep.lung)
            for (centre, diameter), (_, _, position) in zip(case.lesions, case.kinds):
                kji = np.round(prep.geometry.lps_to_index(np.asarray(centre))[::-1]).astype(int)
                box = tuple(slice(max(a - SEARCH_VOXELS, 0), a + SEARCH_VOXELS + 1) for a in kji)
                band = int(np.searchsorted(BAND_EDGES_MM, diameter, side="right"))
                counts[POSITIONS.index(position), band] += (int(prob[box].max() >= threshold), 1)
        cells = " | ".join(f"{f}/{n}" for f, n in counts.reshape(-1, 2))
        lines.append(f"| `{path.name}` | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="training config (JSON) whose training copies are rebuilt")
    parser.add_argument("models", type=Path, nargs="+", help="model files")
    parser.add_argument("--copies", type=int, default=2, help="training copies rebuilt (default 2)")
    parser.add_argument("--threshold", type=float, default=0.5, help="stage 1 probability that counts as found")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    table = fit_table(args.config, args.models, args.copies, args.threshold)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
