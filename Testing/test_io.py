"""Tests for ``NoduleDetectionLib.io``: the CT readers, ``validate_ct``, ``write_volume`` and the SimpleITK bridge.

Real scans come from ``../shared/data`` (each read at most once per session through module-scoped fixtures);
broken inputs are written in ``tmp_path``, DICOM ones from copies of a few LIDC-IDRI-0001 slices.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from NoduleDetectionLib.errors import InputError, OutputError
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import from_sitk, read_ct, to_sitk, validate_ct, write_volume
from NoduleDetectionLib.volume import AIR_HU, CTVolume
from pydicom.uid import generate_uid

LIDC1_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
FILES = ["LIDC-IDRI-0002.nrrd", "LIDC-IDRI-0003.nrrd", "pyradiomics-lung1.nrrd", "pyradiomics-lung2.nrrd",
         "totalsegmentator-example-abdomen.nii.gz"]


# ---------------------------------------------------------------------------------------------------------
# Helpers and fixtures


def phantom(shape=(6, 32, 32)) -> np.ndarray:
    """A small int16 CT-like volume [k, j, i]: air (-1000 HU) around a 40 HU block."""
    array = np.full(shape, -1000, dtype=np.int16)
    array[:, 8:-8, 6:-6] = 40
    return array


def write_image(path: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def write_mhd(folder: Path, spacing: str, size: str = "8 8 4") -> Path:
    """A MetaImage header (and raw data of the right length) with a verbatim ``ElementSpacing`` line."""
    n = int(np.prod([int(s) for s in size.split()]))
    if n < 10**7:
        (folder / "data.raw").write_bytes(np.full(n, -1000, dtype=np.int16).tobytes())
    path = folder / "image.mhd"
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {size}\nElementSpacing = {spacing}\n"
                    "ElementType = MET_SHORT\nElementDataFile = data.raw\n")
    return path


@pytest.fixture(scope="module")
def lidc1_slices(shared_data) -> list[Path]:
    """The LIDC-IDRI-0001 slice files ordered by z (bottom to top)."""
    files = sorted((shared_data / "ct" / "LIDC-IDRI-0001").glob("*.dcm"))
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def copy_series(files: list[Path], folder: Path, edit=None, prefix: str = "") -> Path:
    """Copy DICOM ``files`` into ``folder``, applying ``edit(ds, n)`` to each dataset when given."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(files):
        if edit is None:
            shutil.copyfile(f, folder / f"{prefix}{f.name}")
        else:
            ds = pydicom.dcmread(f)
            edit(ds, n)
            ds.save_as(folder / f"{prefix}{f.name}")
    return folder


def new_series(uid: str):
    def edit(ds, n):
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
    return edit


_volumes: dict[str, CTVolume] = {}


@pytest.fixture(scope="module")
def real(shared_data):
    """``real(name)`` reads ``ct/<name>`` with ``read_ct`` once per module."""
    def get(name: str) -> CTVolume:
        if name not in _volumes:
            _volumes[name] = read_ct(shared_data / "ct" / name)
        return _volumes[name]
    yield get
    _volumes.clear()


# ---------------------------------------------------------------------------------------------------------
# Real data


