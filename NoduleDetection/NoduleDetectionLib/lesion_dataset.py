"""Validation data sets of synthetic lesions inserted into real chest CT (the evaluation side of issue 10).

``make_lesion_dataset`` takes host scans from a data set folder (LUNA16 or shared layout, see ``datasets``),
draws ``lesions`` lesion specifications with the LUNA16-like mix of ``lesions.sample_lesion_specs`` (sizes
3-30 mm, most under 10 mm; solid, part-solid, ground-glass; free, juxtavascular, juxtapleural), spreads them
over ``ceil(lesions / per_copy)`` copies of the hosts (copy ``j`` is a copy of host ``j mod hosts``), inserts
them with ``lesions.insert_lesions`` (lung mask from ``preprocess.lung_mask``; every known finding of the host,
with ``lesions.avoid_radius_mm``, is kept clear; a lesion that finds no place in one copy is tried again in the
next copy made, so the mix stays that of the sample and only failures in the last copy are lost) and writes a
data set in the shared layout:

* ``OUTDIR/ct/<host>-ins<seed>-<copy>.nrrd``: the copies (gzip NRRD, world LPS geometry of the host);
* ``OUTDIR/annotations.csv``: ``seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source,texture,shape,
  position``. Each inserted lesion is a ``nodule`` row: centre = centroid of its label (world LPS mm),
  diameter = the specified equivalent-sphere diameter (the label's own diameter is biased by thick slices;
  it is in ``lesions.json``). The host's findings are carried over: ``excluded`` and ``mass`` rows as they
  are, its real ``nodule`` rows as ``excluded`` (so the score is about inserted lesions only; real nodules are
  scored on the original scans) unless ``keep_real_nodules``;
* ``OUTDIR/lesions.json``: every specification (with its shape seed), where it went, and what was skipped;
* ``OUTDIR/README.md``: how the set was made.

Seeds: the specifications come from ``numpy.random.default_rng(seed)``, the placement in copy ``j`` from
``default_rng([seed, j])``; each lesion's shape, texture and noise from its own spec seed. Training configs use
insertion seeds below ``VALIDATION_SEED`` (1000), so validation lesions' seeds and shapes are not those of
training (``lesions.json`` lists the shape seeds for a check). The output is a function of the hosts (in
order), ``lesions``, ``per_copy`` and ``seed``. One copy is in memory at a time (plus its host).
"""

from __future__ import annotations

import csv
import io as text_io
import json
import logging
import math
import os
import re
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .atomic import write_text_atomic
from .datasets import Dataset, ScanEntry
from .errors import InputError, OutputError
from .evaluate import SIZE_BINS
from .io import write_volume
from .lesions import LUNA16_LIKE, LesionSpec, avoid_radius_mm, estimate_noise_std, insert_lesions, sample_lesion_specs
from .preprocess import lung_mask

log = logging.getLogger("nodule_detection.lesion_dataset")

#: Default seed of validation sets; training configs use insertion seeds below it.
VALIDATION_SEED = 1000
#: Columns of the written ``annotations.csv``.
COLUMNS = ("seriesuid", "scan", "coordX", "coordY", "coordZ", "diameter_mm", "status", "source", "texture",
           "shape", "position")
#: What joins a host's name to a copy's insertion seed and number: ``<host>-ins<seed>-<copy>`` (``copy_name``).
COPY_MARK = "-ins"
_COPY_NAME = re.compile(rf".+{COPY_MARK}\d+-\d+\.nrrd")


def copy_name(host: str, seed: int, copy: int) -> str:
    """The name of copy number ``copy`` of the scan ``host`` with lesions inserted by ``seed``."""
    return f"{host}{COPY_MARK}{seed}-{copy}"


def host_of(name: str) -> str:
    """The host scan of a copy's name (``copy_name``): ``LIDC-IDRI-0001-ins1000-4`` → ``LIDC-IDRI-0001``."""
    if COPY_MARK not in name:
        raise InputError(f"{name} is not a copy of a lesion data set (no {COPY_MARK!r} in its name)")
    return name.rsplit(COPY_MARK, 1)[0]


def plan_copies(n_hosts: int, lesions: int, per_copy: int) -> list[tuple[int, int]]:
    """``(host index, lesion count)`` per copy: ``ceil(lesions / per_copy)`` copies, round robin over the
    hosts, the lesions spread as evenly as possible (the first copies get one more)."""
    if n_hosts < 1 or lesions < 1 or per_copy < 1:
        raise InputError("need at least one host scan, one lesion and one lesion per copy")
    n_copies = math.ceil(lesions / per_copy)
    base, extra = divmod(lesions, n_copies)
    return [(j % n_hosts, base + (j < extra)) for j in range(n_copies)]


