"""The classical baseline of issue 10: a multi-scale blob filter in a lung mask, no learning, scored as LUNA16 does.

Each scan is prepared as the detector prepares it (lung mask, crop, 1.5 mm working grid, HU window), then
``blobs.find_blobs`` with a wide top-hat (``TOPHAT_MM``, so that nodules up to 30 mm stay) and Gaussian scales
``SCALES_MM`` (the dot filter of Li, Sone and Doi answers most to spheres of about ``2√3 σ`` diameter: 3.5-30 mm)
proposes its ``--count`` strongest spots, scored by the dot filter; ``evaluate`` scores them::

    .venv/bin/python benchmarks/classical_baseline.py ../shared/data --scans Resources/Models/validation_scans.txt \\
        -o baseline_real
    .venv/bin/python benchmarks/classical_baseline.py valdata -o baseline_inserted

Writes ``candidates.csv`` (LUNA16 result file, world LPS mm) and the FROC outputs (``froc.json``, ``froc.png``,
``froc_curve.csv``, ``missed_nodules.csv``) into the output folder and prints the CPM: the figure a learned
detector has to beat on the same scans.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.atomic import check_writable, write_text_atomic  # noqa: E402
from NoduleDetectionLib.blobs import ShapeFilter, find_blobs  # noqa: E402
from NoduleDetectionLib.datasets import Dataset, read_scan_list  # noqa: E402
from NoduleDetectionLib.errors import NoduleDetectionError  # noqa: E402
from NoduleDetectionLib.evaluate import Candidate, evaluate, froc_output_paths, write_froc_outputs  # noqa: E402
from NoduleDetectionLib.preprocess import prepare  # noqa: E402

#: Working grid (mm) and top-hat cube (mm; wider than the largest nodule, narrower than the chest wall's bulk).
SPACING_MM, TOPHAT_MM = 1.5, 33.0
#: Gaussian scales σ (mm) of the dot filter.
SCALES_MM = (1.0, 1.5, 2.2, 3.2, 4.6, 6.5, 8.7)


def baseline_candidates(dataset: Path, scans: list[str] | None, count: int) -> tuple[Dataset, list[Candidate], str]:
    """The filter's ``count`` strongest spots in each scan of ``dataset``: the candidates and their CSV text."""
    ds = Dataset.open(dataset, scans)
    candidates: list[Candidate] = []
    rows = ["seriesuid,coordX,coordY,coordZ,probability\n"]
    for scan in tqdm(ds.scans, desc="blob filter", unit="scan"):
        volume = scan.read()
        prep = prepare(volume, SPACING_MM)
        shapes = ShapeFilter(prep.image, prep.geometry, tophat_mm=TOPHAT_MM, scales_mm=SCALES_MM)
        blobs = find_blobs(prep.image, prep.lung, prep.geometry, count, shapes=shapes)
        centres = prep.geometry.index_to_lps(blobs.kji[:, ::-1].astype(float)) if len(blobs.kji) else []
        for centre, strength in zip(centres, blobs.strength):
            candidates.append(Candidate(scan.seriesuid, tuple(float(v) for v in centre), float(strength)))
            rows.append(f"{scan.seriesuid},{','.join(f'{float(v):.3f}' for v in centre)},{float(strength):.6f}\n")
    return ds, candidates, "".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="annotated folder (LUNA16 or shared layout)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--scans", type=Path, help="only these scans: seriesuids or ct/ entry names, one per line")
    parser.add_argument("--count", type=int, default=300, help="spots kept per scan (default 300)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args()
    try:
        for path in (args.output / "candidates.csv", *froc_output_paths(args.output).values()):
            check_writable(path, args.overwrite)
        ds, candidates, csv_text = baseline_candidates(
            args.dataset, read_scan_list(args.scans) if args.scans else None, args.count)
        froc = evaluate(ds.findings(), candidates, ds.seriesuids)
        write_text_atomic(args.output / "candidates.csv", csv_text, args.overwrite)
        write_froc_outputs(froc, args.output, args.overwrite)
    except NoduleDetectionError as exc:
        sys.exit(f"error: {exc}")
    print(f"CPM {froc.cpm:.3f} (95% CI {froc.ci95['cpm'][0]:.3f}-{froc.ci95['cpm'][1]:.3f}); sensitivity at "
          + ", ".join(f"{k} FP/scan {v:.3f}" for k, v in froc.sensitivity.items()))


if __name__ == "__main__":
    main()
