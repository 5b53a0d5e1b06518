"""Real-MRML tests of the Slicer scene logic (``NoduleDetectionLogicLib``) with slicer-core: no mocks.

Volume nodes come from a real scan (read with SimpleITK, put into the scene without our code) and from a
synthetic volume whose direction is oblique and flipped. Expected positions are computed independently:
LPS → RAS by negating x and y, RAS → IJK through the node's own ``RASToIJKMatrix``.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from NoduleDetectionLib.detect import Cancelled, DetectionResult, Detector, Nodule  # noqa: E402
from NoduleDetectionLib.errors import InputError  # noqa: E402
from NoduleDetectionLib.geometry import Geometry  # noqa: E402
from NoduleDetectionLib.models import ModelConfig  # noqa: E402
from NoduleDetectionLib.volume import AIR_HU, CTVolume  # noqa: E402
from NoduleDetectionLogicLib import parameters, scene  # noqa: E402
from NoduleDetectionLogicLib.background import BackgroundTask  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

#: The three LIDC-IDRI-0003 nodules of ``annotations.csv`` (LPS mm, diameter mm).
LIDC3_NODULES = (((72.11, 76.99, -190.75), 23.5), ((23.61, -47.62, -172.34), 10.2), ((-47.23, -30.05, -169.56), 14.2))


def _matrix_array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _ras_to_ijk(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    return _matrix_array(matrix)


def _positions(markups) -> np.ndarray:
    points = []
    for i in range(markups.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(i, p)
        points.append(p)
    return np.array(points).reshape(-1, 3)


def _result_with_balls(volume_node, centres_lps, diameters, probabilities, kinds=None) -> DetectionResult:
    """A ``DetectionResult`` with a ball of each diameter at each LPS centre, on the node's grid.

    The grid comes from the node's own MRML matrices (RASToIJK), not from the code under test.
    """
    dims = volume_node.GetImageData().GetDimensions()
    ras_to_ijk = _ras_to_ijk(volume_node)
    spacing = np.array(volume_node.GetSpacing())
    label_map = np.zeros(dims[::-1], np.uint16)
    nodules = []
    for n, (centre, diameter, p) in enumerate(zip(centres_lps, diameters, probabilities), start=1):
        centre_ijk = (ras_to_ijk @ np.array([-centre[0], -centre[1], centre[2], 1.0]))[:3]
        reach = np.ceil(diameter / 2 / spacing).astype(int) + 1
        lo = np.maximum(np.round(centre_ijk).astype(int) - reach, 0)
        hi = np.minimum(np.round(centre_ijk).astype(int) + reach + 1, dims)
        kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
        offsets = [(index - centre_ijk[a]) * spacing[a] for a, index in enumerate((ii, jj, kk))]
        mask = sum(o**2 for o in offsets) <= (diameter / 2) ** 2
        box = label_map[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        box[mask] = n
        kind = kinds[n - 1] if kinds else ("mass" if diameter > 30 else "nodule")
        nodules.append(Nodule(n, tuple(centre), diameter, float(mask.sum() * np.prod(spacing)), p, kind))
    ijk_to_ras = np.linalg.inv(ras_to_ijk)
    return DetectionResult(
        nodules=nodules, label_map=label_map, geometry=Geometry.from_ijk_to_ras(ijk_to_ras),
        name=volume_node.GetName(), series_uid=volume_node.GetName(), threshold=0.5,
    )


def _segment_voxels_ras(segmentation_node, segment_id) -> np.ndarray:
    """RAS positions of a segment's voxels, through the labelmap's own image-to-world matrix."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    extent = image.GetExtent()
    dims = image.GetDimensions()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)], axis=1).astype(float)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return (ijk @ _matrix_array(matrix).T)[:, :3]


@pytest.fixture(scope="module")
def lidc3_image(shared_data):
    sitk = pytest.importorskip("SimpleITK")
    return sitk.ReadImage(str(shared_data / "ct" / "LIDC-IDRI-0003.nrrd"))


@pytest.fixture
def mrml_scene():
    return scene.create_scene()


