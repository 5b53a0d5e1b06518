"""An inserted-lesion evaluation split by host scan: each host's CPM on its own copies' false positives.

A lesion data set (``nodule-detection make-lesion-dataset``) names each copy ``<host>-ins<seed>-<copy>``; this
scores a LUNA16 result file (``candidates.csv`` of ``evaluate-detector``) against the set's ``annotations.csv``
once per host, with only that host's copies listed (the copies named in ``annotations.csv``: each holds lesions),
so that the FP/scan axis counts that host's own structures::

    .venv/bin/python benchmarks/host_breakdown.py valdata/annotations.csv eval_inserted/candidates.csv

Prints, per host: its copies, lesions, lesions hit at any score, the sensitivity at each LUNA16 FP rate and the
CPM (``evaluate``, no bootstrap).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "NoduleDetection"))

from NoduleDetectionLib.datasets import read_findings  # noqa: E402
from NoduleDetectionLib.errors import NoduleDetectionError  # noqa: E402
from NoduleDetectionLib.evaluate import evaluate, read_candidates  # noqa: E402
from NoduleDetectionLib.lesion_dataset import host_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", type=Path, help="the lesion data set's annotations.csv")
    parser.add_argument("candidates", type=Path, help="a LUNA16 result file (seriesuid, coordX-Z, probability)")
    args = parser.parse_args(argv)
    try:
        findings = read_findings(args.annotations)
        candidates = read_candidates(args.candidates)
        scans = sorted({f.seriesuid for f in findings})
        hosts = sorted({host_of(s) for s in scans})
    except NoduleDetectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for host in hosts:
        listed = [s for s in scans if host_of(s) == host]
        result = evaluate([f for f in findings if f.seriesuid in listed],
                          [c for c in candidates if c.seriesuid in listed], listed, n_bootstrap=0)
        nodules = result.matching.nodules
        rates = ", ".join(f"{k}: {v:.3f}" for k, v in result.sensitivity.items())
        print(f"{host}: {len(listed)} copies, {len(nodules)} lesions, {sum(s.detected for s in nodules)} hit at any "
              f"score; sensitivity at FP/scan {rates}; CPM {result.cpm:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
