"""A short training run on a GPU (CUDA, mixed precision) with the same command as on CPU, small enough to travel.

A GPU machine lent to a session receives a copy of the repository of at most 64 MiB and no ``../shared``, so
this check trains on an 80 mm slab of the training host (LIDC-IDRI-0002, full resolution and cross-section:
the lung mask needs the air around the body) and validates on the README's sample CT (a slab of the
validation scan LIDC-IDRI-0001), with the networks, batches and patch sizes of the recipe shipped until session
6 (``Resources/Training/previous_shipped.json``; the current recipe's are the same), 750 steps a stage, at most 6
minutes, so its step times compare with that model's CPU log
(``Resources/Models/experiments/previous_shipped/train_log.jsonl``)::

    python benchmarks/gpu_training_check.py prepare ../shared/data .gpucheck      # here, once (CPU)
    nodule-detection train .gpucheck/config.json -o run --device cuda           # on the GPU machine
    python benchmarks/gpu_training_check.py summary run                         # step times, memory, CPM
    python benchmarks/gpu_training_check.py summary Resources/Models/experiments/previous_shipped   # CPU log

The slab's and the sample's findings (excluded marks, the 24 mm nodule) keep their world coordinates, so
they are masked as in a full run. The model of this run is a check, not a candidate for shipping.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from NoduleDetectionLib.io import read_ct, write_volume
from NoduleDetectionLib.preprocess import lung_mask
from NoduleDetectionLib.volume import CTVolume

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0001-slab.nrrd"
SHIPPED = REPO / "Resources" / "Training" / "previous_shipped.json"
HOST = "LIDC-IDRI-0002"
SLAB_SLICES = 64
WINDOW = 20


def prepare(shared: Path, out: Path) -> None:
    """Write ``out/ct`` (host slab, sample CT), ``out/annotations.csv`` and ``out/config.json``."""
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another folder")
    (out / "ct").mkdir(parents=True)
    host = read_ct(shared / "ct" / f"{HOST}.nrrd")
    per_slice = lung_mask(host).mask.sum(axis=(1, 2))
    k0 = int(np.clip(np.argmax(np.convolve(per_slice, np.ones(SLAB_SLICES), mode="valid")), 0, None))
    slab = CTVolume(host.array[k0:k0 + SLAB_SLICES], host.geometry.cropped((0, 0, k0)), name=f"{HOST}-slab")
    write_volume(slab, out / "ct" / f"{HOST}-slab.nrrd")
    shutil.copyfile(SAMPLE, out / "ct" / SAMPLE.name)
    renamed = {HOST: f"{HOST}-slab.nrrd", "LIDC-IDRI-0001": SAMPLE.name}
    seriesuid = {HOST: f"{HOST}-slab", "LIDC-IDRI-0001": SAMPLE.name.removesuffix(".nrrd")}
    with open(shared / "annotations.csv", newline="") as src, open(out / "annotations.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            scan = row["scan"].removesuffix(".nrrd")
            if scan in renamed:
                writer.writerow({**row, "scan": renamed[scan], "seriesuid": seriesuid[scan]})
    config = json.loads(SHIPPED.read_text())
    config["train"] = [{"path": ".", "scans": [f"{HOST}-slab"],
                        "insert": {"lesions_per_scan": 15, "copies": 3, "seed": 1,
                                   "mix": {"median_diameter_mm": 9.0, "log_sigma": 0.7}}}]
    config["validation"] = [{"path": ".", "scans": [seriesuid["LIDC-IDRI-0001"]],
                             "insert": {"lesions_per_scan": 10, "copies": 1, "seed": 2000}}]
    config["stage1"]["steps"] = config["stage2"]["steps"] = 750   # a check: half the shipped steps, 6 minutes at most
    config["time_budget_minutes"] = 6
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"slab: slices {k0}-{k0 + SLAB_SLICES - 1} of {HOST}; wrote {out}")


def summary(run: Path) -> dict:
    """Median step time of each stage, total time, validation CPMs and the card's machine from a run folder."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    out: dict = {}
    for stage in ("stage1", "stage2"):
        rows = [r for r in records if r["stage"] == stage]
        elapsed = np.array([r["elapsed_s"] for r in rows])
        if len(elapsed) > WINDOW:  # the log rounds to 0.1 s: time windows of steps; the median skips validations
            per_step = (elapsed[WINDOW:] - elapsed[:-WINDOW]) / WINDOW
            out[stage] = {"steps": len(rows), "median_step_s": round(float(np.median(per_step)), 4),
                          "span_s": round(float(elapsed[-1] - elapsed[0]), 1)}
    out["validation_cpm"] = [r["val_cpm"] for r in records if r["stage"] == "validation"]
    out["total_s"] = records[-1]["elapsed_s"]
    card = run / "model_card.md"
    if card.is_file():
        out["card"] = [line for line in card.read_text().splitlines()
                       if line.startswith(("- **machine", "- **gpu", "- **peak", "- **mixed", "- **data sec"))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the check's data and config (here, from ../shared/data)")
    p.add_argument("shared", type=Path)
    p.add_argument("out", type=Path)
    s = sub.add_parser("summary", help="print a run's step times, validation CPMs and machine")
    s.add_argument("run", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.shared, args.out)
    else:
        print(json.dumps(summary(args.run), indent=2))


if __name__ == "__main__":
    main()
