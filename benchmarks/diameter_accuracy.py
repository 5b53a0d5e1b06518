"""How well the detector measures nodules: measured / true diameter, median per size band.

For every nodule of an annotated data set hit by a candidate of a ``candidates.csv`` (written by
``nodule-detection evaluate-detector``, which keeps the measured ``diameter_mm`` of each finding), the highest-scoring
hit's diameter is divided by the annotation's (a hit: centre within the nodule's radius, the LUNA16 rule)::

    .venv/bin/python benchmarks/diameter_accuracy.py valdata eval_inserted/candidates.csv

Prints one row per size band: nodules hit, and the 25th, 50th and 75th percentiles of measured / true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.datasets import Dataset, number, read_table  # noqa: E402
from NoduleDetectionLib.evaluate import SIZE_BINS, match_radius_mm  # noqa: E402


def diameter_ratios(dataset: Path, candidates: Path) -> dict[str, list[float]]:
    """Measured / true diameter of each hit nodule of ``dataset``, by size band (``evaluate.SIZE_BINS``)."""
    rows, _ = read_table(candidates, ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"))
    by_scan: dict[str, list[tuple[np.ndarray, float, float]]] = {}
    for line, row in rows:
        centre = np.array([number(row, c, candidates, line) for c in ("coordX", "coordY", "coordZ")])
        by_scan.setdefault(row["seriesuid"].strip(), []).append(
            (centre, number(row, "probability", candidates, line), number(row, "diameter_mm", candidates, line)))
    out: dict[str, list[float]] = {name: [] for name, _, _ in SIZE_BINS}
    for finding in Dataset.open(dataset).findings():
        if finding.status != "nodule":
            continue
        centre, radius = np.array(finding.center_lps), match_radius_mm(finding.diameter_mm)
        hits = [(p, d) for c, p, d in by_scan.get(finding.seriesuid, []) if np.linalg.norm(c - centre) <= radius]
        if hits:
            band = next(name for name, lo, hi in SIZE_BINS if lo <= finding.diameter_mm < hi)
            out[band].append(max(hits)[1] / finding.diameter_mm)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="annotated folder (LUNA16 or shared layout)")
    parser.add_argument("candidates", type=Path, help="candidates.csv of evaluate-detector")
    args = parser.parse_args()
    print("| size mm | nodules hit | measured / true: 25 % | median | 75 % |")
    print("|---|---|---|---|---|")
    for band, ratios in diameter_ratios(args.dataset, args.candidates).items():
        if ratios:
            q = np.percentile(ratios, [25, 50, 75])
            print(f"| {band} | {len(ratios)} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} |")


if __name__ == "__main__":
    main()
