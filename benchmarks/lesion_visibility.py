"""How visible each inserted lesion is in its copy, for the lesions an evaluation hit and those it missed.

An inserted-lesion dataset (``nodule-detection make-lesion-dataset``) holds copies of host scans with lesions
added; the copy minus its host is what the lesion added, blurred and noised as the host scanner would image it.
For each lesion this script measures, from that difference:

* **peak added HU**: the largest added HU inside the lesion's ball (radius half its diameter, at least 1.5 voxels),
  after a 3 × 3 in-plane mean (the added noise averaged down);
* **CNR**: peak added HU over the host's noise (``lesions.estimate_noise_std``, the figure the insertion matched);

and splits them by host and by whether the evaluation's ``missed_nodules.csv`` lists them (hit by no candidate at
any score), so that the misses can be told apart from lesions too faint to see::

    python benchmarks/lesion_visibility.py valdata eval_inserted --shared ../shared/data

``--shared`` is the folder of the host scans (default: the dataset's recorded source, relative to the working
directory). Prints one line per host and one per texture; writes nothing. Figures: ``Resources/Models/
EXPERIMENTS.md``, "Session 21".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.datasets import Dataset, read_findings  # noqa: E402
from NoduleDetectionLib.errors import InputError  # noqa: E402
from NoduleDetectionLib.evaluate import froc_output_paths  # noqa: E402
from NoduleDetectionLib.io import read_ct  # noqa: E402
from NoduleDetectionLib.lesions import estimate_noise_std  # noqa: E402

#: A missed lesion is matched to its annotation by centre (LPS mm) within this distance.
MATCH_MM = 0.01


def peak_added_hu(added: np.ndarray, spacing_kji: np.ndarray, centre_kji: np.ndarray, diameter_mm: float) -> float:
    """The largest of ``added`` (HU, ``[k, j, i]``, 3 × 3 in-plane mean) within ``diameter_mm / 2`` (at least 1.5
    voxels of each axis) of the continuous index ``centre_kji``."""
    radius = np.maximum(diameter_mm / 2.0 / spacing_kji, 1.5)
    lo = np.maximum(np.floor(centre_kji - radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre_kji + radius).astype(int) + 1, added.shape)
    box = added[tuple(slice(a, b) for a, b in zip(lo, hi))]
    smooth = ndimage.uniform_filter(box.astype(np.float32), size=(1, 3, 3), mode="nearest")
    grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_kji, radius)) <= 1.0
    return float(smooth[inside].max())


def measure(dataset: Path, shared: Path) -> list[dict]:
    """One record per inserted lesion of ``dataset``: host, copy, texture, diameter (mm), peak added HU, CNR."""
    summary = json.loads((dataset / "lesions.json").read_text())
    hosts = {entry.name: entry for entry in Dataset.open(shared, scans=summary["hosts"]).scans}
    records: list[dict] = []
    for host_name in summary["hosts"]:
        host = hosts[host_name].read()
        noise = estimate_noise_std(host.array)
        for record in (c for c in summary["copies"] if c["host"] == host_name):
            copy = read_ct(dataset / "ct" / record["scan"])
            if copy.array.shape != host.array.shape:
                raise InputError(f"{record['scan']} does not have its host's grid")
            added = copy.array.astype(np.float32) - host.array.astype(np.float32)
            spacing = np.asarray(host.geometry.spacing, float)[::-1]
            for lesion in record["inserted"]:
                centre = np.asarray(host.geometry.lps_to_index(lesion["center_lps"]), float)[::-1]
                peak = peak_added_hu(added, spacing, centre, lesion["label_diameter_mm"])
                records.append({"host": host_name, "seriesuid": record["seriesuid"], "centre": lesion["center_lps"],
                                "texture": lesion["texture"], "diameter_mm": lesion["label_diameter_mm"],
                                "peak_hu": peak, "cnr": peak / noise})
    return records


def mark_missed(records: list[dict], missed_csv: Path) -> int:
    """Set each record's ``missed`` from an evaluation's ``missed_nodules.csv``; return how many it lists."""
    missed = read_findings(missed_csv, status="nodule")
    for record in records:
        record["missed"] = any(m.seriesuid == record["seriesuid"]
                               and np.linalg.norm(np.subtract(m.center_lps, record["centre"])) < MATCH_MM
                               for m in missed)
    if sum(r["missed"] for r in records) != len(missed):
        raise InputError(f"{missed_csv}: {len(missed)} missed lesions, of which "
                         f"{sum(r['missed'] for r in records)} are lesions of this dataset")
    return len(missed)


def _line(name: str, group: list[dict]) -> str:
    parts = []
    for label, rows in (("hit", [r for r in group if not r["missed"]]), ("missed", [r for r in group if r["missed"]])):
        if rows:
            peak, cnr = np.array([r["peak_hu"] for r in rows]), np.array([r["cnr"] for r in rows])
            parts.append(f"{len(rows)} {label}: peak added HU median {np.median(peak):.0f} (min {peak.min():.0f}), "
                         f"CNR median {np.median(cnr):.1f} (min {cnr.min():.1f})")
        else:
            parts.append(f"0 {label}")
    return f"{name}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="an inserted-lesion dataset (make-lesion-dataset's OUTDIR)")
    parser.add_argument("evaluation", type=Path, help="evaluate-detector's OUTDIR on it (missed_nodules.csv)")
    parser.add_argument("--shared", type=Path, help="the host scans' folder (default: the dataset's source)")
    args = parser.parse_args(argv)
    try:
        shared = args.shared or Path(json.loads((args.dataset / "lesions.json").read_text())["source"])
        records = measure(args.dataset, shared)
        mark_missed(records, froc_output_paths(args.evaluation)["missed"])
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    by_host, by_texture = defaultdict(list), defaultdict(list)
    for r in records:
        by_host[r["host"]].append(r)
        by_texture[r["texture"]].append(r)
    for name, group in [*by_host.items(), *sorted(by_texture.items()), ("all", records)]:
        print(_line(name, group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
