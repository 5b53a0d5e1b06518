"""Annotated CT data sets: the findings of a scan and where its image lies.

Three layouts are recognised:

* **LUNA16**: ``subset*/<seriesuid>.mhd`` (or ``<seriesuid>.mhd`` at the top), ``annotations.csv``
  (``seriesuid,coordX,coordY,coordZ,diameter_mm``: the nodules) and, optionally,
  ``annotations_excluded.csv`` (same columns: findings that are neither targets nor false positives;
  ``diameter_mm`` is -1 where no size exists) and, optionally, ``candidates_V2.csv`` or ``candidates.csv``
  (``seriesuid,coordX,coordY,coordZ,class``: the challenge's candidate points; those of class 0 are kept as
  ``ScanEntry.negatives``, known non-nodules for training stage 2).
* **shared** (the layout of ``../shared/data``): ``ct/`` holds one entry per scan (a DICOM folder or an
  image file) and one ``annotations.csv`` lists every finding with a ``scan`` column (the entry's name
  under ``ct/``) and a ``status`` column: ``nodule`` (a target), ``excluded`` (LUNA16's excluded findings)
  or ``mass`` (a lesion over 30 mm: reported by a detector, but not a LUNA16 nodule). Without
  ``annotations.csv`` its scans have no findings.
* **scans**: a folder of image files (``.nrrd``, ``.nii(.gz)``, ``.mha``, ``.nhdr``) and DICOM folders with no
  annotations (negatives, and hosts for inserted lesions); ``.mhd`` files make it a LUNA16 folder.

All coordinates are world LPS millimetres, as SimpleITK reports physical points (the LUNA16 convention).
This module only lists files and reads CSV tables; it never opens an image (``io.read_ct`` does).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .io import read_ct
from .volume import CTVolume

#: Values of the ``status`` column of the shared layout.
STATUSES = ("nodule", "excluded", "mass")

_COORD_COLUMNS = ("coordX", "coordY", "coordZ")
_IMAGE_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mhd", ".mha")


@dataclass(frozen=True)
class Finding:
    """One annotated finding.

    Attributes:
        seriesuid: the scan it lies in (LUNA16 ``seriesuid``).
        center_lps: centre ``(x, y, z)`` in world LPS mm.
        diameter_mm: diameter in mm; -1 (any negative value) where none is known.
        status: ``"nodule"``, ``"excluded"`` or ``"mass"``.
        attributes: the table's further columns (``scan``, ``source``, ``texture``, ``shape``, ``position``
            ...) as stripped text; left out of the hash.
    """

    seriesuid: str
    center_lps: tuple[float, float, float]
    diameter_mm: float
    status: str
    attributes: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass
class ScanEntry:
    """One scan of a data set.

    Attributes:
        seriesuid: LUNA16 ``seriesuid`` (SeriesInstanceUID for DICOM, the file name without extension
            otherwise).
        path: the image: a ``.mhd``/``.nrrd``/``.nii(.gz)`` file or a DICOM folder.
        annotations: target nodules (``status`` nodule).
        excluded: excluded findings (neither a hit nor a false positive in LUNA16 scoring).
        masses: lesions over 30 mm (shared layout only), scored apart from the nodules.
        negatives: LUNA16 candidate points of class 0 (world LPS mm): false candidates of the challenge's
            detectors, negatives for training stage 2 (LUNA16 layout only; ``candidates_V2.csv`` if present,
            else ``candidates.csv``; read when ``Dataset.open`` is asked for them).
    """

    seriesuid: str
    path: Path
    annotations: list[Finding] = field(default_factory=list)
    excluded: list[Finding] = field(default_factory=list)
    masses: list[Finding] = field(default_factory=list)
    negatives: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The entry's file or folder name (``LIDC-IDRI-0003.nrrd``, ``<uid>.mhd``)."""
        return self.path.name

    @property
    def stem(self) -> str:
        """The entry's name without its image extension (``LIDC-IDRI-0003``, ``<uid>``)."""
        return _without_suffix(self.path.name)

    def read(self) -> CTVolume:
        """The scan in HU with its LPS geometry (``io.read_ct``; a DICOM folder is read for this entry's series)."""
        return read_ct(self.path, series_uid=self.seriesuid if self.path.is_dir() else None)


