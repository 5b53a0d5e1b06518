"""Read CT scans into ``CTVolume``, write volumes, and convert between numpy and SimpleITK.

Inputs: a DICOM series folder, ``.nrrd``/``.nhdr``, ``.nii``/``.nii.gz``, ``.mha``/``.mhd``. Every problem a
user can cause is raised as ``InputError`` with a one-line message that names the file.

Decisions taken here (and why):

* **Geometry** is exactly what SimpleITK reports (LPS mm; direction columns = axis directions). DICOM slices
  are ordered along the slice normal, as ``ImageSeriesReader.GetGDCMSeriesFileNames`` orders them.
* **Padding**: voxels below ``PADDING_BELOW_HU`` (scanner padding such as -2048 or -3024 outside the
  reconstruction circle) and, for DICOM, voxels equal to ``PixelPaddingValue`` that connect to the image's
  side faces, are set to ``AIR_HU`` and recorded in ``padding_mask``. Values between ``PADDING_BELOW_HU`` and
  ``AIR_HU`` are noise in air (e.g. -1549 in a lung) and are clipped to ``AIR_HU`` without being marked.
* **Missing slices / uneven slice spacing** in a DICOM series: error. Resampling over a gap would invent
  tissue where a nodule could hide; the user should re-export the complete series.
* **Gantry tilt** (slices stacked obliquely to their normal): error. ITK would drop the shear silently and
  shift every finding by up to tan(tilt) × distance; Slicer's DICOM module can regularise such a series.
* **Huge inputs** are refused from the header, before any pixel is read (``max_bytes``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_path
from .errors import InputError, OutputError
from .geometry import Geometry
from .volume import AIR_HU, CTVolume

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

#: File name endings ``read_ct`` accepts (besides a DICOM folder); ``.nii.gz`` before ``.nii``.
_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
            ".mhd": "metaimage"}
READ_SUFFIXES = tuple(_FORMATS)
#: Endings ``write_volume`` accepts (single-file formats only, so that the write can be atomic).
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Voxels below this HU are scanner padding, not tissue.
PADDING_BELOW_HU = -1500
#: Voxel spacing (mm) above which a scan is refused, and above which a warning is given.
MAX_SPACING_MM = 10.0
WARN_SPACING_MM = 5.0
#: A CT in HU has at least this fraction of (non-padding) voxels at or below ``AIR_MAX_HU`` (lungs, air).
MIN_AIR_FRACTION = 0.01
AIR_MAX_HU = -900
#: Largest tolerated deviation of one DICOM slice step from the median step (fraction of it).
SLICE_STEP_TOLERANCE = 0.05
#: Largest tolerated gantry tilt (degrees) between the slice normal and the slice stacking direction.
MAX_TILT_DEGREES = 0.1
#: Default memory limit for one input; override with ``max_bytes`` or this environment variable.
DEFAULT_MAX_INPUT_BYTES = 8 * 1024**3
MAX_BYTES_ENV = "NODULE_DETECTION_MAX_INPUT_BYTES"
#: Copies of the image held at once while reading (SimpleITK image, numpy copy, HU result).
_COPIES_WHILE_READING = 3


# ----------------------------------------------------------------------------------------------------------
# numpy <-> SimpleITK


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a numpy array indexed ``[k, j, i]`` and its LPS geometry.

    Boolean arrays become ``uint8``. The direction is passed row-major, so that column ``n`` of
    ``geometry.direction`` is the LPS direction of index axis ``n``, as SimpleITK expects.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"to_sitk needs a 3D array [k, j, i], got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """The voxels (a numpy copy indexed ``[k, j, i]``) and LPS geometry of a 3D scalar SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"from_sitk needs a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return sitk.GetArrayFromImage(image), Geometry(image.GetSpacing(), image.GetOrigin(), direction)


# ----------------------------------------------------------------------------------------------------------
# Public reader, validator and writer