@pytest.fixture
def lidc3_node(mrml_scene, lidc3_image):
    """LIDC-IDRI-0003 as a volume node, built the way Slicer loads it: IJKToRAS = diag(-1,-1,1)·[D·S | o]."""
    sitk = pytest.importorskip("SimpleITK")
    array = sitk.GetArrayViewFromImage(lidc3_image)
    image = vtk.vtkImageData()
    image.SetDimensions(*lidc3_image.GetSize())
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    lps = np.eye(4)
    lps[:3, :3] = np.array(lidc3_image.GetDirection()).reshape(3, 3) @ np.diag(lidc3_image.GetSpacing())
    lps[:3, 3] = lidc3_image.GetOrigin()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "LIDC-IDRI-0003")
    node.SetIJKToRASMatrix(scene._vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))
    node.SetAndObserveImageData(image)
    return node


def _oblique_flipped_node(mrml_scene):
    """A small CT-like volume: 25° about A, then i flipped (det -1); air with a soft-tissue body."""
    angle = np.deg2rad(25.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    geometry = Geometry((0.9, 1.1, 1.6), (40.0, -25.0, -300.0), rotation @ np.diag([-1.0, 1.0, 1.0]))
    rng = np.random.default_rng(5)
    array = (rng.normal(-850, 30, size=(30, 40, 36))).astype(np.int16)
    array[:, 5:35, 4:32] = 40
    array[:, 10:30, 8:28] = -850
    array[0, 0, :5] = -2048  # scanner padding
    return scene.add_volume_node(mrml_scene, CTVolume(array, geometry, name="oblique"))


# --- volume node ↔ CTVolume -------------------------------------------------------------------------------


def test_volume_from_real_scan_node(lidc3_node, lidc3_image):
    sitk = pytest.importorskip("SimpleITK")
    volume = scene.volume_from_node(lidc3_node)
    raw = sitk.GetArrayViewFromImage(lidc3_image)
    assert volume.array.shape == raw.shape
    np.testing.assert_allclose(volume.geometry.spacing, lidc3_image.GetSpacing())
    np.testing.assert_allclose(volume.geometry.origin, lidc3_image.GetOrigin(), atol=1e-4)
    # HU kept; padding (-2048 outside the reconstruction circle in this scan) becomes air and is flagged
    assert volume.padding_mask is not None and volume.padding_mask[0, 0, 0] and raw[0, 0, 0] == -2048
    np.testing.assert_array_equal(volume.padding_mask, raw < -1500)
    assert np.all(volume.array[volume.padding_mask] == AIR_HU)
    body = raw > -1000
    np.testing.assert_array_equal(volume.array[body], raw[body])


def test_add_volume_node_round_trip_oblique(mrml_scene):
    node = _oblique_flipped_node(mrml_scene)
    volume = scene.volume_from_node(node)
    # the node's IJK→RAS maps voxel (i, j, k) to RAS of the LPS geometry the volume was made with
    ijk = np.array([3.0, 7.0, 11.0])
    expected_lps = volume.geometry.origin + volume.geometry.direction @ (np.array(volume.geometry.spacing) * ijk)
    ras = np.linalg.inv(_ras_to_ijk(node)) @ np.append(ijk, 1.0)
    np.testing.assert_allclose(ras[:3], expected_lps * [-1, -1, 1], atol=1e-9)
    assert volume.array[0, 0, 0] == AIR_HU and volume.padding_mask.sum() == 5


def test_bad_input_raises_clear_error(mrml_scene):
    with pytest.raises(InputError, match="no input volume"):
        scene.volume_from_node(None)
    label = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(InputError, match="labels.*not a CT"):
        scene.volume_from_node(label)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty.*no voxels"):
        scene.volume_from_node(empty)
    unit = Geometry((1, 1, 1), (0, 0, 0))
    flat = scene.add_volume_node(mrml_scene, CTVolume(np.full((1, 20, 20), -1000, np.int16), unit))
    with pytest.raises(InputError, match="2D image"):
        scene.volume_from_node(flat)
    mr = scene.add_volume_node(mrml_scene, CTVolume(np.full((8, 20, 20), 300, np.int16), unit, "mr"))
    with pytest.raises(InputError, match="does not look like a CT"):
        scene.volume_from_node(mr)


# --- results → markups, segmentation, table --------------------------------------------------------------


def test_markups_land_on_detector_centres_real_scan(lidc3_node):
    centres = [c for c, _ in LIDC3_NODULES]
    result = _result_with_balls(lidc3_node, centres, [d for _, d in LIDC3_NODULES], [0.95, 0.8, 0.7])
    outputs = scene.add_result_nodes(result, lidc3_node)
    expected_ras = np.array(centres) * [-1, -1, 1]
    np.testing.assert_allclose(_positions(outputs.markups), expected_ras, atol=1e-9)
    labels = [outputs.markups.GetNthControlPointLabel(i) for i in range(3)]
    assert labels == ["N1", "N2", "N3"]
    # each point sits at the centroid of its segment (ball on the real grid): within half a voxel
    for i, nodule in enumerate(result.nodules):
        voxels = _segment_voxels_ras(outputs.segmentation, f"Segment_{nodule.label}")
        np.testing.assert_allclose(voxels.mean(axis=0), expected_ras[i], atol=0.5 * 2.5)


def test_oblique_flipped_points_and_segments_agree(mrml_scene):
    node = _oblique_flipped_node(mrml_scene)
    ijk_to_ras = np.linalg.inv(_ras_to_ijk(node))
    centre_ijk = np.array([18.0, 20.0, 14.0, 1.0])
    centre_ras = (ijk_to_ras @ centre_ijk)[:3]
    centre_lps = tuple(centre_ras * [-1, -1, 1])
    result = _result_with_balls(node, [centre_lps], [9.0], [0.9])
    outputs = scene.add_result_nodes(result, node)
    position = _positions(outputs.markups)[0]
    np.testing.assert_allclose(_ras_to_ijk(node) @ np.append(position, 1.0), centre_ijk, atol=1e-9)
    voxels = _segment_voxels_ras(outputs.segmentation, "Segment_1")
    assert len(voxels) == int((result.label_map == 1).sum())
    np.testing.assert_allclose(voxels.mean(axis=0), position, atol=1e-6)  # symmetric ball about a voxel centre


def test_segmentation_geometry_equals_volume(lidc3_node):
    result = _result_with_balls(lidc3_node, [c for c, _ in LIDC3_NODULES[:2]], [12.0, 8.0], [0.9, 0.6])
    segmentation = scene.add_result_nodes(result, lidc3_node).segmentation
    volume_ijk_to_ras = np.linalg.inv(_ras_to_ijk(lidc3_node))
    for nodule in result.nodules:
        image = slicer.vtkOrientedImageData()
        segmentation.GetBinaryLabelmapRepresentation(f"Segment_{nodule.label}", image)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose(_matrix_array(matrix), volume_ijk_to_ras, atol=1e-9)
        extent = np.array(image.GetExtent())
        dims = lidc3_node.GetImageData().GetDimensions()
        assert np.all(extent[0::2] >= 0) and np.all(extent[1::2] < dims)
    reference = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    values = np.array([float(v) for v in reference.strip(";").split(";")])
    np.testing.assert_allclose(values[:16].reshape(4, 4), volume_ijk_to_ras, atol=1e-6)
    np.testing.assert_array_equal(values[16:], [0, 511, 0, 511, 0, 139])


def test_segments_named_coloured_with_terminology(lidc3_node):
    result = _result_with_balls(lidc3_node, [c for c, _ in LIDC3_NODULES[:2]], [12.4, 8.0], [0.93, 0.61],
                                kinds=["nodule", "mass"])
    segmentation = scene.add_result_nodes(result, lidc3_node).segmentation.GetSegmentation()
    first, second = segmentation.GetSegment("Segment_1"), segmentation.GetSegment("Segment_2")
    assert first.GetName() == "Nodule 1 (p=0.93, 12.4 mm)"
    assert second.GetName() == "Mass 2 (p=0.61, 8.0 mm)"
    assert first.GetColor() != second.GetColor()
    assert "SCT^27925004^Nodule" in first.GetTerminology() and "SCT^39607008^Lung" in first.GetTerminology()
    assert "SCT^4147007^Mass" in second.GetTerminology()


def test_table_contents(lidc3_node):
    result = _result_with_balls(lidc3_node, [c for c, _ in LIDC3_NODULES], [d for _, d in LIDC3_NODULES],
                                [0.95, 0.8, 0.7])
    outputs = scene.add_result_nodes(result, lidc3_node)
    table = outputs.table.GetTable()
    assert table.GetNumberOfRows() == 3
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(scene.TABLE_COLUMNS)
    for row, nodule in enumerate(result.nodules):
        assert table.GetValueByName(row, "label").ToInt() == nodule.label
        ras = [table.GetValueByName(row, axis).ToDouble() for axis in "RAS"]
        np.testing.assert_allclose(ras, np.array(nodule.center_lps) * [-1, -1, 1])
        assert table.GetValueByName(row, "diameter_mm").ToDouble() == pytest.approx(nodule.diameter_mm)
        assert table.GetValueByName(row, "volume_mm3").ToDouble() == pytest.approx(nodule.volume_mm3)
        assert table.GetValueByName(row, "probability").ToDouble() == pytest.approx(nodule.probability)
        assert table.GetValueByName(row, "kind").ToString() == nodule.kind
    assert outputs.table.GetColumnUnitLabel("R") == "mm"
    assert outputs.table.GetNodeReference(parameters.ROLE_MARKUPS) is outputs.markups
    assert outputs.table.GetNodeReference(parameters.ROLE_SEGMENTATION) is outputs.segmentation


def test_second_run_does_not_clobber_first(lidc3_node):
    first_result = _result_with_balls(lidc3_node, [LIDC3_NODULES[0][0]], [20.0], [0.9])
    second_result = _result_with_balls(lidc3_node, [c for c, _ in LIDC3_NODULES[1:]], [10.0, 14.0], [0.8, 0.7])
    first = scene.add_result_nodes(first_result, lidc3_node)
    second = scene.add_result_nodes(second_result, lidc3_node)
    assert len({first.markups.GetID(), second.markups.GetID()}) == 2
    assert first.markups.GetName() != second.markups.GetName()
    assert first.markups.GetNumberOfControlPoints() == 1 and second.markups.GetNumberOfControlPoints() == 2
    assert first.segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert first.table.GetNumberOfRows() == 1 and second.table.GetNumberOfRows() == 2


def test_given_output_nodes_are_refilled_not_duplicated(lidc3_node):
    scene_ = lidc3_node.GetScene()
    first = scene.add_result_nodes(_result_with_balls(lidc3_node, [LIDC3_NODULES[0][0]], [20.0], [0.9]), lidc3_node)
    count = scene_.GetNumberOfNodes()
    second_result = _result_with_balls(lidc3_node, [c for c, _ in LIDC3_NODULES[1:]], [10.0, 14.0], [0.8, 0.7])
    again = scene.add_result_nodes(second_result, lidc3_node, *first)
    assert tuple(again) == tuple(first)
    assert scene_.GetNumberOfNodes() == count
    assert first.markups.GetNumberOfControlPoints() == 2 and first.table.GetNumberOfRows() == 2
    assert first.segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_result_of_another_grid_leaves_scene_unchanged(mrml_scene, lidc3_node):
    other = _oblique_flipped_node(mrml_scene)
    result = _result_with_balls(other, [(0.0, 0.0, -300.0)], [5.0], [0.9])
    count = mrml_scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="grid of 'LIDC-IDRI-0003'"):
        scene.add_result_nodes(result, lidc3_node)
    assert mrml_scene.GetNumberOfNodes() == count