@dataclass
class Dataset:
    """The scans of a LUNA16, shared-layout or plain folder of scans, each with its findings.

    Example::

        ds = Dataset.open("/data/luna16")             # every subset*/*.mhd
        ds = Dataset.open("../shared/data", scans=["LIDC-IDRI-0003.nrrd", "pyradiomics-lung1"])
        for scan in ds.scans:
            print(scan.seriesuid, scan.path, len(scan.annotations))
    """

    root: Path
    layout: str
    scans: list[ScanEntry]

    @classmethod
    def open(cls, root: str | os.PathLike, scans: list[str] | None = None, negatives: bool = False) -> Dataset:
        """List the scans under ``root`` with their findings.

        ``scans`` restricts the list: each item is a seriesuid or an entry name (with or without its
        extension); an item that names no scan raises ``InputError``. The order is that of ``scans``, or
        sorted by entry name. ``negatives``: also read a LUNA16 folder's candidate table into
        ``ScanEntry.negatives`` (for training; it has about 750 000 rows).
        """
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"data set folder {root} does not exist")
        if (root / "ct").is_dir():
            entries, layout = _shared_entries(root), "shared"
        elif (root / "annotations.csv").is_file() or any(root.glob("*.mhd")) or any(root.glob("subset*/*.mhd")):
            entries, layout = _luna16_entries(root, negatives), "luna16"
        else:
            entries, layout = _scan_entries(root), "scans"
        if not entries:
            raise InputError(f"{root} holds no scan: expected subset*/*.mhd, *.mhd, ct/ entries, image files or "
                             "DICOM folders")
        return cls(root=root, layout=layout, scans=_select(entries, scans, root))

    @property
    def seriesuids(self) -> list[str]:
        """The scans' seriesuids, in order."""
        return [s.seriesuid for s in self.scans]

    def findings(self) -> list[Finding]:
        """Every finding of the listed scans (nodules, excluded findings and masses)."""
        return [f for s in self.scans for f in (*s.annotations, *s.excluded, *s.masses)]


def read_findings(path: str | os.PathLike, status: str | None = None) -> list[Finding]:
    """Read an annotation table (world LPS mm).

    Columns: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` and, in the shared layout, ``status``. A
    table without ``status`` takes ``status`` (``"nodule"`` for LUNA16's annotations.csv, ``"excluded"``
    for annotations_excluded.csv); a table with it keeps its own. Raises ``InputError`` for a missing
    file or column, a non-numeric value or an unknown status. Further columns go into ``attributes``.
    """
    path = Path(path)
    standard = ("seriesuid", *_COORD_COLUMNS, "diameter_mm")
    rows, columns = read_table(path, standard)
    extra = [c for c in columns if c not in (*standard, "status")]
    has_status = "status" in columns
    if not has_status and status is None:
        raise InputError(f"{path}: no 'status' column; say whether its rows are nodules or excluded findings")
    findings = []
    for line, row in rows:
        kind = row["status"].strip().lower() if has_status else status
        if kind not in STATUSES:
            raise InputError(f"{path}:{line}: status {row['status']!r} is not one of {', '.join(STATUSES)}")
        findings.append(Finding(
            seriesuid=row["seriesuid"].strip(),
            center_lps=tuple(number(row, c, path, line) for c in _COORD_COLUMNS),
            diameter_mm=number(row, "diameter_mm", path, line),
            status=kind,
            attributes={c: row[c].strip() for c in extra},
        ))
    return findings


