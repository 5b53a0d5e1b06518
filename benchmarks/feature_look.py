"""How a candidate-feature model fitted on one set of candidates ranks another (a look before calibrate).

Reads two ``features.csv`` files written by ``nodule-detection fit-features`` (every candidate of a data set with its
label and measured features): fits ``features.fit`` on the first (training scans) with each feature subset asked
for, and prints the CPM of the second set's candidates (the project's evaluator, against the second data set's
annotations) scored by the model's present score (its stage weights, shape weight and temperature), by the feature
model alone, and by their mix ``detect.feature_prior`` at each weight; and how many of the strongest false
positives of each scan of a ``make-lesion-dataset`` folder are the same host structure in its other copies.

    python benchmarks/feature_look.py TRAIN/features.csv OTHER/features.csv OTHER_DATASET [--model M]
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from NoduleDetectionLib.datasets import Dataset
from NoduleDetectionLib.detect import Detector, feature_prior, fuse_scores, logit_score, shape_prior
from NoduleDetectionLib.evaluate import Candidate, evaluate
from NoduleDetectionLib.features import FEATURE_NAMES, fit

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def read(path: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    scans = [r["seriesuid"] for r in rows]
    xyz = np.array([[float(r[c]) for c in ("coordX", "coordY", "coordZ")] for r in rows]).reshape(-1, 3)
    labels = np.array([int(r["label"]) for r in rows])
    feats = np.array([[float(r[n]) for n in FEATURE_NAMES] for r in rows]).reshape(-1, len(FEATURE_NAMES))
    return scans, xyz, labels, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("other")
    ap.add_argument("dataset", help="the data set the second file's candidates come from (its annotations)")
    ap.add_argument("--model", default=None, help="the model whose present score is compared (default: shipped)")
    ap.add_argument("--drop", nargs="*", default=[], action="append", metavar="FEATURE",
                    help="a feature subset to leave out (repeat the option for several looks)")
    args = ap.parse_args()
    cfg = Detector.load(args.model, "cpu").config
    _, _, train_labels, train_feats = read(args.train)
    scans, xyz, labels, feats = read(args.other)
    ds = Dataset.open(args.dataset)
    mass = np.isnan(feats).any(axis=1)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    s1 = logit_score(feats[:, col["stage1_logit"]], cfg.stage1.score_temperature or 1.0)
    s2 = 1.0 / (1.0 + np.exp(-feats[:, col["stage2_logit"]]))
    dot = np.exp(feats[:, col["log_dot"]]) - 0.005
    present = shape_prior(fuse_scores(s1, s2, cfg.stage2.weight), dot, cfg.stage1.dot_weight)
    present = np.where(mass, 1.0, present)

    def cpm(score: np.ndarray) -> float:
        cands = [Candidate(s, tuple(p), float(v)) for s, p, v in zip(scans, xyz, score)]
        return evaluate(ds.findings(), cands, ds.seriesuids, n_bootstrap=0).cpm

    print(f"present score: CPM {cpm(present):.3f}")
    # The strongest false positives of each copy: the same host structures in every copy of a host?
    names = np.array(scans)
    host = np.array([s.split("-ins")[0] for s in scans])
    top, repeated = 0, 0
    for scan in np.unique(names):
        fp = np.where((names == scan) & (labels == 0) & ~mass)[0]
        for i in fp[np.argsort(-present[fp], kind="stable")[:8]]:
            others = (host == host[i]) & (names != scan)
            top += 1
            repeated += bool(others.any() and np.min(np.linalg.norm(xyz[others] - xyz[i], axis=1)) <= 1.0)
    print(f"the 8 strongest false positives of each scan: {repeated} of {top} lie within 1 mm of a candidate of "
          "another copy of the same host")
    strongest, below = [], []
    for scan in np.unique(names):
        here = (names == scan) & ~mass
        fp = np.where(here & (labels == 0))[0]
        strongest += list(fp[np.argsort(-present[fp], kind="stable")[:8]])
        below += list(np.where(here & (labels == 1) & (present < present[fp].max()))[0])
    print("median features | " + " | ".join(FEATURE_NAMES))
    for name, idx in (("8 strongest false positives per scan", strongest),
                      ("nodule hits below their scan's strongest false positive", below),
                      ("all nodule hits", np.where((labels == 1) & ~mass)[0])):
        print(f"{name} ({len(idx)}) | " + " | ".join(f"{v:.2f}" for v in np.median(feats[idx], axis=0)))
    for drop in [[]] + [d for d in args.drop if d]:
        keep = [i for i, n in enumerate(FEATURE_NAMES) if n not in drop]
        model = fit(np.nan_to_num(train_feats[:, keep]), train_labels)
        rating = np.where(mass, 1.0, model.score(np.nan_to_num(feats[:, keep])))
        mixes = "  ".join(f"{w:g}: {cpm(feature_prior(present, rating, w)):.3f}" for w in WEIGHTS)
        print(f"without {drop or 'nothing'}: feature weight {mixes}")


if __name__ == "__main__":
    main()
