"""A short training run on a GPU (CUDA, mixed precision) with the same command as on CPU, small enough to travel.

A GPU machine lent to a session receives a copy of the repository of at most 64 MiB and no ``../shared``, so
this check trains on an 80 mm slab of the training host (LIDC-IDRI-0002, full resolution and cross-section:
the lung mask needs the air around the body) and validates and calibrates on the README's sample CT (a slab of
the validation scan LIDC-IDRI-0001), with the one-command recipe of the shipped networks
(``Resources/Training/shipped_recipe.json``: networks, batches, patch sizes, lesion balancing, stage 2 negatives,
stage 1's averaged refinement and the pinned calibration), a few hundred steps a phase, at most 6 minutes, so its
step times compare with a CPU log of the same recipe (``Resources/Models/experiments/shipped_recipe``). Session 5
ran it with the recipe shipped until session 6 (``--recipe Resources/Training/previous_shipped.json``)::

    python benchmarks/gpu_training_check.py prepare ../shared/data .gpucheck      # here, once (CPU)
    nodule-detection train .gpucheck/config.json -o run --device cuda           # on the GPU machine
    python benchmarks/gpu_training_check.py summary run                         # step times, memory, CPM
    python benchmarks/gpu_training_check.py summary Resources/Models/experiments/shipped_recipe   # the CPU log

``gpu_training_check_device.sh`` holds the commands run on the GPU machine (SimpleITK carried, the training run,
``detect`` twice, the summary).

Inference: ``nodule-detection detect`` of the shipped model on both slabs with ``--device cuda`` (twice) there and
``--device cpu`` here, then ``compare`` matches the findings of two CSV files (count, centre distance, probability
and diameter differences)::

    python benchmarks/gpu_training_check.py compare detect_cpu.csv detect_gpu.csv

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
from NoduleDetectionLib.train import PHASES
from NoduleDetectionLib.volume import CTVolume

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0001-slab.nrrd"
RECIPE = REPO / "Resources" / "Training" / "shipped_recipe.json"
#: Steps of each training phase in the check (a phase the recipe does not have stays without steps).
CHECK_STEPS = {"stage1": 500, "stage1_refine": 300, "stage2": 500}
HOST = "LIDC-IDRI-0002"
SLAB_SLICES = 64
WINDOW = 20


def prepare(shared: Path, out: Path, recipe: Path = RECIPE) -> None:
    """Write ``out/ct`` (host slab, sample CT), ``out/annotations.csv`` and ``out/config.json`` (``recipe`` with the
    check's data, steps and time budget)."""
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
    config = json.loads(recipe.read_text())
    mix = config["train"][0]["insert"].get("mix", {})   # the recipe's lesion mix, fewer lesions on the slab
    config["train"] = [{"path": ".", "scans": [f"{HOST}-slab"],
                        "insert": {"lesions_per_scan": 15, "copies": 3, "seed": 1, "mix": mix}}]
    config["validation"] = [{"path": ".", "scans": [seriesuid["LIDC-IDRI-0001"]],
                             "insert": {"lesions_per_scan": 10, "copies": 1, "seed": 2000}}]
    for phase, steps in CHECK_STEPS.items():   # a check: 6 minutes at most
        if config.get(phase, {}).get("steps"):
            config[phase]["steps"] = steps
    config["time_budget_minutes"] = 6
    if config.get("calibration"):   # the recipe's pinned calibration, on lesions inserted into the sample
        config["calibration"]["lesions"] = {"path": ".", "scans": [seriesuid["LIDC-IDRI-0001"]], "lesions": 20,
                                            "per_copy": 10, "seed": 2000}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"slab: slices {k0}-{k0 + SLAB_SLICES - 1} of {HOST}; wrote {out}")


def summary(run: Path) -> dict:
    """Median step time of each stage, total time, validation CPMs and the card's machine from a run folder."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    out: dict = {}
    for stage in PHASES:
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


def _findings(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(reference: Path, other: Path) -> dict:
    """Match each finding of ``reference`` (a ``detect`` CSV) to the nearest of ``other``: counts, and the largest
    centre distance (mm, LPS), probability and diameter (mm) differences over the matched pairs."""
    a, b = _findings(reference), _findings(other)
    out: dict = {"reference": len(a), "other": len(b)}
    if not a or not b:
        return out
    keys = ("coordX", "coordY", "coordZ")
    pa = np.array([[float(r[k]) for k in keys] for r in a])
    pb = np.array([[float(r[k]) for k in keys] for r in b])
    nearest = np.linalg.norm(pa[:, None] - pb[None], axis=2).argmin(axis=1)
    pairs = list(zip(a, (b[n] for n in nearest)))
    out["max_centre_mm"] = round(float(np.linalg.norm(pa - pb[nearest], axis=1).max()), 4)
    for key in ("probability", "diameter_mm"):
        out[f"max_{key}_difference"] = round(max(abs(float(r[key]) - float(q[key])) for r, q in pairs), 6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the check's data and config (here, from ../shared/data)")
    p.add_argument("shared", type=Path)
    p.add_argument("out", type=Path)
    s = sub.add_parser("summary", help="print a run's step times, validation CPMs and machine")
    s.add_argument("run", type=Path)
    p.add_argument("--recipe", type=Path, default=RECIPE, help="training config whose settings the check uses")
    c = sub.add_parser("compare", help="match the findings of two detect CSV files (e.g. CPU and GPU)")
    c.add_argument("reference", type=Path)
    c.add_argument("other", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.shared, args.out, args.recipe)
    elif args.command == "compare":
        print(json.dumps(compare(args.reference, args.other), indent=2))
    else:
        print(json.dumps(summary(args.run), indent=2))


if __name__ == "__main__":
    main()