def test_dicom_folder_matches_simpleitk_series_reader(real, shared_data):
    """LIDC-IDRI-0001: geometry exactly as ImageSeriesReader gives it, HU equal outside padding, UID, name."""
    folder = shared_data / "ct" / "LIDC-IDRI-0001"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    expected = sitk.GetArrayFromImage(image)
    volume = real("LIDC-IDRI-0001")
    assert volume.geometry.spacing == image.GetSpacing()
    assert volume.geometry.origin == image.GetOrigin()
    assert tuple(volume.geometry.direction.ravel()) == image.GetDirection()
    assert volume.series_uid == LIDC1_UID
    assert volume.name == "LIDC-IDRI-0001"
    assert volume.array.dtype == np.int16 and volume.array.shape == expected.shape
    padding = expected < -1024  # -2048 outside the reconstruction circle
    assert padding.any()
    np.testing.assert_array_equal(volume.padding_mask, padding)
    np.testing.assert_array_equal(volume.array[~padding], expected[~padding])
    assert np.all(volume.array[padding] == AIR_HU)
    assert volume.metadata["modality"] == "CT" and volume.metadata["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert volume.metadata["slice_thickness_mm"] == 2.5


@pytest.mark.parametrize("name", FILES)
def test_image_files_read_with_simpleitk_geometry(real, shared_data, name):
    """NRRD / NIfTI: geometry as SimpleITK's header reports it; int16 HU; no value below -1024."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(shared_data / "ct" / name))
    info.ReadImageInformation()
    volume = real(name)
    stem = name.removesuffix(".nii.gz").removesuffix(".nrrd")
    assert (volume.name, volume.series_uid) == (stem, stem)
    assert volume.geometry.spacing == info.GetSpacing()
    assert volume.geometry.origin == info.GetOrigin()
    assert tuple(volume.geometry.direction.ravel()) == info.GetDirection()
    assert volume.shape_ijk == info.GetSize()
    assert volume.array.dtype == np.int16
    assert volume.array.min() >= AIR_HU


def test_abdomen_keeps_its_flipped_direction(real):
    volume = real("totalsegmentator-example-abdomen.nii.gz")
    np.testing.assert_array_equal(volume.geometry.direction, np.diag([-1.0, -1.0, 1.0]))
    assert volume.geometry.spacing == (3.0, 3.0, 3.0)


@pytest.mark.parametrize("name", ["LIDC-IDRI-0002.nrrd", "LIDC-IDRI-0003.nrrd"])
def test_scanner_padding_becomes_air_and_is_masked(real, name):
    """-3024 / -2048 outside the reconstruction circle: the slice corners are padding, the centre is not."""
    volume = real(name)
    mask = volume.padding_mask
    assert mask is not None
    assert mask[:, 0, 0].all() and mask[:, -1, -1].all()
    assert not mask[:, 256, 256].any()
    assert np.all(volume.array[mask] == AIR_HU)


# ---------------------------------------------------------------------------------------------------------
# DICOM series choice and encodings


def test_folder_with_two_series_and_a_localizer_picks_the_largest_ct(lidc1_slices, tmp_path, caplog):
    other, scout = generate_uid(), generate_uid()

    def localizer(ds, n):
        new_series(scout)(ds, n)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    copy_series(lidc1_slices[60:66], tmp_path / "study" / "a")
    copy_series(lidc1_slices[80:84], tmp_path / "study" / "b", new_series(other))
    copy_series(lidc1_slices[90:93], tmp_path / "study", localizer, prefix="scout")
    with caplog.at_level(logging.INFO, logger="NoduleDetectionLib.io"):
        volume = read_ct(tmp_path / "study")
    assert volume.series_uid == LIDC1_UID and volume.array.shape[0] == 6
    assert "most slices" in volume.metadata["series_reason"] and LIDC1_UID in caplog.text
    assert len(volume.metadata["series_found"]) == 3
    assert volume.name == "study"
    chosen = read_ct(tmp_path / "study", series_uid=other)
    assert chosen.series_uid == other and chosen.array.shape[0] == 4
    with pytest.raises(InputError, match="localizer"):
        read_ct(tmp_path / "study", series_uid=scout)
    with pytest.raises(InputError, match="is not in"):
        read_ct(tmp_path / "study", series_uid="1.2.3.4")


def test_folder_with_only_a_localizer_or_mr_is_refused(lidc1_slices, tmp_path):
    def scout(ds, n):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def mr(ds, n):
        ds.Modality = "MR"

    copy_series(lidc1_slices[60:62], tmp_path / "scout", scout)
    with pytest.raises(InputError, match="no CT volume.*localizer"):
        read_ct(tmp_path / "scout")
    copy_series(lidc1_slices[60:63], tmp_path / "mr", mr)
    with pytest.raises(InputError, match="no CT volume.*MR"):
        read_ct(tmp_path / "mr")


def test_jpeg_lossless_slices_read_like_uncompressed(lidc1_slices, tmp_path):
    """JPEG Lossless SV1 slices decode to the same HU as the originals.

    pydicom cannot encode JPEG Lossless, so each slice's stored values are compressed with GDCM (SimpleITK's
    DICOM writer) and the encapsulated pixel data is put into a copy of the original dataset.
    """
    files = lidc1_slices[60:64]

    def compress(ds, n):
        encoder = tmp_path / f"enc{n}.dcm"
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(encoder))
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None].astype(np.int16)))
        encoded = pydicom.dcmread(encoder)
        ds.PixelData = encoded.PixelData
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID

    copy_series(files, tmp_path / "jpeg", compress)
    sample = pydicom.dcmread(next((tmp_path / "jpeg").iterdir()))
    assert sample.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    jpeg = read_ct(tmp_path / "jpeg")
    plain = read_ct(copy_series(files, tmp_path / "plain"))
    np.testing.assert_array_equal(jpeg.array, plain.array)
    assert jpeg.geometry == plain.geometry


def test_pixel_padding_value_that_looks_like_water_is_masked_only_outside_the_body(lidc1_slices, tmp_path):
    """PixelPaddingValue mapping to 0 HU: the border-connected padding is masked, water inside is kept."""
    files = lidc1_slices[60:64]

    def pad_at_zero_hu(ds, n):
        pixels = ds.pixel_array.copy()
        pixels[pixels == -1024] = 1024  # stored -1024 is -2048 HU padding; stored 1024 is 0 HU
        ds.PixelData = pixels.tobytes()
        ds.PixelPaddingValue = 1024

    original = read_ct(copy_series(files, tmp_path / "orig"))
    volume = read_ct(copy_series(files, tmp_path / "pad", pad_at_zero_hu))
    np.testing.assert_array_equal(volume.padding_mask, original.padding_mask)
    np.testing.assert_array_equal(volume.array, original.array)
    assert np.any(volume.array == 0)  # water-like voxels inside the body stay


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one clear InputError each


def test_missing_empty_non_dicom_and_unsupported_inputs(tmp_path, lidc1_slices):
    with pytest.raises(InputError, match="does not exist"):
        read_ct(tmp_path / "nothing.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder"):
        read_ct(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM images"):
        read_ct(tmp_path / "notes")
    with pytest.raises(InputError, match="unsupported file type"):
        read_ct(tmp_path / "notes" / "readme.txt")
    shutil.copyfile(lidc1_slices[0], tmp_path / "slice.dcm")
    with pytest.raises(InputError, match="single DICOM file"):
        read_ct(tmp_path / "slice.dcm")
    write_image(tmp_path / "ok.nrrd", phantom())
    with pytest.raises(InputError, match="only be chosen in a DICOM folder"):
        read_ct(tmp_path / "ok.nrrd", series_uid="1.2.3")


def test_truncated_nrrd_names_the_file(tmp_path):
    path = write_image(tmp_path / "scan.nrrd", phantom())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read .*scan\.nrrd") as info:
        read_ct(path)
    assert "\n" not in str(info.value) and "Exception thrown" not in str(info.value)


def test_truncated_dicom_slice_names_the_slice(lidc1_slices, tmp_path):
    folder = copy_series(lidc1_slices[60:65], tmp_path / "series")
    broken = folder / lidc1_slices[62].name
    broken.write_bytes(broken.read_bytes()[:300_000])
    with pytest.raises(InputError, match=f"cannot read DICOM slice .*{broken.name}") as info:
        read_ct(folder)
    assert "\n" not in str(info.value) and "Exception thrown" not in str(info.value)


def test_dicom_slice_cut_inside_its_header_is_reported_not_skipped(lidc1_slices, tmp_path):
    folder = copy_series(lidc1_slices[60:65], tmp_path / "series")
    broken = folder / lidc1_slices[64].name  # the top slice: skipping it would go unnoticed
    broken.write_bytes(broken.read_bytes()[:700])
    with pytest.raises(InputError, match=f"corrupt DICOM file .*{broken.name}"):
        read_ct(folder)


def test_two_dimensional_images_are_refused(tmp_path):
    with pytest.raises(InputError, match="2D image"):
        read_ct(write_image(tmp_path / "plane.nrrd", phantom()[0]))
    with pytest.raises(InputError, match="2D image"):
        read_ct(write_image(tmp_path / "one_slice.nrrd", phantom()[:1]))


def test_mr_like_volume_and_label_map_are_not_ct(tmp_path):
    rng = np.random.default_rng(0)
    mr = rng.integers(0, 800, size=(6, 32, 32)).astype(np.uint16)
    with pytest.raises(InputError, match="does not look like a CT"):
        read_ct(write_image(tmp_path / "mr.nii.gz", mr))
    labels = np.zeros((6, 32, 32), dtype=np.uint8)
    labels[2:4, 10:20, 10:20] = 3
    with pytest.raises(InputError, match="does not look like a CT"):
        read_ct(write_image(tmp_path / "labels.nrrd", labels))


@pytest.mark.parametrize(("spacing", "message"), [("0 1 1", "not positive"), ("1 1 -2", "not positive"),
                                                   ("1 1 nan", "not positive"), ("0.7 0.7 12", "over 10 mm")])
def test_absurd_spacing_is_refused(tmp_path, spacing, message):
    with pytest.raises(InputError, match=message):
        read_ct(write_mhd(tmp_path, spacing))


def test_thick_slices_give_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="NoduleDetectionLib.io"):
        volume = read_ct(write_image(tmp_path / "thick.mha", phantom(), spacing=(0.7, 0.7, 7.0)))
    assert "over 5 mm" in volume.metadata["warnings"][0] and "over 5 mm" in caplog.text


def test_huge_volume_is_refused_from_its_header(tmp_path):
    """100000 × 100000 × 1000 voxels: refused without reading (the raw file does not even exist)."""
    with pytest.raises(InputError, match="too large"):
        read_ct(write_mhd(tmp_path, "1 1 1", size="100000 100000 1000"))
    with pytest.raises(InputError, match="too large"):
        read_ct(write_image(tmp_path / "small.nrrd", phantom()), max_bytes=1000)


def test_dicom_series_with_a_missing_slice(lidc1_slices, tmp_path):
    files = lidc1_slices[60:64] + lidc1_slices[65:68]
    with pytest.raises(InputError, match=r"1 slice\(s\) missing .*5 mm gap"):
        read_ct(copy_series(files, tmp_path / "gap"))


def test_dicom_series_with_uneven_spacing(lidc1_slices, tmp_path):
    def shift(ds, n):
        if n == 3:
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.8

    with pytest.raises(InputError, match="uneven slice spacing"):
        read_ct(copy_series(lidc1_slices[60:66], tmp_path / "uneven", shift))


def test_dicom_series_with_gantry_tilt(lidc1_slices, tmp_path):
    """Each slice shifted along y by 2.5 mm × tan(15°): slices stacked obliquely to their normal."""
    def tilt(ds, n):
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + n * 2.5 * np.tan(np.radians(15))

    with pytest.raises(InputError, match="gantry tilt of 15 degrees"):
        read_ct(copy_series(lidc1_slices[60:65], tmp_path / "tilt", tilt))


def test_validate_ct_on_a_volume_from_elsewhere():
    geometry = Geometry((0.7, 0.7, 2.5), (0.0, 0.0, 0.0))
    assert validate_ct(CTVolume(phantom(), geometry, "scene")) == []
    with pytest.raises(InputError, match="NaN"):
        validate_ct(CTVolume(np.full((4, 8, 8), np.nan, dtype=np.float32), geometry, "scene"))
    with pytest.raises(InputError, match="does not look like a CT"):
        validate_ct(CTVolume(phantom() + 1100, geometry, "scene"))


# ---------------------------------------------------------------------------------------------------------
# Writing and the SimpleITK bridge


def oblique_geometry() -> Geometry:
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Geometry((0.8, 0.6, 2.0), (-100.0, 20.5, -300.25), rotation @ np.diag([1.0, -1.0, -1.0]))


def test_to_sitk_and_from_sitk_agree_with_geometry():
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # [k, j, i]
    geometry = oblique_geometry()
    image = to_sitk(array, geometry)
    assert image.GetSize() == (5, 4, 3)
    assert image.GetPixel(4, 1, 2) == array[2, 1, 4]
    for ijk in [(0, 0, 0), (4, 3, 2), (1.5, 2.25, 0.5)]:
        np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(ijk), geometry.index_to_lps(ijk))
    back, back_geometry = from_sitk(image)
    np.testing.assert_array_equal(back, array)
    assert back_geometry == geometry
    assert to_sitk(array > 10, geometry).GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_write_volume_round_trip(tmp_path, suffix):
    volume = CTVolume(phantom(), oblique_geometry(), "written")
    path = write_volume(volume, tmp_path / f"out{suffix}")
    back = read_ct(path)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.geometry.direction, volume.geometry.direction, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, volume.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(back.geometry.spacing, volume.geometry.spacing, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temporary file left
    with pytest.raises(OutputError, match="already exists"):
        write_volume(volume, path)
    write_volume(volume, path, overwrite=True)
    with pytest.raises(OutputError, match="unsupported output type"):
        write_volume(volume, tmp_path / "out.mhd")


# ---------------------------------------------------------------------------------------------------------
# Property: corrupt bytes never escape as anything but InputError


@pytest.fixture(scope="module")
def small_nrrd(tmp_path_factory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    image = sitk.GetImageFromArray(phantom((4, 8, 8)))
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(folder / "clean.nrrd"), useCompression=False)
    return folder / "corrupt.nrrd", (folder / "clean.nrrd").read_bytes()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       keep=st.floats(0.2, 1.0))
def test_corrupt_nrrd_reads_or_raises_input_error(small_nrrd, edits, keep):
    path, clean = small_nrrd
    data = bytearray(clean[: max(1, int(len(clean) * keep))])
    for where, value in edits:
        data[int(where * len(data))] = value
    path.write_bytes(bytes(data))
    try:
        volume = read_ct(path)
    except InputError as exc:
        assert "\n" not in str(exc) and "Exception thrown" not in str(exc)
    else:
        assert volume.array.ndim == 3