def test_outputs_follow_the_volume_transform(lidc3_node):
    transform = lidc3_node.GetScene().AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    lidc3_node.SetAndObserveTransformNodeID(transform.GetID())
    outputs = scene.add_result_nodes(_result_with_balls(lidc3_node, [LIDC3_NODULES[1][0]], [10.0], [0.9]), lidc3_node)
    assert outputs.markups.GetTransformNodeID() == transform.GetID()
    assert outputs.segmentation.GetTransformNodeID() == transform.GetID()


def test_settings_persist_in_saved_scene(mrml_scene, lidc3_node, tmp_path):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "NoduleDetection")
    parameters.set_defaults(node)  # a new node gets the shipped model's own threshold
    assert parameters.read_settings(node) == parameters.DetectionSettings(threshold=parameters.model_threshold(""))
    settings = parameters.DetectionSettings(model="/models/trained.safetensors", threshold=0.35, device="cpu")
    parameters.write_settings(node, settings)
    node.SetNodeReferenceID(parameters.INPUT_VOLUME, lidc3_node.GetID())
    path = tmp_path / "scene.mrml"
    mrml_scene.SetURL(str(path))
    assert mrml_scene.Commit()
    restored_scene = scene.create_scene()
    restored_scene.SetURL(str(path))
    assert restored_scene.Import()
    restored = restored_scene.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    assert parameters.read_settings(restored) == settings
    assert restored.GetNodeReference(parameters.INPUT_VOLUME).GetName() == "LIDC-IDRI-0003"
    parameters.set_defaults(restored)  # defaults never overwrite saved settings
    assert parameters.read_settings(restored) == settings
    restored.SetParameter("Device", "tpu")
    with pytest.raises(InputError, match="unknown device"):
        parameters.read_settings(restored)