def read_ct(path: str | os.PathLike, series_uid: str | None = None, max_bytes: int | None = None) -> CTVolume:
    """Read a CT scan as HU, indexed ``[k, j, i]``, with its LPS geometry.

    Args:
        path: a DICOM series folder (searched recursively) or a ``.nrrd``, ``.nhdr``, ``.nii(.gz)``,
            ``.mha``, ``.mhd`` file.
        series_uid: for a folder holding several series, the SeriesInstanceUID to read. Without it the CT
            series with the most slices is read (localizers excluded) and the choice is logged.
        max_bytes: refuse inputs that would need more memory than this while reading; default
            ``$NODULE_DETECTION_MAX_INPUT_BYTES`` or ``DEFAULT_MAX_INPUT_BYTES``.

    Returns:
        The volume: ``int16`` where values fit, else ``float32``; padding set to ``AIR_HU`` and recorded in
        ``padding_mask``; warnings (e.g. thick slices) logged and listed in ``metadata["warnings"]``.

    Raises:
        InputError: missing, unreadable, not a 3D CT, absurd geometry, incomplete series, too large.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist")
    limit = _max_bytes(max_bytes)
    if path.is_dir():
        volume = _read_dicom_folder(path, series_uid, limit)
    elif path.name.lower().endswith(READ_SUFFIXES):
        if series_uid is not None:
            raise InputError(f"{path}: a series UID can only be chosen in a DICOM folder, not in a single file")
        volume = _read_image_file(path, limit)
    elif path.suffix.lower() == ".dcm" or _is_dicom_file(path):
        raise InputError(f"{path} is a single DICOM file; pass the folder that holds the whole series")
    else:
        raise InputError(
            f"{path}: unsupported file type; use a DICOM folder or a {', '.join(READ_SUFFIXES)} file"
        )
    for warning in volume.metadata["warnings"]:
        log.warning(warning)
    return volume


def validate_ct(volume: CTVolume) -> list[str]:
    """Check that a volume is a usable 3D CT in HU; return warnings, raise ``InputError`` if it is not.

    Used by ``read_ct`` and for volumes that come from elsewhere (e.g. a Slicer scene). Checks: at least two
    voxels along every axis, numeric finite values, spacing (``_check_spacing``), and air: a CT in HU has
    lungs and air around the body near -1000 HU, which MR images and label maps lack.
    """
    source = volume.name
    array = volume.array
    if min(array.shape) < 2:
        raise InputError(
            f"{source} is a 2D image (shape k,j,i = {array.shape}): a 3D CT volume with several slices is needed"
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{source}: voxel type {array.dtype} is not a number; a CT in HU is needed")
    warnings = _check_spacing(volume.geometry.spacing, source)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"{source} contains NaN or infinite voxel values; it is not a usable CT")
    step = (1, 2, 2) if array.size > 1_000_000 else (1, 1, 1)  # a deterministic sample is enough
    sample = array[:: step[0], :: step[1], :: step[2]]
    if volume.padding_mask is not None:
        sample = sample[~volume.padding_mask[:: step[0], :: step[1], :: step[2]]]
    air_fraction = float(np.mean(sample <= AIR_MAX_HU)) if sample.size else 0.0
    if air_fraction < MIN_AIR_FRACTION:
        low, high = np.percentile(sample, [1, 99]) if sample.size else (np.nan, np.nan)
        raise InputError(
            f"{source} does not look like a CT in HU: only {100 * air_fraction:.2g}% of voxels are air "
            f"(<= {AIR_MAX_HU} HU; values span {low:g}..{high:g} at the 1st..99th percentile); "
            "is it an MR image, a label map or a rescaled image?"
        )
    return warnings


def write_volume(volume: CTVolume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a volume's array (HU, ``[k, j, i]``) with its LPS geometry to ``.nrrd``/``.nii(.gz)``/``.mha``.

    The write is atomic and refuses to replace an existing file unless ``overwrite``. The padding mask and
    metadata are not written (padding voxels hold ``AIR_HU``).
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise OutputError(f"{path}: unsupported output type; use one of {', '.join(WRITE_SUFFIXES)}")
    image = to_sitk(volume.array, volume.geometry)
    with atomic_path(path, overwrite) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise OutputError(f"cannot write {path}: {_itk_message(exc)}") from exc
    return path


# ----------------------------------------------------------------------------------------------------------
# Image files (NRRD, NIfTI, MetaImage)


def _read_image_file(path: Path, max_bytes: int) -> CTVolume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_message(exc)}") from exc
    size = reader.GetSize()
    if reader.GetDimension() != 3:
        raise InputError(f"{path} is a {reader.GetDimension()}D image (size {size}); a 3D CT volume is needed")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{path} has {reader.GetNumberOfComponents()} values per voxel (colour or vector image), not a CT"
        )
    _check_spacing(reader.GetSpacing(), str(path))
    pixel_bytes = sitk.Image([1, 1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
    _check_memory(size, pixel_bytes, path, max_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_message(exc)}") from exc
    name, file_format = _split_name(path)
    metadata = {"format": file_format, "source": str(path), "modality": None, "description": None,
                "manufacturer": None, "slice_thickness_mm": None}
    return _to_ct_volume(image, name, name, metadata, padding_hu=None)


def _split_name(path: Path) -> tuple[str, str]:
    """``(name, format)``: the file name without its image suffix, and the format it names."""
    lower = path.name.lower()
    suffix = next(s for s in READ_SUFFIXES if lower.endswith(s))
    return path.name[: -len(suffix)], _FORMATS[suffix]


# ----------------------------------------------------------------------------------------------------------
# DICOM


def _read_dicom_folder(folder: Path, series_uid: str | None, max_bytes: int) -> CTVolume:
    series, n_files = _scan_dicom(folder)
    if n_files == 0:
        raise InputError(f"{folder} is an empty folder; pass a DICOM series folder or an image file")
    if not series:
        raise InputError(f"{folder} holds no DICOM images ({n_files} files checked)")
    summaries = {uid: _series_summary(uid, slices) for uid, slices in series.items()}
    uid, reason = _choose_series(series, series_uid, folder, summaries)
    slices = series[uid]
    first = slices[0][1]
    if first.get("Modality", "") != "CT":
        raise InputError(f"{folder}: series {summaries[uid]} is not CT")
    if _is_localizer(first) or len(slices) < 2:
        raise InputError(f"{folder}: series {summaries[uid]} is a localizer/scout or a single slice, not a volume")
    files = _ordered_slices(slices, folder)
    rows, columns = int(first.Rows), int(first.Columns)
    _check_memory((columns, rows, len(files)), 4, folder, max_bytes)  # SimpleITK returns 32-bit voxels
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        bad = _first_unreadable(files)
        raise InputError(f"cannot read DICOM slice {bad or folder}: {_itk_message(exc)}") from exc
    metadata = {
        "format": "dicom",
        "source": str(folder),
        "modality": "CT",
        "description": str(first.get("SeriesDescription", "")) or None,
        "manufacturer": str(first.get("Manufacturer", "")) or None,
        "slice_thickness_mm": float(first.SliceThickness) if first.get("SliceThickness") not in (None, "") else None,
        "series_chosen": uid,
        "series_reason": reason,
        "series_found": list(summaries.values()),
    }
    return _to_ct_volume(image, folder.name, uid, metadata, padding_hu=_padding_hu(first))


def _is_dicom_file(path: Path) -> bool:
    import pydicom  # imported where needed (as in _scan_dicom): it costs a third of a second at start-up

    return bool(pydicom.misc.is_dicom(path))


def _scan_dicom(folder: Path) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]], int]:
    """Group the DICOM image files under ``folder`` by SeriesInstanceUID; also count the files looked at."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    n_files = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(root) / name
            n_files += 1
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                continue  # not DICOM: notes, thumbnails, ...
            except Exception as exc:  # pydicom raises many types on broken files
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise InputError(f"corrupt DICOM file {path}: {reason}") from exc
            if "Rows" in ds and "SeriesInstanceUID" in ds:
                series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
            elif "Image Storage" in pydicom.uid.UID(ds.file_meta.get("MediaStorageSOPClassUID", "")).name:
                raise InputError(f"corrupt DICOM file {path}: an image whose header ends early (truncated?)")
    return series, n_files