def make_lesion_dataset(
    source: str | os.PathLike,
    outdir: str | os.PathLike,
    scans: Optional[Sequence[str]] = None,
    lesions: int = 300,
    per_copy: int = 25,
    seed: int = VALIDATION_SEED,
    keep_real_nodules: bool = False,
    overwrite: bool = False,
    max_tries: int = 200,
    progress: Optional[Callable[[str, float], None]] = None,
) -> dict[str, Path]:
    """Insert lesions into copies of host scans and write a shared-layout data set (see the module docs).

    Args:
        source: data set folder of the hosts (LUNA16 or shared layout).
        outdir: output folder (created); must not be ``source``.
        scans: host seriesuids or entry names (default: every scan of ``source``).
        lesions: how many lesions to insert in all.
        per_copy: at most this many lesions per copy of a host.
        seed: seed of the specifications and placements (>= ``VALIDATION_SEED`` for validation sets).
        keep_real_nodules: keep the hosts' real nodules as ``nodule`` rows (default: ``excluded``).
        overwrite: replace an existing set in ``outdir`` (its other copies are removed).
        max_tries: random seeds tried per lesion and copy before it moves on to the next copy made (or, in
            the last one, is skipped; logged and listed in ``lesions.json``).
        progress: ``progress(copy name, fraction done)``.

    Returns:
        The written paths: ``annotations``, ``lesions``, ``readme`` and one ``ct:<name>`` per copy.
    """
    ds = Dataset.open(source, list(scans) if scans is not None else None)
    outdir = Path(outdir)
    if outdir.resolve() == ds.root.resolve():
        raise InputError(f"the output folder must not be the source data set {ds.root}")
    plan = plan_copies(len(ds.scans), lesions, per_copy)
    names = [copy_name(ds.scans[h].stem, seed, j) for j, (h, _) in enumerate(plan)]
    _prepare_outdir(outdir, {f"{n}.nrrd" for n in names}, overwrite)
    specs = sample_lesion_specs(lesions, np.random.default_rng(seed))

    paths: dict[str, Path] = {}
    rows: list[list[str]] = []
    copies: list[dict] = []
    t_start = time.perf_counter()
    carried: list[LesionSpec] = []
    for host_index, host in enumerate(ds.scans):
        jobs = [j for j, (h, _) in enumerate(plan) if h == host_index]
        if not jobs:
            continue
        volume = host.read()
        lungs = lung_mask(volume).mask
        noise = estimate_noise_std(volume.array)
        host_findings = [*host.annotations, *host.excluded, *host.masses]
        avoid = [(f.center_lps, avoid_radius_mm(f.diameter_mm)) for f in host_findings]
        for j in jobs:
            t0 = time.perf_counter()
            if progress is not None:
                progress(names[j], j / len(plan))
            first = sum(n for _, n in plan[:j])
            copy_specs = carried + specs[first:first + plan[j][1]]
            new, _, inserted = insert_lesions(volume, lungs, copy_specs, np.random.default_rng([seed, j]),
                                              avoid=avoid, noise_std=noise, max_tries=max_tries)
            scan_name = f"{names[j]}.nrrd"
            paths[f"ct:{names[j]}"] = write_volume(new, outdir / "ct" / scan_name, overwrite)
            del new
            done = {id(x.spec) for x in inserted}
            for x in inserted:
                rows.append(_row(names[j], scan_name, x.center_lps, x.spec.diameter_mm, "nodule",
                                 f"inserted lesion (make-lesion-dataset seed {seed}, copy {j}, "
                                 f"shape seed {x.spec.seed})", x.spec))
            for f in host_findings:
                status = "excluded" if f.status == "nodule" and not keep_real_nodules else f.status
                note = f"host {host.name} {f.status}: {f.attributes.get('source', '')}".rstrip(": ")
                rows.append(_row(names[j], scan_name, f.center_lps, f.diameter_mm, status, note, None))
            copies.append({
                "seriesuid": names[j], "scan": scan_name, "host": host.name, "host_seriesuid": host.seriesuid,
                "copy": j, "placement_seed": [seed, j], "seconds": round(time.perf_counter() - t0, 1),
                "inserted": [{**asdict(x.spec), "center_lps": [round(v, 3) for v in x.center_lps],
                              "label_diameter_mm": round(x.diameter_mm, 2)} for x in inserted],
                "not_placed": [asdict(s) for s in copy_specs if id(s) not in done],
            })
            carried = [s for s in copy_specs if id(s) not in done]
            log.info("%s: %d of %d lesions inserted (%.0f s)", scan_name, len(inserted), len(copy_specs),
                     time.perf_counter() - t0)
        del volume, lungs
    copies.sort(key=lambda c: c["copy"])
    seconds = time.perf_counter() - t_start
    command = _command(ds, outdir, scans, lesions, per_copy, seed, keep_real_nodules)
    summary = {
        "command": command, "source": str(ds.root), "layout": ds.layout, "hosts": [s.name for s in ds.scans],
        "seed": seed, "lesions_requested": lesions, "per_copy": per_copy, "keep_real_nodules": keep_real_nodules,
        "inserted": sum(len(c["inserted"]) for c in copies), "skipped": len(carried),
        "skipped_specs": [asdict(s) for s in carried],
        "mix": asdict(LUNA16_LIKE), "seconds": round(seconds, 1), "copies": copies,
    }
    paths["annotations"] = write_text_atomic(outdir / "annotations.csv", _csv(rows), overwrite)
    paths["lesions"] = write_text_atomic(outdir / "lesions.json", json.dumps(summary, indent=1) + "\n", overwrite)
    paths["readme"] = write_text_atomic(outdir / "README.md", _readme(summary, ds.scans), overwrite)
    if progress is not None:
        progress("done", 1.0)
    return paths


