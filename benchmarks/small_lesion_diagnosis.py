"""Where the detector loses lesions: stage 1, the candidates, or stage 2 (session 7's diagnosis).

For every nodule of an annotated data set (a folder made by ``make-lesion-dataset``, or any LUNA16 or shared-layout
folder), with one model:

* stage 1's highest probability within the lesion (its radius, at least 2 mm, on the working grid);
* whether a stage 1 candidate hits it (the LUNA16 rule of ``evaluate``), and whether a blob-filter proposal does
  (``Detector.blob_candidates`` with ``--blobs`` proposals per scan, outside stage 1's regions);
* stage 2's probability at the lesion's true centre: what stage 2 would say if a candidate were there.

and, for the blob-filter proposals as a whole, how well stage 2 tells those that hit a nodule from the others (the
area under its ROC curve) and the CPM of stage 1's candidates alone and with the proposals added, scored by
``detect.fuse_scores`` at several stage 2 weights (stage 1's candidates keep the model's weight).

Writes a Markdown summary by size band and position to ``--out`` and prints it; ``--picture`` also saves views
of stage 1's highest-scoring false positives::

    .venv/bin/python benchmarks/small_lesion_diagnosis.py valdata2000 \
        --model Resources/Models/nodule_detector.safetensors --blobs 100 --out diagnosis.md --picture fps.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.datasets import Dataset  # noqa: E402
from NoduleDetectionLib.detect import Detector, fuse_scores  # noqa: E402
from NoduleDetectionLib.evaluate import Candidate, evaluate, match_radius_mm  # noqa: E402
from NoduleDetectionLib.io import read_ct  # noqa: E402
from NoduleDetectionLib.preprocess import prepare  # noqa: E402

BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 30.0))
#: Stage 2 weights tried for the blob proposals' scores.
PROPOSAL_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


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


def lesion_rows(ds: Dataset, detector: Detector, blobs: int) -> tuple[list[dict], list[dict]]:
    """One row per nodule (size, position, stage 1 peak, candidate hits, stage 2 at the true centre) and one per
    candidate (scan, LPS centre, whether a blob proposal, stage 1 score, stage 2 probability, nodule hit)."""
    detector.config.stage1.blob_candidates = blobs
    rows, proposals = [], []
    for scan in ds.scans:
        nodules = scan.annotations  # target nodules only
        if not nodules:
            continue
        volume = read_ct(scan.path)
        prep = prepare(volume, detector.config.stage1.spacing_mm, detector.config.hu_window)
        prob, logit = detector.stage1_maps(prep.image, prep.lung)
        cands, regions = detector.candidates(prob, prep.lung, prep.geometry, logit=logit)
        extra = detector.blob_candidates(prep, prob, regions, logit)
        centres = np.array([f.center_lps for f in nodules])
        at_centre = detector.classify(volume, centres)
        everything = cands + extra
        xyz = np.array([c.center_lps for c in everything]).reshape(-1, 3)
        others = [*scan.excluded, *scan.masses]  # a candidate on one is neither a hit nor a false positive
        for n, (c, p2) in enumerate(zip(everything, detector.classify(volume, xyz))):
            hit = any(_hit([c], f_c, match_radius_mm(f.diameter_mm)) for f, f_c in zip(nodules, centres))
            proposals.append({"scan": scan.seriesuid, "center_lps": tuple(map(float, c.center_lps)),
                              "blob": n >= len(cands), "stage1": c.score, "stage2": float(p2), "hit": hit,
                              "ignored": not hit and any(_hit([c], np.array(f.center_lps),
                                                              match_radius_mm(f.diameter_mm)) for f in others)})
        for f, centre, p2 in zip(nodules, centres, at_centre):
            peak = _peak_within(prob, prep.geometry, centre, max(f.diameter_mm / 2, 2.0))
            radius = match_radius_mm(f.diameter_mm)
            rows.append({"diameter_mm": f.diameter_mm, "position": f.attributes.get("position", "-"),
                         "stage1_peak": peak,
                         "stage1_hit": _hit(cands, centre, radius), "blob_hit": _hit(extra, centre, radius),
                         "stage2_at_centre": float(p2)})
        print(f"{scan.name}: {len(nodules)} nodules", file=sys.stderr)
    return rows, proposals


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores ``positive`` against ``negative`` (ties count half)."""
    if not len(positive) or not len(negative):
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    return float(greater + 0.5 * (positive[:, None] == negative[None, :]).mean())


def _false_positives(proposals: list[dict], score: np.ndarray) -> list[int]:
    """Indices of the candidates that are false positives (no nodule, no excluded finding or mass), best first."""
    return [int(n) for n in np.argsort(-score, kind="stable")
            if not proposals[n]["hit"] and not proposals[n]["ignored"]]


def _same_place(p: dict, q: dict, reach_mm: float) -> bool:
    """Whether candidates ``p`` and ``q`` lie within ``reach_mm`` of each other in the same host scan (copies of
    a host are named ``HOST-insSEED-COPY`` by ``make-lesion-dataset``)."""
    return (p["scan"].rsplit("-ins", 1)[0] == q["scan"].rsplit("-ins", 1)[0]
            and float(np.linalg.norm(np.subtract(p["center_lps"], q["center_lps"]))) < reach_mm)