def read_scan_list(path: str | os.PathLike) -> list[str]:
    """Read a list of scans: one seriesuid (or entry name) per line.

    LUNA16's ``seriesuids.csv`` also works (the first comma-separated field is used); blank lines, lines
    starting with ``#`` and a ``seriesuid`` header are skipped. Duplicates raise ``InputError``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scan list {path} does not exist")
    names: list[str] = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        name = line.split(",")[0].strip()
        if not name or name.startswith("#") or name == "seriesuid":
            continue
        if name in names:
            raise InputError(f"{path}: scan {name} is listed twice")
        names.append(name)
    if not names:
        raise InputError(f"{path} lists no scan")
    return names


def read_table(path: Path, required: tuple[str, ...]) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """Read a CSV file with a header; return ``[(line number, row)]`` and the column names.

    Raises ``InputError`` if the file is missing, has no header, lacks a ``required`` column or has a row
    with too few fields.
    """
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path} is empty; expected a header line")
        columns = [c.strip() for c in header]
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) < len(columns):
                raise InputError(f"{path}:{reader.line_num}: {len(values)} fields, the header has {len(columns)}")
            rows.append((reader.line_num, dict(zip(columns, values))))
    return rows, columns


def number(row: dict[str, str], column: str, path: Path, line: int) -> float:
    """The finite float in ``row[column]``; ``InputError`` naming file and line otherwise."""
    text = row[column].strip()
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}:{line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{path}:{line}: {column} {text!r} is not a finite number")
    return value


def series_uid_of(path: Path) -> str:
    """The LUNA16 seriesuid of an image entry: the file name without its extension, or, for a DICOM
    folder, its SeriesInstanceUID (read with SimpleITK; the folder must hold exactly one series)."""
    if path.is_dir():
        import SimpleITK as sitk

        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(uids) != 1:
            raise InputError(f"{path}: expected one DICOM series, found {len(uids)}")
        return uids[0]
    return _without_suffix(path.name)


def _without_suffix(name: str) -> str:
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _luna16_entries(root: Path, negatives: bool = False) -> list[ScanEntry]:
    images = sorted(root.glob("subset*/*.mhd")) or sorted(root.glob("*.mhd"))
    entries = {p.stem: ScanEntry(seriesuid=p.stem, path=p) for p in images}
    annotations = root / "annotations.csv"
    if not annotations.is_file():
        raise InputError(f"{root}: no annotations.csv beside the .mhd files (LUNA16 layout)")
    findings = read_findings(annotations, status="nodule")
    excluded = root / "annotations_excluded.csv"
    if excluded.is_file():
        findings += read_findings(excluded, status="excluded")
    _attach(entries, findings)
    listed = next((p for p in (root / "candidates_V2.csv", root / "candidates.csv") if p.is_file()), None)
    if negatives and listed is not None:
        for uid, points in read_candidate_negatives(listed).items():
            if uid in entries:
                entries[uid].negatives = points
    return list(entries.values())


def read_candidate_negatives(path: str | os.PathLike) -> dict[str, list[tuple[float, float, float]]]:
    """The class-0 points (world LPS mm) of a LUNA16 candidates table (``seriesuid,coordX,coordY,coordZ,class``)
    by seriesuid; a class other than 0 or 1 is an ``InputError``."""
    path = Path(path)
    rows, _ = read_table(path, ("seriesuid", *_COORD_COLUMNS, "class"))
    out: dict[str, list[tuple[float, float, float]]] = {}
    for line, row in rows:
        label = row["class"].strip()
        if label not in ("0", "1"):
            raise InputError(f"{path}:{line}: class {label!r} is not 0 or 1")
        if label == "0":
            point = tuple(number(row, c, path, line) for c in _COORD_COLUMNS)
            out.setdefault(row["seriesuid"].strip(), []).append(point)
    return out


def _shared_entries(root: Path) -> list[ScanEntry]:
    annotations = root / "annotations.csv"
    if not annotations.is_file():
        return _scan_entries(root / "ct")
    rows, _ = read_table(annotations, ("seriesuid", "scan", *_COORD_COLUMNS, "diameter_mm", "status"))
    findings = read_findings(annotations)
    uid_of_entry: dict[str, str] = {}
    for (line, row), finding in zip(rows, findings):
        entry = row["scan"].strip()
        if uid_of_entry.setdefault(entry, finding.seriesuid) != finding.seriesuid:
            raise InputError(f"{annotations}:{line}: scan {entry} has two seriesuids")
        if not (root / "ct" / entry).exists():
            raise InputError(f"{annotations}:{line}: scan {entry} is not in {root / 'ct'}")
    entries = {}
    for path in sorted((root / "ct").iterdir()):
        if path.name.startswith("."):
            continue
        uid = uid_of_entry.get(path.name) or series_uid_of(path)
        entries[uid] = ScanEntry(seriesuid=uid, path=path)
    _attach(entries, findings)
    return list(entries.values())


def _scan_entries(folder: Path) -> list[ScanEntry]:
    """Every image file (by extension) and folder (a DICOM series) in ``folder``, without findings."""
    entries: dict[str, ScanEntry] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or _without_suffix(path.name) != path.name):
            continue
        uid = series_uid_of(path)
        if uid in entries:
            raise InputError(f"{folder}: {entries[uid].name} and {path.name} are both scan {uid}")
        entries[uid] = ScanEntry(seriesuid=uid, path=path)
    return list(entries.values())


def _attach(entries: dict[str, ScanEntry], findings: list[Finding]) -> None:
    """Sort findings into their scans' lists; findings of scans without an image are dropped (LUNA16's
    annotations cover all ten subsets, a folder may hold only some)."""
    for f in findings:
        entry = entries.get(f.seriesuid)
        if entry is None:
            continue
        {"nodule": entry.annotations, "excluded": entry.excluded, "mass": entry.masses}[f.status].append(f)


def _select(entries: list[ScanEntry], wanted: list[str] | None, root: Path) -> list[ScanEntry]:
    if wanted is None:
        return entries
    index: dict[str, ScanEntry] = {}
    for e in entries:
        for key in (e.seriesuid, e.name, _without_suffix(e.name)):
            index.setdefault(key, e)
    chosen = []
    for name in wanted:
        if name not in index:
            raise InputError(f"scan {name} is not in {root}")
        if index[name] in chosen:
            raise InputError(f"scan {name} is listed twice")
        chosen.append(index[name])
    return chosen
