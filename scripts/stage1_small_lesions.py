"""Why stage 1 misses small lesions: its probability near each lesion, and the training targets of small ones.

Usage:
    python scripts/stage1_small_lesions.py probe MODEL DATASET [--scans NAME ...]
    python scripts/stage1_small_lesions.py targets CONFIG

``probe``: for every nodule of a shared-layout DATASET (e.g. a ``make-lesion-dataset`` folder, whose
annotations carry texture and position), stage 1's highest probability within ``max(d/2, 2 mm)`` of its centre
on the working grid (a cube of that half-width), printed per nodule and summarised per size band by quantiles.
``targets``: prepares the first copy of the first training source of CONFIG as training does and prints, per
inserted lesion, its label's equivalent diameter and how many working-grid target voxels lie within its radius
plus one voxel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from NoduleDetectionLib.datasets import Dataset
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.io import read_ct
from NoduleDetectionLib.models import NoduleModel
from NoduleDetectionLib.preprocess import prepare
from NoduleDetectionLib.train import prepare_case, sphere_mask
from NoduleDetectionLib.train_run import cases_from_source, load_config, model_from_config, settings_from_config

BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 30.0))


def probe(model_path: Path, dataset: Path, scans: list[str] | None) -> None:
    model = NoduleModel.load(model_path)
    detector = Detector(model, device="cpu")
    rows = []
    for scan in Dataset.open(dataset, scans).scans:
        prep = prepare(read_ct(scan.path), model.config.stage1.spacing_mm, model.config.hu_window)
        prob, _ = detector.stage1_maps(prep.image, prep.lung)
        spacing = min(prep.geometry.spacing)
        for f in scan.annotations:
            kji = np.round(prep.geometry.lps_to_index(np.array([f.center_lps]))[0][::-1]).astype(int)
            r = max(1, int(np.ceil(max(f.diameter_mm / 2, 2.0) / spacing)))
            box = tuple(slice(max(0, x - r), x + r + 1) for x in kji)
            p = float(prob[box].max()) if prob[box].size else 0.0
            rows.append((f.diameter_mm, p))
            print(f"{scan.name} {f.diameter_mm:5.1f} mm {f.attributes.get('texture', '-'):12s} "
                  f"{f.attributes.get('position', '-'):13s} max probability {p:.3f}", flush=True)
    table = np.array(rows).reshape(-1, 2)
    for low, high in BANDS:
        p = table[(table[:, 0] >= low) & (table[:, 0] < high), 1]
        if len(p):
            q = ", ".join(f"{v:.3f}" for v in np.quantile(p, [0.1, 0.25, 0.5, 0.75, 0.9]))
            print(f"{low:g}-{high:g} mm: {len(p)} lesions; quantiles 10/25/50/75/90 %: {q}; "
                  f">= 0.05: {np.mean(p >= 0.05):.2f}; >= 0.5: {np.mean(p >= 0.5):.2f}")


def targets(config_path: Path) -> None:
    config = load_config(config_path)
    source = dict(config["train"][0])
    if source.get("insert"):
        source["insert"] = {**source["insert"], "copies": 1}
    model = model_from_config(config, seed=0)
    min_target_mm = settings_from_config(config).min_target_mm
    for case in (prepare_case(c, model, min_target_mm) for c in cases_from_source(source, int(config.get("seed", 0)))):
        spacing = max(case.prep.geometry.spacing)
        for centre, diameter in sorted(case.case.lesions, key=lambda x: x[1]):
            ball = sphere_mask(case.target.shape, case.prep.geometry, [(centre, diameter / 2 + spacing)])
            print(f"{case.case.name} {diameter:5.1f} mm: {int((case.target[ball] > 0).sum())} target voxels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("model", type=Path)
    p.add_argument("dataset", type=Path)
    p.add_argument("--scans", nargs="+")
    t = sub.add_parser("targets")
    t.add_argument("config", type=Path)
    args = parser.parse_args()
    if args.command == "probe":
        probe(args.model, args.dataset, args.scans)
    else:
        targets(args.config)


if __name__ == "__main__":
    main()