def _is_localizer(ds: pydicom.Dataset) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _series_summary(uid: str, slices: list[tuple[Path, pydicom.Dataset]]) -> str:
    ds = slices[0][1]
    kind = " localizer" if _is_localizer(ds) else ""
    description = f' "{ds.SeriesDescription}"' if ds.get("SeriesDescription") else ""
    return f"{uid} ({ds.get('Modality', 'no modality')}{kind}{description}, {len(slices)} slice(s))"


def _choose_series(
    series: dict[str, list], wanted: str | None, folder: Path, summaries: dict[str, str]
) -> tuple[str, str]:
    """The UID to read and why: the requested one, else the CT volume series with the most slices."""
    if wanted is not None:
        if wanted not in series:
            raise InputError(f"series {wanted} is not in {folder}; it holds {'; '.join(summaries.values())}")
        return wanted, "requested"
    candidates = [
        uid for uid, slices in series.items()
        if slices[0][1].get("Modality", "") == "CT" and not _is_localizer(slices[0][1]) and len(slices) > 1
    ]
    if not candidates:
        raise InputError(
            f"{folder} holds no CT volume (only localizer, single-slice or non-CT series): "
            + "; ".join(summaries.values())
        )
    uid = max(candidates, key=lambda u: len(series[u]))
    reason = f"the CT series with the most slices ({len(series[uid])}) of {len(series)} series found"
    if len(series) > 1:
        log.info("%s: reading series %s, %s", folder, summaries[uid], reason)
    return uid, reason


