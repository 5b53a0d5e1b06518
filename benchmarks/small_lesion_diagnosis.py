"""Where the detector loses lesions: stage 1, the candidates, or stage 2 (session 7's diagnosis).

For every nodule of an annotated data set (a folder made by ``make-lesion-dataset``, or any LUNA16 or shared-layout
folder), with one model:

* stage 1's highest probability within the lesion (its radius, at least 2 mm, on the working grid);
* whether a stage 1 candidate hits it (the LUNA16 rule of ``evaluate``), and whether a blob-filter proposal does
  (``Detector.blob_candidates`` with ``--blobs`` proposals per scan, outside stage 1's regions);
* stage 2's probability at the lesion's true centre: what stage 2 would say if a candidate were there.

Writes a Markdown summary by size band and position to ``--out`` and prints it::

    .venv/bin/python benchmarks/small_lesion_diagnosis.py valdata2000 \
        --model Resources/Models/nodule_detector.safetensors --blobs 100 --out diagnosis.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.datasets import Dataset  # noqa: E402
from NoduleDetectionLib.detect import Detector  # noqa: E402
from NoduleDetectionLib.evaluate import match_radius_mm  # noqa: E402
from NoduleDetectionLib.io import read_ct  # noqa: E402
from NoduleDetectionLib.preprocess import prepare  # noqa: E402

BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 30.0))


def _hit(found: list, centre: np.ndarray, radius: float) -> bool:
    """Whether any of the candidates ``found`` lies within ``radius`` mm of ``centre`` (LPS mm)."""
    return bool(found) and bool((np.linalg.norm(np.array([c.center_lps for c in found]) - centre, axis=1)
                                 <= radius).any())


def _peak_within(prob: np.ndarray, geometry, centre: np.ndarray, radius_mm: float) -> float:
    """Highest value of the working-grid map ``prob`` ``[k, j, i]`` within ``radius_mm`` of ``centre`` (LPS mm); 0 if
    no voxel centre lies that close. Only the box around the ball is searched."""
    kji = np.asarray(geometry.lps_to_index(centre))[::-1]
    reach = np.ceil(radius_mm / np.array(geometry.spacing)[::-1]) + 1
    lo = np.clip(np.floor(kji - reach), 0, prob.shape).astype(int)
    hi = np.clip(np.ceil(kji + reach) + 1, 0, prob.shape).astype(int)
    voxels = np.argwhere(np.ones(tuple(hi - lo), bool)) + lo
    near = np.linalg.norm(geometry.index_to_lps(voxels[:, ::-1].astype(float)) - centre, axis=1) <= radius_mm
    return float(prob[tuple(voxels[near].T)].max()) if near.any() else 0.0


def lesion_rows(dataset: Path, model: Path, blobs: int) -> list[dict]:
    """One row per nodule: size, position, stage 1 peak, candidate hits, stage 2 at the true centre."""
    detector = Detector.load(model, device="cpu")
    detector.config.stage1.blob_candidates = blobs
    ds = Dataset.open(dataset)
    rows = []
    for scan in ds.scans:
        nodules = [f for f in scan.annotations if f.status == "nodule"]
        if not nodules:
            continue
        volume = read_ct(scan.path)
        prep = prepare(volume, detector.config.stage1.spacing_mm, detector.config.hu_window)
        prob, logit = detector.stage1_maps(prep.image)
        cands, regions = detector.candidates(prob, prep.lung, prep.geometry, logit=logit)
        extra = detector.blob_candidates(prep, prob, regions, logit)
        centres = np.array([f.center_lps for f in nodules])
        at_centre = detector.classify(volume, centres)
        for f, centre, p2 in zip(nodules, centres, at_centre):
            peak = _peak_within(prob, prep.geometry, centre, max(f.diameter_mm / 2, 2.0))
            radius = match_radius_mm(f.diameter_mm)
            rows.append({"diameter_mm": f.diameter_mm, "position": f.attributes.get("position", "-"),
                         "stage1_peak": peak,
                         "stage1_hit": _hit(cands, centre, radius), "blob_hit": _hit(extra, centre, radius),
                         "stage2_at_centre": float(p2)})
        print(f"{scan.name}: {len(nodules)} nodules", file=sys.stderr)
    return rows


def summary(rows: list[dict], blobs: int) -> str:
    """Markdown table: per size band and position, how many lesions, stage 1 hits, blob-only hits, stage 2 ≥ 0.5."""
    lines = ["| size | position | lesions | stage 1 peak ≥ 0.1 | stage 1 candidate hits | "
             f"blob proposals (top {blobs}) hit, stage 1 missed | stage 2 ≥ 0.5 at the true centre |",
             "|---|---|---|---|---|---|---|"]
    positions = sorted({r["position"] for r in rows})
    for lo, hi in BANDS:
        for pos in positions + ["all"]:
            sel = [r for r in rows if lo <= r["diameter_mm"] < hi and pos in (r["position"], "all")]
            if not sel:
                continue
            lines.append(f"| {lo:g}-{hi:g} mm | {pos} | {len(sel)} | {sum(r['stage1_peak'] >= 0.1 for r in sel)} | "
                         f"{sum(r['stage1_hit'] for r in sel)} | "
                         f"{sum(r['blob_hit'] and not r['stage1_hit'] for r in sel)} | "
                         f"{sum(r['stage2_at_centre'] >= 0.5 for r in sel)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--blobs", type=int, default=100, help="blob-filter proposals per scan (default 100)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write (not overwritten)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists")
    text = (f"Lesions of `{args.dataset.name}`, model `{args.model.name}` (`small_lesion_diagnosis.py`)\n\n"
            + summary(lesion_rows(args.dataset, args.model, args.blobs), args.blobs))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
