"""Scene → training data set: CT volume nodes and the nodules marked on them become files in the shared layout.

Output (the layout of ``../shared/data``, read by ``datasets.Dataset.open`` and ``nodule-detection train``)::

    OUTDIR/ct/<name>.nrrd        one file per volume node (HU, its own grid, LPS geometry)
    OUTDIR/annotations.csv       seriesuid,scan,coordX,coordY,coordZ,diameter_mm,status,source

Marks (what the user draws in Slicer):

* each defined control point of a **point list** (``vtkMRMLMarkupsFiducialNode``) is a nodule centre; its
  diameter is the length of the **line** (``vtkMRMLMarkupsLineNode``, Slicer's ruler) nearest to it whose
  midpoint lies within half the line's length + ``LINE_TOLERANCE_MM`` of the point, else the default
  diameter the user set;
* each segment of a **segmentation** is a nodule at its centroid, with its equivalent-sphere diameter
  ``(6 V / π)^(1/3)``;
* each point of an **excluded** point list is a finding that is neither a target nor a negative (LUNA16's
  excluded findings: a doubtful spot, a scar, a known finding of a host scan); its diameter is its ruler's,
  else -1 (a point mark; training masks ``max(d / 2, 5 mm)`` around it).

A mark belongs to every exported volume whose voxel grid contains it. Status is ``nodule`` (``mass`` above
``MASS_DIAMETER_MM``, as in ``datasets``) or ``excluded``; ``source`` says which node and point or segment it
came from.

Coordinates: marks are read in world RAS (``GetNthControlPointPositionWorld``, the segmentation's parent
transform applied), brought into the volume's own frame through the inverse of the volume's parent transform
(linear or not: ``vtkMRMLTransformNode.GetTransformBetweenNodes``), and written in LPS mm through
``geometry.ras_to_lps``: the CSV's coordinates are those of the exported ``.nrrd`` file's physical space, as
SimpleITK reports them. The ``.nrrd`` holds the volume's local grid (``scene.volume_from_node``).

MRML and numpy only: no Qt, no ``slicer.util``; runs in Slicer and under pytest with slicer-core.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk
from NoduleDetectionLib.atomic import check_writable, write_text_atomic
from NoduleDetectionLib.errors import InputError
from NoduleDetectionLib.geometry import Geometry, ras_to_lps
from NoduleDetectionLib.io import write_volume
from NoduleDetectionLogicLib.scene import ijk_to_ras, volume_from_node
from vtk.util import numpy_support

#: A line counts as a mark's ruler if its midpoint is within half its length plus this (mm) of the mark.
LINE_TOLERANCE_MM = 2.0
#: Findings larger than this (mm) are written with status ``mass`` (``datasets.STATUSES``; the model's
#: ``ModelConfig.mass_diameter_mm`` default).
MASS_DIAMETER_MM = 30.0
#: Columns of the written ``annotations.csv``.
CSV_COLUMNS = ("seriesuid", "scan", "coordX", "coordY", "coordZ", "diameter_mm", "status", "source")


@dataclass(frozen=True)
class Mark:
    """A nodule marked in the scene, in world RAS mm (before it is assigned to a volume).

    Attributes:
        center_ras: centre, world RAS mm.
        diameter_mm: diameter in mm (-1: a point mark of unknown size).
        source: where it came from (node name, point label or segment name, how the diameter was found).
    """

    center_ras: tuple[float, float, float]
    diameter_mm: float
    source: str
    status: str = "nodule"


@dataclass
class ExportedScan:
    """One exported volume: its file and its rows ``(centre LPS mm, diameter mm, status, source)``."""

    name: str
    path: Path
    findings: list[tuple[tuple[float, float, float], float, str, str]] = field(default_factory=list)


@dataclass
class ExportResult:
    """What ``export_scene`` wrote: the data set folder, its ``annotations.csv`` and the scans."""

    root: Path
    annotations: Path
    scans: list[ExportedScan]

    @property
    def nodule_count(self) -> int:
        """Number of target rows written (``nodule`` and ``mass``)."""
        return sum(f[2] != "excluded" for s in self.scans for f in s.findings)


def _transform_between(from_node: Any, to_node: Any) -> vtk.vtkGeneralTransform:
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(from_node, to_node, transform)
    return transform


def _nodes_of_class(scene: Any, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _lines(scene: Any) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``(point A, point B, name)`` of every line node with two defined points, world RAS."""
    lines = []
    for node in _nodes_of_class(scene, "vtkMRMLMarkupsLineNode"):
        if node.GetNumberOfDefinedControlPoints() < 2:
            continue
        ends = []
        for i in range(2):
            p = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, p)
            ends.append(np.array(p))
        lines.append((ends[0], ends[1], node.GetName()))
    return lines


