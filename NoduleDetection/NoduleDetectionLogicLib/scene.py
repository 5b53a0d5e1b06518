"""MRML scene ↔ core: volume node → ``CTVolume``; detection result → markups, segmentation and table nodes.

Coordinates: the core works in LPS mm on arrays indexed ``[k, j, i]``; the Slicer scene is RAS mm. A volume
node's ``IJKToRASMatrix`` (any flip or oblique direction) becomes a ``Geometry`` through
``Geometry.from_ijk_to_ras``, and every point goes back to RAS through ``geometry.lps_to_ras``: nothing here
assumes an identity direction.

Transforms: the detector sees the volume's own (local) grid. The output nodes are put under the volume's
parent transform, if any, so they stay on the image whatever that transform is (linear or not), exactly
as the volume itself is displayed.

Scene changes are made only by ``add_result_nodes`` (called on Slicer's main thread); it builds everything
first and touches the scene last, and removes the nodes it created if anything fails, so an error or a
cancelled run leaves the scene as it was.

Only MRML/VTK classes from ``slicer``, ``vtk``, numpy, scipy and ``NoduleDetectionLib`` are imported here: no
Qt, no ``slicer.util``. So this module runs in the Slicer application, in plain Python with the
``slicer-core`` wheel, and under pytest.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import slicer
import vtk
from NoduleDetectionLib.errors import InputError
from NoduleDetectionLib.geometry import Geometry, lps_to_ras
from NoduleDetectionLib.io import PADDING_BELOW_HU, validate_ct
from NoduleDetectionLib.volume import AIR_HU, CTVolume
from NoduleDetectionLib.writers import _COLORS as NODULE_COLORS
from NoduleDetectionLib.writers import nodule_description, terminology_entry
from scipy import ndimage
from vtk.util import numpy_support

from .parameters import ROLE_MARKUPS, ROLE_SEGMENTATION, ROLE_VOLUME

#: Columns of the results table node: name → (VTK array class, unit, description).
TABLE_COLUMNS = {
    "label": (vtk.vtkIntArray, "", "Nodule number: label value in the segmentation, control point N<label>"),
    "R": (vtk.vtkDoubleArray, "mm", "Centre, right (RAS, in the input volume's frame)"),
    "A": (vtk.vtkDoubleArray, "mm", "Centre, anterior (RAS, in the input volume's frame)"),
    "S": (vtk.vtkDoubleArray, "mm", "Centre, superior (RAS, in the input volume's frame)"),
    "diameter_mm": (vtk.vtkDoubleArray, "mm", "Equivalent-sphere diameter"),
    "volume_mm3": (vtk.vtkDoubleArray, "mm3", "Segmented volume"),
    "probability": (vtk.vtkDoubleArray, "", "Detector probability (0..1)"),
    "kind": (vtk.vtkStringArray, "", "nodule, or mass (diameter over 30 mm)"),
}

class SceneOutputs(NamedTuple):
    """The nodes one detection run fills: one control point, one segment and one table row per nodule.

    A named tuple: ``markups, segmentation, table = logic.process(volumeNode)`` works.
    """

    markups: Any  # vtkMRMLMarkupsFiducialNode
    segmentation: Any  # vtkMRMLSegmentationNode
    table: Any  # vtkMRMLTableNode


def create_scene() -> Any:
    """A new ``vtkMRMLScene`` with the application, markups and segmentations logics registered.

    Only needed outside the Slicer application (slicer-core in plain Python, tests); inside Slicer use
    ``slicer.mrmlScene``. The logics are kept alive as attributes of the returned scene's Python wrapper.
    """
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = [app_logic]
    for cls in (slicer.vtkSlicerMarkupsLogic, slicer.vtkSlicerSegmentationsModuleLogic):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logics.append(logic)
    scene.nodule_detection_logics = logics
    return scene


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's 4×4 ``IJKToRASMatrix`` (RAS mm, its local frame, parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_from_node(volume_node: Any) -> CTVolume:
    """A copy of a scalar volume node as a ``CTVolume`` (HU, array ``[k, j, i]``, LPS geometry).

    Padding follows ``io.read_ct``'s rule: voxels below ``io.PADDING_BELOW_HU`` (scanner padding such as -2048
    outside the reconstruction circle) become ``AIR_HU`` and are flagged in ``padding_mask``; other values
    below ``AIR_HU`` are clipped to it. ``io.validate_ct`` then checks that it is a 3D CT in HU; its warnings
    are in ``metadata["warnings"]``.

    Raises:
        InputError: no node, not a scalar volume (label map, vector volume), no voxels, a 2D image, a
            non-orthonormal IJK-to-RAS matrix, or not a CT in HU.
    """
    if volume_node is None:
        raise InputError("no input volume: select a CT volume")
    name = volume_node.GetName() or "volume"
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{name}' is a {volume_node.GetClassName()}, not a CT (scalar) volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{name}' has no voxels: load the CT first")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel; a CT has one")
    try:
        geometry = Geometry.from_ijk_to_ras(ijk_to_ras(volume_node))
    except ValueError as exc:
        raise InputError(f"'{name}' has an unusable geometry: {exc}") from None
    dims = image.GetDimensions()  # (i, j, k)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    padding = values < PADDING_BELOW_HU
    hu = values.astype(np.promote_types(values.dtype, np.int16))  # a copy (the detector owns it), signed
    np.maximum(hu, AIR_HU, out=hu)
    hu[padding] = AIR_HU
    fits_int16 = np.issubdtype(hu.dtype, np.integer) and hu.max() <= np.iinfo(np.int16).max
    volume = CTVolume(
        hu.astype(np.int16 if fits_int16 else np.float32, copy=False),
        geometry,
        name=name,
        padding_mask=padding if padding.any() else None,
        metadata={"source": f"scene node {volume_node.GetID()}"},
    )
    volume.metadata["warnings"] = validate_ct(volume)
    return volume


def add_volume_node(scene: Any, volume: CTVolume, name: Optional[str] = None) -> Any:
    """Add ``volume`` to ``scene`` as a new ``vtkMRMLScalarVolumeNode`` (voxels copied, geometry exact)."""
    k, j, i = volume.array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(volume.array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name or volume.name))
    node.SetIJKToRASMatrix(_vtk_matrix(volume.geometry.ijk_to_ras))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def segment_name(nodule: Any) -> str:
    """Segment name shown in Slicer, e.g. ``"Nodule 1 (p=0.93, 12.4 mm)"``."""
    return f"{nodule.kind.capitalize()} {nodule.label} (p={nodule.probability:.2f}, {nodule.diameter_mm:.1f} mm)"


def _nodule_images(result: Any, ijk_to_ras_matrix: vtk.vtkMatrix4x4) -> list:
    """One binary ``vtkOrientedImageData`` per nodule, cropped to its bounding box on the input grid."""
    label_map = np.asarray(result.label_map)
    boxes = ndimage.find_objects(label_map.astype(np.int32, copy=False))
    images = []
    for nodule in result.nodules:
        box = boxes[nodule.label - 1] if nodule.label <= len(boxes) else None
        image = slicer.vtkOrientedImageData()
        image.SetImageToWorldMatrix(ijk_to_ras_matrix)
        if box is None:  # no voxel carries this label: an empty segment keeps rows and segments in step
            image.SetExtent(0, -1, 0, -1, 0, -1)
        else:
            ks, js, is_ = box
            image.SetExtent(is_.start, is_.stop - 1, js.start, js.stop - 1, ks.start, ks.stop - 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            crop = (label_map[box] == nodule.label).astype(np.uint8)
            numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = crop.ravel()
        images.append(image)
    return images


def _results_table(result: Any) -> vtk.vtkTable:
    table = vtk.vtkTable()
    ras = lps_to_ras(np.array([n.center_lps for n in result.nodules], dtype=float).reshape(-1, 3))
    values = {
        "label": [n.label for n in result.nodules],
        "R": ras[:, 0],
        "A": ras[:, 1],
        "S": ras[:, 2],
        "diameter_mm": [n.diameter_mm for n in result.nodules],
        "volume_mm3": [n.volume_mm3 for n in result.nodules],
        "probability": [n.probability for n in result.nodules],
        "kind": [n.kind for n in result.nodules],
    }
    for column, (array_class, _, _) in TABLE_COLUMNS.items():
        array = array_class()
        array.SetName(column)
        convert = {vtk.vtkIntArray: int, vtk.vtkDoubleArray: float, vtk.vtkStringArray: str}[array_class]
        for value in values[column]:
            array.InsertNextValue(convert(value))
        table.AddColumn(array)
    return table


def _new_or_given(scene: Any, node: Any, class_name: str, name: str, created: list) -> Any:
    if node is not None:
        return node
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    created.append(node)
    return node


def add_result_nodes(
    result: Any,
    volume_node: Any,
    markups_node: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
) -> SceneOutputs:
    """Show a detection result in the scene of ``volume_node``; return the three output nodes.

    Args:
        result: a ``detect.DetectionResult`` computed on ``volume_from_node(volume_node)``: label map
            ``[k, j, i]`` on the volume's grid, nodule centres in LPS mm.
        volume_node: the input CT volume node.
        markups_node, segmentation_node, table_node: nodes to fill, replacing their contents; ``None``
            (the default) creates a new node with a unique name, so earlier results are never overwritten.

    Markups: control point ``N<label>`` at each centre in RAS (``lps_to_ras(center_lps)``), locked,
    described ``"p=…, d=… mm, kind"``. Segmentation: reference geometry = the volume's; segment
    ``Segment_<label>`` named ``segment_name(nodule)`` with a colour and a Slicer terminology entry (lung
    nodule or mass). Table: ``TABLE_COLUMNS``, one row per nodule, referencing the other nodes.

    Raises:
        ValueError: ``result`` was not computed on this volume's grid.
    """
    scene = volume_node.GetScene()
    geometry = Geometry.from_ijk_to_ras(ijk_to_ras(volume_node))
    dims = volume_node.GetImageData().GetDimensions()
    if np.asarray(result.label_map).shape != tuple(dims[::-1]) or result.geometry != geometry:
        raise ValueError(f"the detection result does not lie on the grid of '{volume_node.GetName()}'")
    ijk_to_ras_matrix = _vtk_matrix(geometry.ijk_to_ras)
    images = _nodule_images(result, ijk_to_ras_matrix)
    table = _results_table(result)
    centres_ras = lps_to_ras(np.array([n.center_lps for n in result.nodules], dtype=float).reshape(-1, 3))

    base = volume_node.GetName()
    created: list = []
    try:
        markups_node = _new_or_given(scene, markups_node, "vtkMRMLMarkupsFiducialNode", f"{base} nodules", created)
        segmentation_node = _new_or_given(
            scene, segmentation_node, "vtkMRMLSegmentationNode", f"{base} nodule segmentation", created
        )
        table_node = _new_or_given(scene, table_node, "vtkMRMLTableNode", f"{base} nodule table", created)
        transform_id = volume_node.GetTransformNodeID()

        markups_node.RemoveAllControlPoints()
        for nodule, ras in zip(result.nodules, centres_ras):
            index = markups_node.AddControlPoint(vtk.vtkVector3d(*ras), f"N{nodule.label}")
            markups_node.SetNthControlPointDescription(index, nodule_description(nodule))
            markups_node.SetNthControlPointLocked(index, True)
        markups_node.CreateDefaultDisplayNodes()

        segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        for nodule, image in zip(result.nodules, images):
            color = NODULE_COLORS[(nodule.label - 1) % len(NODULE_COLORS)]
            segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
                image, segment_name(nodule), color, f"Segment_{nodule.label}"
            )
            segmentation_node.GetSegmentation().GetSegment(segment_id).SetTerminology(terminology_entry(nodule.kind))
        segmentation_node.CreateDefaultDisplayNodes()

        table_node.SetAndObserveTable(table)
        for column, (_, unit, description) in TABLE_COLUMNS.items():
            table_node.SetColumnUnitLabel(column, unit)
            table_node.SetColumnDescription(column, description)
        table_node.SetNodeReferenceID(ROLE_VOLUME, volume_node.GetID())
        table_node.SetNodeReferenceID(ROLE_MARKUPS, markups_node.GetID())
        table_node.SetNodeReferenceID(ROLE_SEGMENTATION, segmentation_node.GetID())

        for node in (markups_node, segmentation_node):
            node.SetAndObserveTransformNodeID(transform_id)
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        raise
    return SceneOutputs(markups_node, segmentation_node, table_node)


def run_detection(
    volume_node: Any,
    detector: Any,
    threshold: Optional[float] = None,
    progress: Optional[Callable[[str, float], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    markups_node: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
) -> SceneOutputs:
    """Detect nodules in ``volume_node`` with ``detector`` (a ``detect.Detector``) and add the results.

    Runs in the calling thread; ``progress(stage, fraction)`` and ``cancel()`` are passed to
    ``Detector.detect``. A cancelled run raises ``detect.Cancelled`` before the scene is touched.
    """
    volume = volume_from_node(volume_node)
    result = detector.detect(volume, threshold=threshold, progress=progress, cancel=cancel)
    return add_result_nodes(result, volume_node, markups_node, segmentation_node, table_node)
