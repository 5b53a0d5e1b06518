"""Tests of ``writers``: every output is read back by an independent reader (slicer-core MRML storage nodes,
slicerio, csv, json, Pillow) on a small synthetic CT whose direction matrix is oblique and flipped."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from NoduleDetectionLib import writers
from NoduleDetectionLib.errors import OutputError
from NoduleDetectionLib.geometry import Geometry, lps_to_ras
from NoduleDetectionLib.volume import CTVolume

SHAPE_KJI = (24, 32, 40)
#: (centre ijk, radius in voxels, probability, kind, diameter_mm reported)
SPHERES = (
    ((12, 20, 8), 4, 0.93, "nodule", 7.1),
    ((28, 10, 15), 3, 0.71, "nodule", 5.2),
    ((30, 24, 6), 2, 0.55, "mass", 31.0),
)


def _oblique_geometry() -> Geometry:
    """20° about the superior axis, then the k axis flipped (det = -1): neither identity nor axis-aligned."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]])
    return Geometry((0.7, 0.8, 1.25), (-35.0, 12.5, -140.0), rotation @ np.diag([1.0, 1.0, -1.0]))


def _make_result(geometry: Geometry, nodules: list, label_map: np.ndarray, name: str):
    """A ``detect.DetectionResult`` when detect.py exists, else an object with the same fields."""
    fields = dict(
        nodules=nodules, label_map=label_map, geometry=geometry, name=name, series_uid=f"1.2.826.0.{name}",
        threshold=0.5, timings={"stage1": 1.5, "stage2": 0.25}, warnings=["synthetic scan"],
        model_info={"name": "synthetic"},
    )
    try:
        from NoduleDetectionLib import detect
    except ImportError:
        return SimpleNamespace(**fields)
    fields["nodules"] = [detect.Nodule(**vars(n)) for n in nodules]
    return detect.DetectionResult(**fields)


@pytest.fixture
def case():
    """(result, volume): three spheres labelled 1..3 in a CT of lung-like background (-850 HU)."""
    geometry = _oblique_geometry()
    k, j, i = np.indices(SHAPE_KJI)
    label_map = np.zeros(SHAPE_KJI, dtype=np.uint16)
    nodules = []
    for label, (center, radius, probability, kind, diameter) in enumerate(SPHERES, start=1):
        inside = (i - center[0]) ** 2 + (j - center[1]) ** 2 + (k - center[2]) ** 2 <= radius**2
        label_map[inside] = label
        nodules.append(SimpleNamespace(
            label=label, center_lps=tuple(geometry.index_to_lps(np.array(center, dtype=float))),
            diameter_mm=diameter, volume_mm3=float(inside.sum() * np.prod(geometry.spacing)),
            probability=probability, kind=kind,
        ))
    array = np.where(label_map > 0, 40, -850).astype(np.int16)
    return _make_result(geometry, nodules, label_map, "case"), CTVolume(array, geometry, "case")


@pytest.fixture
def empty_case():
    geometry = _oblique_geometry()
    label_map = np.zeros(SHAPE_KJI, dtype=np.uint16)
    volume = CTVolume(np.full(SHAPE_KJI, -850, dtype=np.int16), geometry, "empty")
    return _make_result(geometry, [], label_map, "empty"), volume


@pytest.fixture
def mrml_scene():
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    logics = [
        slicer.vtkMRMLApplicationLogic(),
        slicer.vtkSlicerMarkupsLogic(),
        slicer.vtkSlicerSegmentationsModuleLogic(),
    ]
    for logic in logics:
        logic.SetMRMLScene(scene)
    yield slicer, scene
    for logic in logics:
        logic.SetMRMLScene(None)