def _ordered_slices(slices: list[tuple[Path, pydicom.Dataset]], folder: Path) -> list[Path]:
    """Slice files sorted along the slice normal; raise if the stack is not a regular, orthogonal grid."""
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{folder}: slices lack a valid ImagePositionPatient/ImageOrientationPatient") from exc
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(sizes) > 1 or not np.allclose(orientations, orientations[0], atol=1e-4):
        raise InputError(f"{folder}: the slices of the series differ in size or orientation ({sorted(sizes)})")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    files = [slices[n][0] for n in order]
    if np.any(steps < 1e-3):
        n = int(np.argmax(steps < 1e-3))
        raise InputError(f"{folder}: slices {files[n].name} and {files[n + 1].name} have the same position; "
                         "the series holds duplicate slices or several acquisitions")
    step = float(np.median(steps))
    gaps = steps > 1.5 * step
    if np.any(gaps):
        n = int(np.argmax(gaps))
        missing = int(np.sum(np.round(steps[gaps] / step) - 1))
        raise InputError(
            f"{folder}: about {missing} slice(s) missing from the series (a {steps[n]:.3g} mm gap after "
            f"{files[n].name}, where slices are {step:.3g} mm apart); export the complete series"
        )
    if np.any(np.abs(steps - step) > SLICE_STEP_TOLERANCE * step):
        raise InputError(f"{folder}: uneven slice spacing ({steps.min():.3g}..{steps.max():.3g} mm between "
                         "slices); export a series with regular spacing")
    stack = positions[order[-1]] - positions[order[0]]
    tilt = np.degrees(np.arctan2(np.linalg.norm(stack - (stack @ normal) * normal), stack @ normal))
    if tilt > MAX_TILT_DEGREES:
        raise InputError(
            f"{folder}: gantry tilt of {tilt:.2g} degrees (slices are stacked obliquely); correct it first, e.g. "
            "with Slicer's DICOM 'acquisition geometry regularization'"
        )
    return files