def recurring_false_positives(proposals: list[dict], score: np.ndarray, top: int, reach_mm: float = 5.0) -> int:
    """How many of the ``top`` highest-scoring false positives (by ``score``) lie within ``reach_mm`` of a false
    positive in another copy of the same host."""
    false = _false_positives(proposals, score)
    return sum(any(proposals[m]["scan"] != proposals[n]["scan"] and _same_place(proposals[m], proposals[n], reach_mm)
                   for m in false) for n in false[:top])


def false_positive_picture(ds: Dataset, proposals: list[dict], score: np.ndarray, out: Path, count: int = 8,
                           field_mm: float = 60.0) -> None:
    """Save axial and coronal views (``field_mm`` wide, HU -1000..400, the candidate's centre marked) of the
    ``count`` highest-scoring false positives, one per place of a host (a copy's repeat of a place is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scans = {s.seriesuid: s for s in ds.scans}
    chosen: list[int] = []
    for n in _false_positives(proposals, score):
        if not any(_same_place(proposals[m], proposals[n], 5.0) for m in chosen):
            chosen.append(n)
        if len(chosen) == count:
            break
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.6), squeeze=False)
    for col, n in enumerate(chosen):
        p = proposals[n]
        volume = read_ct(scans[p["scan"]].path)
        sx, sy, sz = volume.geometry.spacing
        i, j, k = np.round(volume.geometry.lps_to_index(np.array(p["center_lps"]))).astype(int)
        hx, hy, hz = (int(round(field_mm / 2 / s)) for s in (sx, sy, sz))
        j0, i0, k0 = max(j - hy, 0), max(i - hx, 0), max(k - hz, 0)
        views = ((volume.array[k, j0:j + hy, i0:i + hx], (i - i0, j - j0), sy / sx),
                 (volume.array[k0:k + hz, j, i0:i + hx], (i - i0, k - k0), sz / sx))
        for row, (image, (u, v), aspect) in enumerate(views):
            ax = axes[row, col]
            head_up = row == 1 and np.asarray(volume.geometry.direction)[2, 2] > 0  # k runs towards the head
            ax.imshow(image, cmap="gray", vmin=-1000, vmax=400, aspect=aspect, origin="lower" if head_up else "upper")
            ax.plot(u, v, "+", color="red", ms=12)
            ax.axis("off")
        axes[0, col].set_title(f"{p['scan'].rsplit('-ins', 1)[0]}\nscore {score[n]:.2f}", fontsize=8)
    for ax in axes[:, len(chosen):].flat:
        ax.axis("off")
    fig.suptitle("Highest-scoring false positives (top: axial; bottom: coronal, head up)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def proposal_summary(ds: Dataset, proposals: list[dict], weight: float) -> str:
    """Markdown lines: stage 2's AUC on the blob proposals, the CPM with and without them (``weight``: the
    model's stage 2 weight, used for stage 1's candidates), and whether stage 1's top false positives recur in
    the other copies of their host."""
    findings, scans = ds.findings(), ds.seriesuids
    blob = np.array([p["blob"] for p in proposals], bool)
    hit = np.array([p["hit"] for p in proposals], bool)
    counted = ~np.array([p["ignored"] for p in proposals], bool)
    s1 = np.array([p["stage1"] for p in proposals])
    s2 = np.array([p["stage2"] for p in proposals])

    def cpm(score: np.ndarray, keep: np.ndarray) -> float:
        cands = [Candidate(p["scan"], p["center_lps"], float(v)) for p, v, k in zip(proposals, score, keep) if k]
        return evaluate(findings, cands, scans, n_bootstrap=0).cpm

    own = fuse_scores(s1, s2, weight)
    stage1_only = [p for p, b in zip(proposals, blob) if not b]
    recurring = ", ".join(f"{recurring_false_positives(stage1_only, own[~blob], k)} of the top {k}"
                          for k in (8, 16, 32))
    lines = [f"Blob proposals: {int(blob.sum())}, {int((blob & hit).sum())} of them on a nodule; stage 2's AUC "
             f"between those and the others {_auc(s2[blob & hit], s2[blob & ~hit & counted]):.3f} (stage 1's "
             f"candidates: {_auc(s2[~blob & hit], s2[~blob & ~hit & counted]):.3f}).", "",
             f"Stage 1's false positives, by the model's score, that recur within 5 mm in another copy of the same "
             f"host: {recurring}.", "",
             "| candidates | stage 2 weight of the proposals | CPM |", "|---|---|---|",
             f"| stage 1's | - | {cpm(own, ~blob):.3f} |"]
    for w in PROPOSAL_WEIGHTS:
        lines.append(f"| stage 1's and the proposals | {w:g} | "
                     f"{cpm(np.where(blob, fuse_scores(s1, s2, w), own), np.ones_like(blob)):.3f} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--picture", type=Path, help="also save the top false positives of stage 1 here (PNG)")
    args = parser.parse_args()
    for path in (args.out, args.picture):
        if path is not None and path.exists():
            sys.exit(f"error: {path} exists")
    ds, detector = Dataset.open(args.dataset), Detector.load(args.model, device="cpu")
    rows, proposals = lesion_rows(ds, detector, args.blobs)
    weight = detector.config.stage2.weight
    if args.picture is not None:
        stage1 = [p for p in proposals if not p["blob"]]
        score = fuse_scores(np.array([p["stage1"] for p in stage1]), np.array([p["stage2"] for p in stage1]), weight)
        false_positive_picture(ds, stage1, score, args.picture)
    text = (f"Lesions of `{args.dataset.name}`, model `{args.model.name}` (`small_lesion_diagnosis.py`)\n\n"
            + summary(rows, args.blobs) + "\n" + proposal_summary(ds, proposals, weight))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
