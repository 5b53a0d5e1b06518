"""NoduleDetectionTraining logic on real MRML (slicer-core): scene → data set export, training-curve nodes.

Volume nodes are built as Slicer loads them (IJKToRAS = diag(-1,-1,1)·[D·S | o] from SimpleITK's geometry),
not with the code under test. Expected LPS positions come from SimpleITK reading the exported file
(``TransformIndexToPhysicalPoint``) and from the node's own MRML matrices.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

from NoduleDetectionLib.datasets import Dataset  # noqa: E402
from NoduleDetectionLib.errors import InputError, OutputError  # noqa: E402
from NoduleDetectionLogicLib import scene  # noqa: E402
from NoduleDetectionTrainingLib import export  # noqa: E402
from NoduleDetectionTrainingLib.plot import TrainingPlot  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

#: A box of LIDC-IDRI-0002 (training host) in index (i, j, k) ranges: small enough to write in a second.
CROP = (slice(150, 230), slice(200, 260), slice(100, 140))


@pytest.fixture(scope="module")
def lidc2_crop(shared_data):
    """Part of LIDC-IDRI-0002 (SimpleITK slicing keeps its physical geometry)."""
    return sitk.ReadImage(str(shared_data / "ct" / "LIDC-IDRI-0002.nrrd"))[CROP]


def node_from_sitk(mrml_scene, image, name):
    """A scalar volume node holding ``image``, built the way Slicer loads a file (independent of our code)."""
    vtk_image = vtk.vtkImageData()
    vtk_image.SetDimensions(*image.GetSize())
    vtk_image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(sitk.GetArrayViewFromImage(image).ravel(), deep=True))
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(scene._vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))
    node.SetAndObserveImageData(vtk_image)
    return node


def ijk_to_ras_of(node, ijk):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*map(float, ijk), 1.0])[:3])


def add_points(mrml_scene, name, points_ras):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for p in points_ras:
        node.AddControlPoint(vtk.vtkVector3d(*map(float, p)))
    return node


def add_line(mrml_scene, a, b):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "ruler")
    for p in (a, b):
        node.AddControlPoint(vtk.vtkVector3d(*map(float, p)))
    return node


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mrml_scene():
    return scene.create_scene()


def test_fiducial_on_voxel_comes_back_at_its_lps_centre(mrml_scene, lidc2_crop, tmp_path):
    node = node_from_sitk(mrml_scene, lidc2_crop, "LIDC-IDRI-0002 crop")
    voxels = [(10, 20, 5), (61, 7, 33)]
    points = add_points(mrml_scene, "nodules", [ijk_to_ras_of(node, v) for v in voxels])
    points.SetNthControlPointLabel(1, "big one")
    add_line(mrml_scene, ijk_to_ras_of(node, (58, 7, 33)), ijk_to_ras_of(node, (64, 7, 33)))  # ruler over point 2
    result = export.export_scene([node], tmp_path / "ds", default_diameter_mm=5.5)

    assert result.nodule_count == 2 and result.scans[0].path == tmp_path / "ds" / "ct" / "LIDC-IDRI-0002_crop.nrrd"
    written = sitk.ReadImage(str(result.scans[0].path))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(lidc2_crop))
    rows = read_rows(result.annotations)
    assert list(rows[0]) == list(export.CSV_COLUMNS)
    for row, voxel in zip(rows, voxels):
        assert row["seriesuid"] == "LIDC-IDRI-0002_crop" and row["scan"] == "LIDC-IDRI-0002_crop.nrrd"
        coords = [float(row[c]) for c in ("coordX", "coordY", "coordZ")]
        np.testing.assert_allclose(coords, written.TransformIndexToPhysicalPoint(voxel), atol=1e-3)
        np.testing.assert_allclose(coords, lidc2_crop.TransformIndexToPhysicalPoint(voxel), atol=1e-3)
        assert row["status"] == "nodule"
    assert float(rows[0]["diameter_mm"]) == 5.5 and "default diameter" in rows[0]["source"]
    assert float(rows[1]["diameter_mm"]) == pytest.approx(6 * lidc2_crop.GetSpacing()[0], abs=0.01)
    assert "point 'big one', diameter from line 'ruler'" in rows[1]["source"]

    dataset = Dataset.open(result.root)
    assert dataset.layout == "shared" and dataset.seriesuids == ["LIDC-IDRI-0002_crop"]
    assert len(dataset.scans[0].annotations) == 2


def test_transformed_oblique_volume_and_points_outside(mrml_scene, tmp_path):
    """A flipped, oblique volume under a linear transform: the CSV is in the exported file's own frame."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image = sitk.GetImageFromArray(np.full((20, 30, 40), -900, np.int16))
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((30.0, -12.0, -200.0))
    image.SetDirection((rotation @ np.diag([1.0, -1.0, -1.0])).ravel())
    node = node_from_sitk(mrml_scene, image, "oblique")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 15.0)
    matrix.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    voxel = (12, 25, 3)
    world = ijk_to_ras_of(node, voxel) + [15.0, 0.0, -7.5]  # where the voxel is shown, in world RAS
    add_points(mrml_scene, "marks", [world, world + [0.0, 0.0, 500.0]])  # the second lies outside the volume
    result = export.export_scene([node], tmp_path / "ds")
    rows = read_rows(result.annotations)
    assert len(rows) == 1
    written = sitk.ReadImage(str(result.scans[0].path))
    np.testing.assert_allclose([float(rows[0][c]) for c in ("coordX", "coordY", "coordZ")],
                               written.TransformIndexToPhysicalPoint(voxel), atol=1e-3)