def _padding_hu(ds: pydicom.Dataset) -> float | None:
    """``PixelPaddingValue`` in HU (stored value × slope + intercept), or ``None``."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    value = int(value)
    if int(ds.get("PixelRepresentation", 0)) == 1 and value >= 2 ** (int(ds.get("BitsAllocated", 16)) - 1):
        value -= 2 ** int(ds.get("BitsAllocated", 16))  # a signed value stored with VR US
    return value * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _first_unreadable(files: list[Path]) -> Path | None:
    for path in files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return path
    return None


# ----------------------------------------------------------------------------------------------------------
# Shared steps


def _to_ct_volume(image: sitk.Image, name: str, uid: str, metadata: dict, padding_hu: float | None) -> CTVolume:
    """Replace padding by ``AIR_HU``, pick the dtype, validate; ``metadata["warnings"]`` lists warnings."""
    try:
        hu, geometry = from_sitk(image)
    except ValueError as exc:
        raise InputError(f"{metadata['source']}: unusable geometry: {exc}") from exc
    padding = hu < PADDING_BELOW_HU
    if padding_hu is not None and padding_hu >= PADDING_BELOW_HU:
        padding |= _touching_sides(hu == padding_hu)
    hu = hu.astype(np.promote_types(hu.dtype, np.int16), copy=False)  # unsigned → signed
    np.maximum(hu, AIR_HU, out=hu)  # in place: a huge scan is not held twice
    hu[padding] = AIR_HU
    integral = np.issubdtype(hu.dtype, np.integer) or bool(np.all(hu == np.round(hu)))
    fits = integral and hu.min() >= -32768 and hu.max() <= 32767
    hu = hu.astype(np.int16 if fits else np.float32, copy=False)
    metadata = {**metadata, "padding_voxels": int(padding.sum())}
    volume = CTVolume(hu, geometry, name, uid, padding if padding.any() else None, metadata)
    volume.metadata["warnings"] = validate_ct(volume)
    return volume


def _touching_sides(mask: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` ``[k, j, i]`` that touch a side face (i or j border) of the grid."""
    labels, _ = ndimage.label(mask)
    sides = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                            labels[:, :, -1].ravel()])
    touching = np.unique(sides[sides > 0])
    return np.isin(labels, touching)


def _check_spacing(spacing, source: str) -> list[str]:
    """Raise for spacing that is not positive and finite or over ``MAX_SPACING_MM``; warn above 5 mm."""
    values = np.asarray(spacing, dtype=float)
    shown = ", ".join(f"{v:g}" for v in values)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"{source}: voxel spacing ({shown}) mm is not positive and finite; the geometry is broken")
    if values.max() > MAX_SPACING_MM:
        raise InputError(f"{source}: voxel spacing ({shown}) mm is over {MAX_SPACING_MM:g} mm; too coarse to find "
                         "nodules")
    if values.max() > WARN_SPACING_MM:
        return [f"{source}: voxel spacing ({shown}) mm is over {WARN_SPACING_MM:g} mm; small nodules may be missed"]
    return []


def _max_bytes(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return int(max_bytes)
    env = os.environ.get(MAX_BYTES_ENV)
    if not env:
        return DEFAULT_MAX_INPUT_BYTES
    try:
        return int(float(env))
    except ValueError as exc:
        raise InputError(f"{MAX_BYTES_ENV}={env!r} is not a number of bytes") from exc


def _check_memory(size_ijk, pixel_bytes: int, source, max_bytes: int) -> None:
    needed = _COPIES_WHILE_READING * int(np.prod(size_ijk, dtype=np.int64)) * pixel_bytes
    if needed > max_bytes:
        raise InputError(
            f"{source} is too large: {' x '.join(str(s) for s in size_ijk)} voxels would need about "
            f"{needed / 1024**3:.3g} GiB while reading (limit {max_bytes / 1024**3:.3g} GiB; raise it with "
            f"max_bytes or {MAX_BYTES_ENV})"
        )


def _itk_message(exc: Exception) -> str:
    """One line from a multi-line ITK exception: its ``ERROR`` line (without the object address) and, when
    a library such as teem's nrrd adds detail lines, the innermost (last) of them."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for n, line in enumerate(lines):
        match = re.match(r"(?:ITK |s?itk::)ERROR: (?:\w+\(0x[0-9a-f]+\): )?(.*)", line)
        if match:
            detail = f"; {lines[-1]}" if n < len(lines) - 1 else ""
            return (match.group(1).rstrip(":") + detail)[:300]
    return (lines[0] if lines else repr(exc))[:300]