def _prepare_outdir(outdir: Path, copies: set[str], overwrite: bool) -> None:
    """Refuse an existing set unless ``overwrite``; with it, remove copies this run will not write."""
    ct = outdir / "ct"
    present = sorted(p for p in ct.iterdir() if not p.name.startswith(".")) if ct.is_dir() else []
    existing = [p for p in (outdir / "annotations.csv", outdir / "lesions.json", outdir / "README.md")
                if p.exists()] + present
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} exists; pass --overwrite to replace the data set in {outdir}")
    foreign = [p for p in present if not _COPY_NAME.fullmatch(p.name) or not p.is_file()]
    if foreign:
        raise OutputError(f"{ct} holds {foreign[0].name}, not made by make-lesion-dataset; choose another folder")
    for p in present:
        if p.name not in copies:
            p.unlink()
    ct.mkdir(parents=True, exist_ok=True)


def _row(uid: str, scan: str, center: Sequence[float], diameter: float, status: str, source: str,
         spec: Optional[LesionSpec]) -> list[str]:
    kinds = [spec.texture, spec.shape, spec.position] if spec else ["", "", ""]
    return [uid, scan, *(f"{float(v):.3f}" for v in center), f"{float(diameter):g}", status, source, *kinds]


def _csv(rows: list[list[str]]) -> str:
    buf = text_io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def _command(ds: Dataset, outdir: Path, scans, lesions: int, per_copy: int, seed: int, keep: bool) -> str:
    words = ["nodule-detection", "make-lesion-dataset", str(ds.root), "-o", str(outdir)]
    if scans is not None:
        words += ["--scans", *scans]
    words += ["--lesions", str(lesions), "--per-copy", str(per_copy), "--seed", str(seed)]
    return shlex.join(words + (["--keep-real-nodules"] if keep else []))


def _readme(summary: dict, hosts: list[ScanEntry]) -> str:
    inserted = [x for c in summary["copies"] for x in c["inserted"]]

    def counts(key: str) -> str:
        values: dict[str, int] = {}
        for x in inserted:
            values[x[key]] = values.get(x[key], 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(values.items()))

    sizes = ", ".join(f"{name} mm {sum(lo <= x['diameter_mm'] < hi for x in inserted)}"
                      for name, lo, hi in SIZE_BINS[1:5])
    real = "`nodule` rows" if summary["keep_real_nodules"] else "`excluded` rows (scored on the original scans)"
    lines = [
        "# Inserted-lesion validation set", "",
        "Made by NoduleDetection (`lesion_dataset.py`) with:", "", f"    {summary['command']}", "",
        f"Hosts ({summary['layout']} layout, `{summary['source']}`): "
        + ", ".join(f"`{h.name}`" for h in hosts) + ".",
        f"Seed {summary['seed']}: specifications from `default_rng({summary['seed']})`, placement in copy j from "
        f"`default_rng([{summary['seed']}, j])`. Training configs use insertion seeds below {VALIDATION_SEED}, so "
        "these lesions' seeds and shapes are never used in training (shape seeds are listed in `lesions.json`).",
        "",
        f"{summary['inserted']} lesions inserted ({summary['lesions_requested']} requested, {summary['skipped']} "
        f"found no place) into {len(summary['copies'])} copies, {summary['per_copy']} per copy (a lesion that "
        "found no place in a copy was tried again in the next copy made); "
        f"{summary['seconds']:.0f} s.",
        f"- size: {sizes}", f"- texture: {counts('texture')}", f"- position: {counts('position')}",
        f"- shape: {counts('shape')}", "",
        "`annotations.csv`: inserted lesions are `nodule` rows (centre = centroid of the lesion's label, world "
        "LPS mm; diameter = specified equivalent-sphere diameter; texture, shape, position of the lesion). Each "
        "copy carries its host's findings: `excluded` and `mass` rows unchanged, real nodules as " + real + ". "
        "Every host finding was kept clear of inserted lesions (radius max(d/2, 5 mm) + 3 mm margin).",
        "",
        "Score a detector with `nodule-detection evaluate-detector <this folder> -o OUT` (LUNA16 FROC; "
        "sensitivity by size, texture, position and shape in froc.json and report.md).", "",
    ]
    return "\n".join(lines)