def point_marks(markups_node: Any, default_diameter_mm: float, status: str = "nodule") -> list[Mark]:
    """The defined control points of a point list as marks of ``status``, each sized by the nearest ruler
    (line) around it or ``default_diameter_mm`` (-1 for ``excluded`` points: a point mark)."""
    if default_diameter_mm <= 0 and status == "nodule":
        raise InputError(f"the default nodule diameter must be positive, got {default_diameter_mm} mm")
    lines = _lines(markups_node.GetScene())
    marks = []
    for i in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(i) != markups_node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        point = np.array(p)
        source = f"point list '{markups_node.GetName()}' point '{markups_node.GetNthControlPointLabel(i)}'"
        near = []
        for a, b, name in lines:
            length = float(np.linalg.norm(b - a))
            distance = float(np.linalg.norm((a + b) / 2 - point))
            if distance <= length / 2 + LINE_TOLERANCE_MM:
                near.append((distance, length, name))
        if near:
            _, diameter, name = min(near)
            source += f", diameter from line '{name}'"
        elif status == "excluded":
            diameter = -1.0
        else:
            diameter = float(default_diameter_mm)
            source += ", default diameter"
        marks.append(Mark(tuple(point), diameter, source, status))
    return marks


def segment_marks(segmentation_node: Any) -> list[Mark]:
    """Each non-empty segment of a segmentation as a mark: centroid of its voxels (world RAS) and the
    equivalent-sphere diameter of its volume."""
    segmentation = segmentation_node.GetSegmentation()
    to_world = _transform_between(segmentation_node.GetParentTransformNode(), None)
    marks = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        image = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
        scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
        if scalars is None:
            continue
        dims = image.GetDimensions()
        values = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])
        k, j, i = np.nonzero(values)
        if not len(i):
            continue
        extent = image.GetExtent()
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        centre_ijk = np.array([i.mean() + extent[0], j.mean() + extent[2], k.mean() + extent[4], 1.0])
        centre = to_world.TransformPoint((m @ centre_ijk)[:3])
        voxel_mm3 = abs(np.linalg.det(m[:3, :3]))
        diameter = (6.0 * len(i) * voxel_mm3 / math.pi) ** (1.0 / 3.0)
        name = segmentation.GetSegment(segment_id).GetName()
        marks.append(Mark(tuple(centre), float(diameter), f"segmentation '{segmentation_node.GetName()}' "
                                                          f"segment '{name}'"))
    return marks