def test_default_threshold_is_the_model_default(tiny_model_path, tmp_path):
    """The panel's threshold for a model is the one stored in its file (read without torch), as the command line
    uses; the model format's default when the file cannot be read."""
    from NoduleDetectionLib.models import NoduleModel
    from NoduleDetectionLib.registry import shipped_model_path

    assert ModelConfig().threshold == parameters.DEFAULT_THRESHOLD
    model = NoduleModel.load(tiny_model_path)
    model.config.threshold = 0.37
    path = model.save(tmp_path / "m.safetensors")
    assert parameters.model_threshold(str(path)) == pytest.approx(0.37)
    assert parameters.model_threshold("") == pytest.approx(NoduleModel.load(shipped_model_path()).config.threshold)
    (tmp_path / "not_a_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert parameters.model_threshold(str(tmp_path / "not_a_model.safetensors")) == parameters.DEFAULT_THRESHOLD
    assert parameters.model_threshold(str(tmp_path / "missing.safetensors")) == parameters.DEFAULT_THRESHOLD


# --- the real detector ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    from NoduleDetectionLib.models import NoduleModel

    return Detector(NoduleModel.build(seed=0), device="cpu")


def test_cancelled_run_leaves_scene_unchanged(mrml_scene, detector):
    node = _oblique_flipped_node(mrml_scene)
    count = mrml_scene.GetNumberOfNodes()
    stages = []
    with pytest.raises(Cancelled):
        scene.run_detection(node, detector, progress=lambda s, f: stages.append(s), cancel=lambda: len(stages) > 0)
    assert stages and mrml_scene.GetNumberOfNodes() == count


def test_background_task_cancel(mrml_scene, detector):
    node = _oblique_flipped_node(mrml_scene)
    volume = scene.volume_from_node(node)
    count = mrml_scene.GetNumberOfNodes()
    task = BackgroundTask(lambda progress, cancel: detector.detect(volume, progress=progress, cancel=cancel))
    task.cancel()
    task.start()
    assert task.wait(60)
    with pytest.raises(Cancelled):
        task.result()
    assert mrml_scene.GetNumberOfNodes() == count


@pytest.mark.slow
def test_detector_end_to_end_oblique_phantom(mrml_scene, detector):
    """Real detector (untrained weights until a trained test model exists) on a flipped, oblique phantom."""
    from NoduleDetectionLib.synthetic import make_phantom

    angle = np.deg2rad(15.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    phantom = make_phantom(np.random.default_rng(0), direction=direction @ np.diag([-1.0, 1.0, -1.0]))
    node = scene.add_volume_node(mrml_scene, phantom.volume)
    result = detector.detect(scene.volume_from_node(node), threshold=0.0)
    assert result.nodules, "expected at least one finding at threshold 0"
    outputs = scene.add_result_nodes(result, node)
    expected = np.array([n.center_lps for n in result.nodules]) * [-1, -1, 1]
    np.testing.assert_allclose(_positions(outputs.markups), expected, atol=1e-9)
    assert outputs.segmentation.GetSegmentation().GetNumberOfSegments() == len(result.nodules)
    for nodule in result.nodules:
        voxels = _segment_voxels_ras(outputs.segmentation, f"Segment_{nodule.label}")
        assert len(voxels) == int((result.label_map == nodule.label).sum())
