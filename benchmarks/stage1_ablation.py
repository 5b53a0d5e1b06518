"""Stage 1 ablation on a lent GPU machine: several training settings side by side, small enough to travel.

The GPU machine takes a repository copy of at most 64 MiB and no ``../shared``, and SimpleITK travels as an
archive (about 28 MB), so the training host LIDC-IDRI-0002 travels at half its in-plane resolution (2×2 block
mean: 1.36 × 1.36 × 1.25 mm, its lung slices only, 17 MB; with the repository's own files the copy is now just over
64 MiB, so session 10 moved two large tracked files out of the working tree for the call and restored them with
``git checkout``). Each config is the balanced recipe
(``Resources/Training/balanced_lesions.json``) for stage 1 only (2000 steps in rounds 1-2, 3000 in round 3, 1800
in rounds 4-8: ``ROUNDS``; one stage 2 step), with lesions
inserted into that host for training (seed 1) and validation (seed 3000, two copies of 25: the same host,
other lesions); the variants change one setting each, or several::

    python benchmarks/stage1_ablation.py prepare ../shared/data .gpux      # here (CPU), once
    # on the GPU machine, carrying .gpux and the SimpleITK archive, all configs of a round in parallel:
    nodule-detection train .gpux/A.json -o runA --device cuda &  ...  wait
    python benchmarks/stage1_ablation.py stage1-only runA/model.safetensors s1_A.safetensors     # here
    nodule-detection evaluate-detector valdata2000 -o ev_A --model s1_A.safetensors             # here

``stage1-only`` sets the stage 2 weight to 0, so a finding's score is stage 1's alone (the variants differ
in stage 1 only). ``graft`` puts a variant's stage 1 in front of another model's stage 2 (round 3)::

    python benchmarks/stage1_ablation.py graft runJ/model.safetensors \\
        Resources/Models/nodule_detector.safetensors J.safetensors
    nodule-detection calibrate valdata2000 -o cal_J --model J.safetensors

The figures are in ``Resources/Models/EXPERIMENTS.md`` ("Session 6", "Session 8", "Session 9", "Session 10").
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from NoduleDetectionLib.io import read_ct, write_volume
from NoduleDetectionLib.models import NoduleModel
from NoduleDetectionLib.preprocess import block_mean, lung_mask
from NoduleDetectionLib.volume import CTVolume

REPO = Path(__file__).resolve().parent.parent
BALANCED = REPO / "Resources" / "Training" / "balanced_lesions.json"
HOST = "LIDC-IDRI-0002"
HALF = f"{HOST}-half"

#: The variants: round and the changes each makes to the baseline ``A``; round 3 trains longer (3000 steps),
#: E and F again and the same with the shipped stage 1's recipe (I) and with a wider U-net (L); round 4 adds the
#: augmentation that simulates other scanners to B (M, and P with another seed) and to E (O), beside B itself (N);
#: round 5 inserts vessel-like distractors (negatives) into B's training copies (Q, R with another seed, T with
#: three times as many), beside B with R's seed (S); round 6 changes B's lesion mix: half of the lesions
#: juxtapleural (U, V: two seeds), or smaller lesions, median 5 mm (W, X); round 7 draws the small (< 6 mm)
#: juxtapleural and juxtavascular lesions 4 times as often in B (Y, Z: two seeds) and in O (AA, AB: two seeds,
#: beside O with seed 1, AC), and 12 times as often in B (AD); round 8 bends the patches (``elastic_mm`` 2) in B
#: (AE, AF: two seeds) and in O (AG, AH: two seeds).
SMALL_TARGETS = {"min_target_mm": 6.0}
NO_THICK_SLICES = {"thick_slices": False}
MORE_LESIONS = {"positive_fraction": 0.8, "lesions_per_scan": 80}
SCANNERS = {"scanner_augmentation": True}
DISTRACTORS = {"distractors": 40}
JUXTAPLEURAL = {"mix": {"positions": [0.3, 0.2, 0.5]}}
SMALL_LESIONS = {"mix": {"median_diameter_mm": 5.0, "log_sigma": 0.6}}
SMALL_ATTACHED = {"small_attached_weight": 4.0}
ELASTIC = {"elastic_mm": 2.0}
O_RECIPE = {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS, **SCANNERS}
VARIANTS: dict[str, tuple[int, dict]] = {
    "A": (1, {}),
    "B": (1, SMALL_TARGETS),
    "C": (1, NO_THICK_SLICES),
    "D": (1, MORE_LESIONS),
    "E": (2, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS}),
    "F": (2, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS, "channels": [16, 32, 64, 128]}),
    "G": (2, {"seed": 1}),
    "H": (2, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS, "seed": 1}),
    "I": (3, SMALL_TARGETS),
    "J": (3, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS}),
    "K": (3, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS, "channels": [16, 32, 64, 128]}),
    "L": (3, {**SMALL_TARGETS, **NO_THICK_SLICES, **MORE_LESIONS, "channels": [32, 64, 128, 256]}),
    "M": (4, {**SMALL_TARGETS, **SCANNERS}),
    "N": (4, SMALL_TARGETS),
    "O": (4, O_RECIPE),
    "P": (4, {**SMALL_TARGETS, **SCANNERS, "seed": 1}),
    "Q": (5, {**SMALL_TARGETS, **DISTRACTORS}),
    "R": (5, {**SMALL_TARGETS, **DISTRACTORS, "seed": 1}),
    "S": (5, {**SMALL_TARGETS, "seed": 1}),
    "T": (5, {**SMALL_TARGETS, "distractors": 120}),
    "U": (6, {**SMALL_TARGETS, **JUXTAPLEURAL}),
    "V": (6, {**SMALL_TARGETS, **JUXTAPLEURAL, "seed": 1}),
    "W": (6, {**SMALL_TARGETS, **SMALL_LESIONS}),
    "X": (6, {**SMALL_TARGETS, **SMALL_LESIONS, "seed": 1}),
    "Y": (7, {**SMALL_TARGETS, **SMALL_ATTACHED}),
    "Z": (7, {**SMALL_TARGETS, **SMALL_ATTACHED, "seed": 1}),
    "AA": (7, {**O_RECIPE, **SMALL_ATTACHED}),
    "AB": (7, {**O_RECIPE, **SMALL_ATTACHED, "seed": 1}),
    "AC": (7, {**O_RECIPE, "seed": 1}),
    "AD": (7, {**SMALL_TARGETS, "small_attached_weight": 12.0}),
    "AE": (8, {**SMALL_TARGETS, **ELASTIC}),
    "AF": (8, {**SMALL_TARGETS, **ELASTIC, "seed": 1}),
    "AG": (8, {**O_RECIPE, **ELASTIC}),
    "AH": (8, {**O_RECIPE, **ELASTIC, "seed": 1}),
}
#: Per round: training copies, stage 1 steps, validation interval and time budget (minutes; stage 1 may use 65%).
ROUNDS = {1: (6, 2000, 250, 8.0), 2: (4, 2000, 250, 5.5), 3: (4, 3000, 500, 9.0), 4: (4, 1800, 600, 5.0),
          5: (4, 1800, 600, 6.0), 6: (4, 1800, 600, 6.0), 7: (4, 1800, 600, 10.0),
          8: (4, 1800, 600, 10.0)}


def half_host(shared: Path) -> CTVolume:
    """The training host at half in-plane resolution (2×2 block mean), cut to its lung slices (± 4)."""
    host = read_ct(shared / "ct" / f"{HOST}.nrrd")
    slices = np.flatnonzero(lung_mask(host).mask.any(axis=(1, 2)))
    k0, k1 = max(int(slices[0]) - 4, 0), min(int(slices[-1]) + 5, host.array.shape[0])
    g = host.geometry.cropped((0, 0, k0))
    shift = np.asarray(g.direction) @ np.array([g.spacing[0] / 2, g.spacing[1] / 2, 0.0])  # new voxel 0: mean of 0, 1
    half = dataclasses.replace(g, spacing=(2 * g.spacing[0], 2 * g.spacing[1], g.spacing[2]),
                               origin=tuple(np.asarray(g.origin) + shift))
    array = block_mean(host.array[k0:k1].astype(np.float32), (1, 2, 2))
    return CTVolume(np.round(array).astype(np.int16), half, name=HALF)


def config(variant: str) -> dict:
    """The training config of one variant (paths relative to the prepared folder)."""
    rounds, changes = VARIANTS[variant]
    copies, steps, every, minutes = ROUNDS[rounds]
    out = json.loads(BALANCED.read_text())
    insert = {"lesions_per_scan": changes.get("lesions_per_scan", 40), "copies": copies, "seed": 1,
              "mix": {"median_diameter_mm": 7.5, "log_sigma": 0.7}}
    out["train"] = [{"path": ".", "scans": [f"{HALF}.nrrd"], "insert": insert}]
    out["validation"] = [{"path": ".", "scans": [f"{HALF}.nrrd"],
                          "insert": {"lesions_per_scan": 25, "copies": 2, "seed": 3000}}]
    out["stage1"]["steps"], out["stage2"]["steps"] = steps, 1
    out.update(validate_every=every, patience=100, time_budget_minutes=minutes)
    insert["mix"].update(changes.get("mix", {}))
    if "distractors" in changes:
        insert["distractors"] = changes["distractors"]
    if "channels" in changes:
        out["model"]["stage1"]["channels"] = changes["channels"]
    out.update({k: v for k, v in changes.items() if k not in ("lesions_per_scan", "channels", "distractors", "mix")})
    return out


def prepare(shared: Path, out: Path) -> None:
    """Write ``out/ct/LIDC-IDRI-0002-half.nrrd``, its findings in ``out/annotations.csv`` and one config per
    variant (``out/A.json`` ...)."""
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another folder")
    (out / "ct").mkdir(parents=True)
    write_volume(half_host(shared), out / "ct" / f"{HALF}.nrrd")
    with open(shared / "annotations.csv", newline="") as src, open(out / "annotations.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            if row["scan"] == f"{HOST}.nrrd":
                writer.writerow({**row, "scan": f"{HALF}.nrrd", "seriesuid": HALF})
    for variant in VARIANTS:
        (out / f"{variant}.json").write_text(json.dumps(config(variant), indent=1))
    print(f"wrote {out}: {', '.join(VARIANTS)}")


def stage1_only(model: Path, out: Path) -> None:
    """Save ``model`` with stage 2 weight 0 (a finding's probability is stage 1's score)."""
    m = NoduleModel.load(model)  # a config of its own, read from the file
    m.config.stage2.weight = 0.0
    m.save(out)


def graft(stage1_model: Path, stage2_model: Path, out: Path) -> None:
    """Save ``stage1_model``'s U-net and stage 1 settings in front of ``stage2_model``'s stage 2 (settings and
    default threshold of the latter; calibrate the result before use)."""
    front, back = NoduleModel.load(stage1_model), NoduleModel.load(stage2_model)
    if front.config.hu_window != back.config.hu_window:
        raise SystemExit("the two models normalise HU differently")
    back.stage1, back.config.stage1 = front.stage1, front.config.stage1
    back.config.card = {"graft": {"stage1": str(stage1_model), "stage2": str(stage2_model)},
                        "stage1_card": front.config.card, "stage2_card": back.config.card}
    back.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the half-resolution host and the variants' configs")
    p.add_argument("shared", type=Path)
    p.add_argument("out", type=Path)
    s = sub.add_parser("stage1-only", help="a model's copy scored by stage 1 alone")
    s.add_argument("model", type=Path)
    s.add_argument("out", type=Path)
    g = sub.add_parser("graft", help="one model's stage 1 in front of another's stage 2")
    g.add_argument("stage1_model", type=Path)
    g.add_argument("stage2_model", type=Path)
    g.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.shared, args.out)
    elif args.command == "graft":
        graft(args.stage1_model, args.stage2_model, args.out)
    else:
        stage1_only(args.model, args.out)


if __name__ == "__main__":
    main()