def _read_mrml_segmentation(slicer, scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node.GetSegmentation()


def _centres(result) -> np.ndarray:
    return np.array([n.center_lps for n in result.nodules])


def test_write_outputs_writes_the_five_files(case, tmp_path):
    result, volume = case
    paths = writers.write_outputs(result, volume, tmp_path / "out")
    names = sorted(p.name for p in paths.values())
    assert names == ["case.csv", "case.json", "case.mrk.json", "case.seg.nrrd", "case_nodules.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporaries left behind


def test_markups_file_fields(case, tmp_path):
    result, _ = case
    data = json.loads(writers.write_markups(result, tmp_path / "m.mrk.json").read_text())
    assert data["@schema"].endswith("markups-schema-v1.0.3.json#")
    markup = data["markups"][0]
    assert (markup["type"], markup["coordinateSystem"], markup["coordinateUnits"]) == ("Fiducial", "LPS", "mm")
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == ["N1", "N2", "N3"]
    assert all(p["positionStatus"] == "defined" for p in points)
    np.testing.assert_allclose([p["position"] for p in points], _centres(result))
    assert points[0]["description"] == "p=0.93, d=7.1 mm, nodule"
    assert points[2]["description"] == "p=0.55, d=31.0 mm, mass"


@pytest.mark.mrml
def test_markups_read_by_slicer(case, tmp_path, mrml_scene):
    slicer, scene = mrml_scene
    result, _ = case
    path = writers.write_markups(result, tmp_path / "m.mrk.json")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    # .mrk.json is read by the JSON storage node (vtkMRMLMarkupsFiducialStorageNode is the legacy .fcsv one).
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    assert node.GetNumberOfControlPoints() == len(result.nodules)
    ras = []
    for index in range(node.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(index, position)
        ras.append(position)
        assert node.GetNthControlPointLabel(index) == f"N{index + 1}"
        assert node.GetNthControlPointDescription(index).startswith(f"p={SPHERES[index][2]:.2f}")
    np.testing.assert_allclose(ras, lps_to_ras(_centres(result)), atol=1e-6)


def test_segmentation_read_by_slicerio(case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    result, _ = case
    path = writers.write_segmentation(result, tmp_path / "s.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], result.geometry.ijk_to_lps, atol=1e-6)
    assert seg["encoding"] == "gzip"
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert [s["name"] for s in seg["segments"]] == ["N1", "N2", "N3"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3]
    assert [s["terminology"]["type"][1] for s in seg["segments"]] == ["27925004", "27925004", "4147007"]
    # slicerio returns voxels indexed [i, j, k]; the label map is [k, j, i].
    np.testing.assert_array_equal(seg["voxels"], result.label_map.transpose(2, 1, 0))
    for segment in seg["segments"]:
        ii, jj, kk = np.nonzero(slicerio.segment_mask(seg, segment["id"]))
        e = segment["extent"]
        assert e[0] <= ii.min() and ii.max() <= e[1] and e[2] <= jj.min() and jj.max() <= e[3]
        assert e[4] <= kk.min() and kk.max() <= e[5]


@pytest.mark.mrml
def test_segmentation_read_by_slicer(case, tmp_path, mrml_scene):
    slicer, scene = mrml_scene
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    result, _ = case
    path = writers.write_segmentation(result, tmp_path / "s.seg.nrrd")
    segmentation = _read_mrml_segmentation(slicer, scene, path)
    assert segmentation.GetNumberOfSegments() == len(result.nodules)
    for index, nodule in enumerate(result.nodules):
        segment = segmentation.GetNthSegment(index)
        assert (segment.GetName(), segment.GetLabelValue()) == (f"N{nodule.label}", nodule.label)
        image = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(ijk_to_ras, result.geometry.ijk_to_ras, atol=1e-5)
        i0, i1, j0, j1, k0, k1 = image.GetExtent()
        voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        expected = np.zeros(SHAPE_KJI, dtype=bool)
        expected[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = voxels == nodule.label
        np.testing.assert_array_equal(expected, result.label_map == nodule.label)


def test_csv_luna16_columns(case, tmp_path):
    result, _ = case
    path = writers.write_csv(result, tmp_path / "c.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"]
    assert list(rows[0])[6:] == ["volume_mm3", "kind", "label"]
    assert [r["seriesuid"] for r in rows] == [result.series_uid] * 3
    coords = [[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rows]
    np.testing.assert_allclose(coords, _centres(result), atol=1e-3)
    assert [float(r["probability"]) for r in rows] == [0.93, 0.71, 0.55]
    assert [(r["kind"], int(r["label"])) for r in rows] == [("nodule", 1), ("nodule", 2), ("mass", 3)]


def test_summary_json(case, tmp_path):
    result, _ = case
    summary = json.loads(writers.write_summary(result, tmp_path / "s.json").read_text())
    assert "not a medical device" in summary["note"]
    assert summary["input"] == {"name": "case", "series_uid": result.series_uid}
    assert summary["geometry"]["size_ijk"] == [40, 32, 24]
    assert (summary["threshold"], summary["warnings"]) == (0.5, ["synthetic scan"])
    assert summary["model"] == {"name": "synthetic"}
    nodules = summary["nodules"]
    np.testing.assert_allclose([n["center_ras_mm"] for n in nodules], lps_to_ras(_centres(result)))
    np.testing.assert_allclose([n["center_ijk"] for n in nodules], [s[0] for s in SPHERES], atol=1e-9)
    assert [n["voxel_count"] for n in nodules] == [int((result.label_map == v).sum()) for v in (1, 2, 3)]


def test_figure_size(case, empty_case, tmp_path):
    from PIL import Image

    result, volume = case
    with Image.open(writers.write_figure(result, volume, tmp_path / "f.png")) as im:
        image = np.asarray(im.convert("RGB"))
    # 3 columns of 2 x 96 px views with 8 px margins; one row of views per nodule under the title
    assert image.shape[1] == 3 * 192 + 4 * 8 and image.shape[0] > 3 * 192
    for label in (1, 2, 3):  # every nodule's outline is drawn in its colour
        colour = [round(255 * c) for c in writers._COLORS[label - 1]]
        assert (image == colour).all(axis=2).any(), label
    empty, empty_volume = empty_case
    with Image.open(writers.write_figure(empty, empty_volume, tmp_path / "e.png")) as im:
        assert im.size[0] == 3 * 192 + 4 * 8 and im.size[1] < 120  # the title and the note only


@pytest.mark.parametrize(
    ("offset_lps", "view_name", "expected_row_col"),
    [
        ((-8.0, 0.0, 0.0), "axial", (0, -1)),  # patient's right → image left
        ((0.0, -8.0, 0.0), "axial", (-1, 0)),  # anterior → up
        ((-8.0, 0.0, 0.0), "coronal", (0, -1)),  # patient's right → image left
        ((0.0, 0.0, 8.0), "coronal", (-1, 0)),  # superior → up
        ((0.0, -8.0, 0.0), "sagittal", (0, -1)),  # anterior → image left
        ((0.0, 0.0, 8.0), "sagittal", (-1, 0)),  # superior → up
    ],
)
def test_figure_views_follow_radiological_convention(case, offset_lps, view_name, expected_row_col):
    """A bright voxel 8 mm from a nodule lands on the side of the crop a radiologist expects (oblique grid)."""
    result, volume = case
    center = np.array(result.nodules[0].center_lps)
    array = np.full(SHAPE_KJI, -850, dtype=np.int16)
    i, j, k = np.rint(volume.geometry.lps_to_index(center + np.array(offset_lps))).astype(int)
    array[k, j, i] = 1000
    view = next(v for v in writers._VIEWS if v[0] == view_name)
    image, labels = writers._sample_view(CTVolume(array, volume.geometry), result.label_map, center, 40.0, view)
    assert labels[image.shape[0] // 2, image.shape[1] // 2] == 1  # the crop is centred on the nodule
    row, col = np.array(np.unravel_index(np.argmax(image), image.shape)) - (image.shape[0] - 1) / 2
    pixels_8mm = 8.0 / 40.0 * image.shape[0]
    for got, expected in ((row, expected_row_col[0]), (col, expected_row_col[1])):
        if expected:
            assert got * expected > pixels_8mm / 2
        else:
            assert abs(got) < pixels_8mm / 4


def test_refuses_to_overwrite_and_leaves_nothing_partial(case, tmp_path):
    result, volume = case
    existing = tmp_path / "case.csv"
    existing.write_text("sentinel\n")
    with pytest.raises(OutputError, match="already exists"):
        writers.write_outputs(result, volume, tmp_path)
    assert existing.read_text() == "sentinel\n"
    assert [p.name for p in tmp_path.iterdir()] == ["case.csv"]  # nothing else written, no temporaries
    paths = writers.write_outputs(result, volume, tmp_path, overwrite=True)
    assert paths["csv"].read_text().startswith("seriesuid,")
    assert len(list(tmp_path.iterdir())) == 5


def test_zero_nodules(empty_case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    result, volume = empty_case
    paths = writers.write_outputs(result, volume, tmp_path)
    assert json.loads(paths["markups"].read_text())["markups"][0]["controlPoints"] == []
    assert paths["csv"].read_text().splitlines() == [",".join(writers.CSV_COLUMNS)]
    assert json.loads(paths["summary"].read_text())["nodules"] == []
    seg = slicerio.read_segmentation(str(paths["segmentation"]))
    assert seg["segments"] == []
    assert seg["voxels"].shape == SHAPE_KJI[::-1]
    np.testing.assert_allclose(seg["ijkToLPS"], result.geometry.ijk_to_lps, atol=1e-6)


@pytest.mark.mrml
def test_zero_nodules_read_by_slicer(empty_case, tmp_path, mrml_scene):
    slicer, scene = mrml_scene
    result, _ = empty_case
    path = writers.write_segmentation(result, tmp_path / "e.seg.nrrd")
    assert _read_mrml_segmentation(slicer, scene, path).GetNumberOfSegments() == 0
