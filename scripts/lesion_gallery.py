"""Write ``Resources/lesion_gallery.png``: synthetic lesions inserted into the training host LIDC-IDRI-0002
beside the real nodules of the validation scans, so that a person can judge realism.

Run from the repository root: ``python scripts/lesion_gallery.py [--data ../shared/data] [--out ...]``.
The validation scans are read for display only; nothing from them is used for training.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NoduleDetection"))

from NoduleDetectionLib.io import read_ct  # noqa: E402
from NoduleDetectionLib.lesions import (  # noqa: E402
    GalleryItem,
    LesionSpec,
    avoid_radius_mm,
    insert_lesions,
    save_example_grid,
)
from NoduleDetectionLib.preprocess import lung_mask  # noqa: E402

VALIDATION_NODULES = ("LIDC-IDRI-0001", "LIDC-IDRI-0003.nrrd", "pyradiomics-lung1.nrrd")

SPECS = [
    ("solid", [LesionSpec(d, "solid", "round", "free", seed=10 + n) for n, d in enumerate((4, 6, 8, 12, 20))]
     + [LesionSpec(10, "solid", "lobulated", "free", seed=20)]),
    ("solid, irregular / attached", [
        LesionSpec(14, "solid", "lobulated", "free", seed=21), LesionSpec(16, "solid", "spiculated", "free", seed=22),
        LesionSpec(9, "solid", "spiculated", "juxtavascular", seed=23),
        LesionSpec(6, "solid", "round", "juxtavascular", seed=24),
        LesionSpec(8, "solid", "round", "juxtapleural", seed=25),
        LesionSpec(15, "solid", "lobulated", "juxtapleural", seed=26)]),
    ("sub-solid", [
        LesionSpec(8, "ground-glass", "round", "free", seed=30), LesionSpec(14, "ground-glass", "lobulated", "free",
                                                                          seed=31),
        LesionSpec(24, "ground-glass", "lobulated", "free", seed=32),
        LesionSpec(12, "part-solid", "round", "free", seed=33), LesionSpec(20, "part-solid", "spiculated", "free",
                                                                          seed=34),
        LesionSpec(10, "part-solid", "lobulated", "juxtapleural", seed=35)]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "lesion_gallery.png")
    args = parser.parse_args()
    with open(args.data / "annotations.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    host = read_ct(args.data / "ct" / "LIDC-IDRI-0002.nrrd")
    lungs = lung_mask(host).mask
    avoid = [((float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])), avoid_radius_mm(float(r["diameter_mm"])))
             for r in rows if r["scan"] == "LIDC-IDRI-0002.nrrd"]
    specs = [s for _, group in SPECS for s in group]
    t = time.time()
    new, _, inserted = insert_lesions(host, lungs, specs, np.random.default_rng(2024), avoid=avoid)
    print(f"inserted {len(inserted)}/{len(specs)} lesions in {time.time() - t:.1f} s")
    by_spec = {les.spec: les for les in inserted}
    grid = []
    for title, group in SPECS:
        items = [GalleryItem(f"{s.diameter_mm:g} mm {s.texture} {s.shape} {s.position}", new,
                             by_spec[s].center_lps, s.diameter_mm) for s in group if s in by_spec]
        grid.append((f"inserted: {title}", items))

    real = []
    for scan in VALIDATION_NODULES:
        volume = read_ct(args.data / "ct" / scan)
        for r in rows:
            if r["scan"] == scan and r["status"] == "nodule":
                d = float(r["diameter_mm"])
                real.append(GalleryItem(f"real {scan.split('.')[0]} {d:g} mm", volume,
                                        (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])), d))
    grid.append(("real (validation scans)", real))
    print(save_example_grid(grid, args.out, overwrite=True))


if __name__ == "__main__":
    main()