def scene_marks(scene: Any, annotation_nodes: Optional[Sequence[Any]] = None,
                default_diameter_mm: float = 6.0, excluded_nodes: Sequence[Any] = ()) -> list[Mark]:
    """Marks of ``annotation_nodes`` (point lists and segmentations; default: every one in ``scene`` except
    ``excluded_nodes``) and the ``excluded`` marks of the point lists ``excluded_nodes``."""
    excluded_ids = {node.GetID() for node in excluded_nodes}
    if annotation_nodes is None:
        annotation_nodes = [node for node in (_nodes_of_class(scene, "vtkMRMLMarkupsFiducialNode")
                                              + _nodes_of_class(scene, "vtkMRMLSegmentationNode"))
                            if node.GetID() not in excluded_ids]
    marks = []
    for node in excluded_nodes:
        if not node.IsA("vtkMRMLMarkupsFiducialNode"):
            raise InputError(f"'{node.GetName()}' is a {node.GetClassName()}: mark excluded findings with a point list")
        marks += point_marks(node, default_diameter_mm, status="excluded")
    for node in annotation_nodes:
        if node.IsA("vtkMRMLMarkupsFiducialNode"):
            marks += point_marks(node, default_diameter_mm)
        elif node.IsA("vtkMRMLSegmentationNode"):
            marks += segment_marks(node)
        else:
            raise InputError(f"'{node.GetName()}' is a {node.GetClassName()}: mark nodules with a point list "
                             "or a segmentation")
    return marks


def file_stem(name: str) -> str:
    """A file name stem made from a node name: characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"
    return stem


def export_scene(
    volume_nodes: Sequence[Any],
    outdir: str | Path,
    annotation_nodes: Optional[Sequence[Any]] = None,
    default_diameter_mm: float = 6.0,
    excluded_nodes: Sequence[Any] = (),
    overwrite: bool = False,
) -> ExportResult:
    """Write ``volume_nodes`` and the nodules marked on them as a data set in the shared layout.

    Args:
        volume_nodes: CT scalar volume nodes (HU) of one scene.
        outdir: data set folder; ``ct/`` and ``annotations.csv`` are written into it.
        annotation_nodes: point lists and segmentations that mark nodules (default: all in the scene).
        default_diameter_mm: diameter of a point that has no ruler around it.
        excluded_nodes: point lists of findings that are neither targets nor negatives (``excluded`` rows).
        overwrite: replace existing files of the same names.

    Returns:
        An ``ExportResult``; ``datasets.Dataset.open(result.root)`` reads it back.

    Raises:
        InputError: no volume, a volume that is not a CT (``scene.volume_from_node``), an unusable node.
        OutputError: a file exists and ``overwrite`` is false.
    """
    if not volume_nodes:
        raise InputError("no volume to export: select at least one CT volume")
    scene = volume_nodes[0].GetScene()
    marks = scene_marks(scene, annotation_nodes, default_diameter_mm, excluded_nodes)
    root = Path(outdir)
    annotations = check_writable(root / "annotations.csv", overwrite)
    volumes, used = [], set()
    for node in volume_nodes:
        stem = file_stem(node.GetName())
        stem_n, n = stem, 2
        while stem_n in used:
            stem_n, n = f"{stem}_{n}", n + 1
        used.add(stem_n)
        path = check_writable(root / "ct" / f"{stem_n}.nrrd", overwrite)
        volumes.append((node, volume_from_node(node), path))

    scans, rows = [], []
    for node, volume, path in volumes:
        geometry = Geometry.from_ijk_to_ras(ijk_to_ras(node))
        to_local = _transform_between(None, node.GetParentTransformNode())
        dims = np.array(volume.array.shape[::-1])
        scan = ExportedScan(path.stem, path)
        for mark in marks:
            local_ras = np.array(to_local.TransformPoint(mark.center_ras))
            ijk = geometry.ras_to_index(local_ras)
            if np.any(ijk < -0.5) or np.any(ijk > dims - 0.5):
                continue
            lps = tuple(float(v) for v in ras_to_lps(local_ras))
            status = "mass" if mark.status == "nodule" and mark.diameter_mm > MASS_DIAMETER_MM else mark.status
            scan.findings.append((lps, mark.diameter_mm, status, mark.source))
            rows.append([path.stem, path.name, *(f"{v:.3f}" for v in lps), f"{mark.diameter_mm:.2f}", status,
                         f"scene: {mark.source}"])
        write_volume(volume, path, overwrite)
        scans.append(scan)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(annotations, text.getvalue(), overwrite)
    return ExportResult(root, annotations, scans)