def test_segments_and_excluded_points(mrml_scene, lidc2_crop, tmp_path):
    node = node_from_sitk(mrml_scene, lidc2_crop, "host")
    dims = np.array(lidc2_crop.GetSize())
    ball = np.zeros(dims[::-1], np.uint8)
    kk, jj, ii = np.indices(ball.shape)
    ball[(np.abs(ii - 40) <= 3) & (np.abs(jj - 30) <= 2) & (np.abs(kk - 20) <= 1)] = 1  # 7 x 5 x 3 voxels
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(*dims)
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(ball.ravel(), deep=True))
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    labelmap.SetImageToWorldMatrix(matrix)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    segmentation.AddSegmentFromBinaryLabelmapRepresentation(labelmap, "lesion A", [1.0, 0.0, 0.0])
    doubtful = add_points(mrml_scene, "not sure", [ijk_to_ras_of(node, (5, 5, 5))])
    result = export.export_scene([node], tmp_path / "ds", excluded_nodes=[doubtful])
    rows = {row["status"]: row for row in read_rows(result.annotations)}
    assert set(rows) == {"nodule", "excluded"}
    np.testing.assert_allclose([float(rows["nodule"][c]) for c in ("coordX", "coordY", "coordZ")],
                               lidc2_crop.TransformIndexToPhysicalPoint((40, 30, 20)), atol=1e-3)
    volume_mm3 = 7 * 5 * 3 * np.prod(lidc2_crop.GetSpacing())
    assert float(rows["nodule"]["diameter_mm"]) == pytest.approx((6 * volume_mm3 / np.pi) ** (1 / 3), abs=0.01)
    assert "segment 'lesion A'" in rows["nodule"]["source"]
    assert float(rows["excluded"]["diameter_mm"]) == -1.0
    scan = Dataset.open(result.root).scans[0]
    assert len(scan.annotations) == 1 and len(scan.excluded) == 1


def test_two_volumes_same_name_and_errors(mrml_scene, lidc2_crop, tmp_path):
    first = node_from_sitk(mrml_scene, lidc2_crop, "scan")
    second = node_from_sitk(mrml_scene, lidc2_crop, "scan")
    add_points(mrml_scene, "p", [ijk_to_ras_of(first, (3, 4, 5))])
    result = export.export_scene([first, second], tmp_path / "ds")
    assert [s.name for s in result.scans] == ["scan", "scan_2"]
    assert [len(s.findings) for s in result.scans] == [1, 1]  # the point lies in both (same grid)
    with pytest.raises(OutputError, match="already exists"):
        export.export_scene([first], tmp_path / "ds")
    export.export_scene([first], tmp_path / "ds", overwrite=True)
    with pytest.raises(InputError, match="no volume"):
        export.export_scene([], tmp_path / "other")
    with pytest.raises(InputError, match="default nodule diameter must be positive"):
        export.export_scene([first], tmp_path / "other", default_diameter_mm=0)
    label = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(InputError, match="not a CT"):
        export.export_scene([label], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_plot_follows_a_log_file(mrml_scene, tmp_path):
    from NoduleDetectionLib.registry import read_log_records

    log = tmp_path / "train_log.jsonl"
    records = [
        {"stage": "stage1", "step": 1, "steps": 4, "loss": 1.2, "val_cpm": None, "elapsed_s": 0.5},
        {"stage": "stage1", "step": 2, "steps": 4, "loss": 1.0, "val_cpm": None, "elapsed_s": 1.0},
        {"stage": "validation", "step": 2, "steps": 4, "loss": None, "val_cpm": 0.1, "elapsed_s": 1.5},
        {"stage": "stage1", "step": 4, "steps": 4, "loss": 0.7, "val_cpm": None, "elapsed_s": 2.0},
        {"stage": "stage1_refine", "step": 2, "steps": 2, "loss": 0.5, "val_cpm": None, "elapsed_s": 2.5},
        {"stage": "stage2", "step": 3, "steps": 3, "loss": 0.3, "val_cpm": None, "elapsed_s": 3.0},
        {"stage": "done", "step": 0, "steps": 0, "loss": None, "val_cpm": 0.4, "elapsed_s": 3.5},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records[:3]), encoding="utf-8")
    plot = TrainingPlot(mrml_scene)
    new, offset = read_log_records(log)
    assert plot.add_records(new) == 3
    with log.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[3:]))
    new, offset = read_log_records(log, offset)
    assert plot.add_records(new) == 4

    def columns(node, *names):
        table = node.GetTable()
        return [[table.GetValueByName(r, n).ToString() if n == "stage" else table.GetValueByName(r, n).ToDouble()
                 for n in names] for r in range(table.GetNumberOfRows())]

    assert columns(plot.loss_table, "iteration", "loss", "stage") == [
        [1, 1.2, "stage1"], [2, 1.0, "stage1"], [4, 0.7, "stage1"], [6, 0.5, "stage1_refine"], [9, 0.3, "stage2"]]
    assert columns(plot.validation_table, "iteration", "val_cpm") == [[2, 0.1], [9, 0.4]]
    chart = plot.chart
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert [s.GetTableNode() for s in series] == [plot.loss_table, plot.validation_table]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in series] == [("iteration", "loss"),
                                                                         ("iteration", "val_cpm")]
    again = TrainingPlot(mrml_scene)  # a second training reuses the nodes, emptied
    assert again.chart is chart and again.loss_table.GetNumberOfRows() == 0
    assert chart.GetNumberOfPlotSeriesNodes() == 2
