"""Picture the strongest false positives of an evaluated detector run, scan by scan, in three planes.

``python scripts/false_positive_gallery.py DATASET CANDIDATES_CSV -o PNG [--scans LIST] [--per-scan 3]``

``DATASET``: the annotated folder the candidates were scored on (``datasets.Dataset``: LUNA16 or shared layout);
``CANDIDATES_CSV``: ``evaluate-detector``'s ``candidates.csv`` (LUNA16 columns, world LPS mm). A candidate is a
false positive when it lies within no finding's matching radius (``evaluate.match_radius_mm``, any status), as
``evaluate.match`` counts it. Each row shows one: axial, coronal and sagittal crops of 40 mm through its centre
(lung window, true aspect), titled with its score, LPS centre and the distance to the nearest excluded finding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NoduleDetection"))

from NoduleDetectionLib.atomic import atomic_path, check_writable  # noqa: E402
from NoduleDetectionLib.datasets import Dataset, read_scan_list  # noqa: E402
from NoduleDetectionLib.errors import NoduleDetectionError  # noqa: E402
from NoduleDetectionLib.evaluate import match_radius_mm, read_candidates  # noqa: E402
from NoduleDetectionLib.io import read_ct  # noqa: E402

#: Crop side (mm) and display window (HU).
CROP_MM, WINDOW_HU = 40.0, (-1000.0, 200.0)


def strongest_false_positives(dataset: Dataset, candidates_csv: str | Path, per_scan: int) -> list[tuple]:
    """``(scan entry, candidate, distance to the nearest excluded finding in mm)`` of the ``per_scan`` highest
    scoring false positives of each scan of ``dataset``."""
    findings: dict[str, list] = {}
    for f in dataset.findings():
        findings.setdefault(f.seriesuid, []).append(f)
    by_scan: dict[str, list] = {}
    for c in read_candidates(candidates_csv):
        by_scan.setdefault(c.seriesuid, []).append(c)
    rows = []
    for entry in dataset.scans:
        marks = findings.get(entry.seriesuid, [])
        false = [c for c in by_scan.get(entry.seriesuid, [])
                 if all(np.linalg.norm(np.subtract(c.center_lps, f.center_lps)) >= match_radius_mm(f.diameter_mm)
                        for f in marks)]
        false.sort(key=lambda c: -c.probability)
        excluded = [f.center_lps for f in marks if f.status == "excluded"]
        for c in false[:per_scan]:
            near = min((float(np.linalg.norm(np.subtract(c.center_lps, p))) for p in excluded), default=float("inf"))
            rows.append((entry, c, near))
    return rows


def save_gallery(rows: list[tuple], path: Path, overwrite: bool = False) -> None:
    """Write the three-plane crops of ``rows`` (``strongest_false_positives``) as one PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, (entry, cand, near) in enumerate(rows):
        if r == 0 or rows[r - 1][0] is not entry:  # rows come scan by scan: one scan in memory at a time
            volume = read_ct(entry.path)
        geometry, array = volume.geometry, volume.array
        i, j, k = np.round(geometry.lps_to_index(np.asarray(cand.center_lps, float))).astype(int).reshape(3)
        sx, sy, sz = geometry.spacing
        hx, hy, hz = (max(1, int(round(CROP_MM / 2 / s))) for s in (sx, sy, sz))
        ks, js, is_ = (slice(max(n - h, 0), n + h + 1) for n, h in ((k, hz), (j, hy), (i, hx)))
        planes = [("axial", array[k, js, is_], sy / sx), ("coronal", array[ks, j, is_][::-1], sz / sx),
                  ("sagittal", array[ks, js, i][::-1], sz / sy)]
        for c, (name, image, aspect) in enumerate(planes):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                      interpolation="nearest")
            ax.axis("off")
            ax.set_title(name if c else f"{Path(entry.path).name} p={cand.probability:.3f}\n"
                         f"LPS ({', '.join(f'{v:.0f}' for v in cand.center_lps)}), excluded mark "
                         f"{near:.0f} mm", fontsize=7, loc="left" if not c else "center")
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("candidates")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--scans", help="file with one scan name per line (default: every scan of the dataset)")
    parser.add_argument("--per-scan", type=int, default=3)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_writable(args.output, args.overwrite)
        dataset = Dataset.open(args.dataset, read_scan_list(args.scans) if args.scans else None)
        rows = strongest_false_positives(dataset, args.candidates, args.per_scan)
    except NoduleDetectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("no false positive among the candidates", file=sys.stderr)
        return 1
    save_gallery(rows, args.output, args.overwrite)
    for entry, cand, near in rows:
        print(f"{Path(entry.path).name}\t{cand.probability:.3f}\t{cand.center_lps}\texcluded mark {near:.1f} mm")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
