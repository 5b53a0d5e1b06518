"""Issue 8, end to end: every bad input gets one clear line and exit status 2 from ``nodule-detection detect``,
with no traceback and no output file; warnings for usable but doubtful inputs; nothing lost on failure.

Bad inputs are built in ``tmp_path`` (DICOM ones from copies of a few LIDC-IDRI-0001 slices, with the helpers
of ``test_io``, where the same inputs are tested at the reader level). Most cases call ``cli.main`` in-process
(fast); a few run the real command in a fresh interpreter to prove that no traceback reaches the user.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from NoduleDetectionLib import writers
from NoduleDetectionLib.cli import OUT_OF_MEMORY, main
from NoduleDetectionLib.detect import Detector
from NoduleDetectionLib.errors import InputError, ModelError, NoduleDetectionError, OutputError
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import from_sitk, write_volume
from NoduleDetectionLib.models import FORMAT_VERSION
from NoduleDetectionLib.synthetic import make_phantom
from NoduleDetectionLib.volume import CTVolume
from pydicom.uid import generate_uid
from test_io import LIDC1_UID, copy_series, lidc1_slices, new_series, phantom, write_image, write_mhd  # noqa: F401

ABDOMEN = "totalsegmentator-example-abdomen.nii.gz"
UNIT_GRID = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))


def _run(*args) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "NoduleDetectionLib.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temporaries included); empty if it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _assert_one_line_error(returncode: int, stderr: str, match: str, out: Path) -> str:
    """Exit status 2, exactly one stderr line naming the reason, no traceback, nothing written to ``out``."""
    import re

    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nodule-detection: error: "), lines[0]
    assert re.search(match, lines[0]), (match, lines[0])
    assert _files(out) == [], "partial output"
    return lines[0]


def _phantom_ct(path: Path, spacing=(2.0, 2.0, 2.5), shape=(24, 64, 72), seed: int = 0) -> Path:
    """A small chest phantom (body, lungs, vessels, nodules) written as a CT file."""
    volume = make_phantom(np.random.default_rng(seed), shape=shape, spacing=spacing).volume
    return write_volume(volume, path)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: how each is made, and the reason its error line must give


@dataclass
class Context:
    """What a case builder may use: a scratch folder, the LIDC-IDRI-0001 slices (lazily), the tiny model."""

    tmp: Path
    slices: Callable[[], list[Path]]
    model: Path


def _dicom(edit=None, picks=range(60, 65)):
    """A series folder with copies of the LIDC-IDRI-0001 slices ``picks`` (bottom to top), each edited."""
    def build(c: Context):
        return copy_series([c.slices()[n] for n in picks], c.tmp / "series", edit), []
    return build


def _truncated_slice(index: int, keep: int):
    """Five slices, the one ``index`` (60..64) cut to its first ``keep`` bytes."""
    def build(c: Context):
        folder = copy_series(c.slices()[60:65], c.tmp / "series")
        broken = folder / c.slices()[index].name
        broken.write_bytes(broken.read_bytes()[:keep])
        return folder, []
    return build


def _set(**values):
    def edit(ds, n):
        for key, value in values.items():
            setattr(ds, key, value)
    return edit


def _shift(ds, n):
    if n == 3:
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.8


def _tilt(ds, n):
    ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + n * 2.5 * np.tan(np.radians(15))


def _empty(c: Context):
    (c.tmp / "empty").mkdir()
    return c.tmp / "empty", []


def _notes(c: Context):
    (c.tmp / "notes").mkdir()
    (c.tmp / "notes" / "readme.txt").write_text("no images here")
    return c.tmp / "notes", []


def _truncated_nrrd(c: Context):
    path = write_image(c.tmp / "scan.nrrd", phantom())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, []


def _mr_values(c: Context):
    mr = np.random.default_rng(0).integers(0, 800, size=(6, 32, 32)).astype(np.uint16)
    return write_image(c.tmp / "mr.nii.gz", mr), []


def _label_map(c: Context):
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[2:4, 10:20, 10:20] = 3
    return write_image(c.tmp / "labels.nrrd", labels), []


def _two_series(c: Context, other: str = "") -> Path:
    """One folder holding a 6-slice CT series (LIDC-IDRI-0001) and a 4-slice one (UID ``other``), files mixed."""
    copy_series(c.slices()[60:66], c.tmp / "study")
    return copy_series(c.slices()[80:84], c.tmp / "study", new_series(other or generate_uid()), prefix="b-")


def _model_bytes(edit: Callable[[bytes], bytes]):
    def build(c: Context):
        model = c.tmp / "model.safetensors"
        model.write_bytes(edit(c.model.read_bytes()))
        return write_image(c.tmp / "ok.nrrd", phantom()), ["--model", model]
    return build


def _flip_last_bytes(data: bytes) -> bytes:
    return data[:-5] + bytes(b ^ 0xFF for b in data[-5:])


def _other_version(data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _pickle_model(c: Context):
    import torch

    torch.save({"w": torch.zeros(3)}, c.tmp / "model.pt")
    return write_image(c.tmp / "ok.nrrd", phantom()), ["--model", c.tmp / "model.pt"]


#: case id → (builder returning (input, extra arguments), regular expression the error line must match)
BAD_INPUTS = {
    "missing path": (lambda c: (c.tmp / "nothing.nrrd", []), r"nothing\.nrrd does not exist"),
    "empty folder": (_empty, "empty folder"),
    "folder without DICOM": (_notes, r"no DICOM images \(1 files checked\)"),
    "unsupported file": (lambda c: (write_image(c.tmp / "photo.png", phantom()[0].astype(np.uint8)), []),
                         "unsupported file type"),
    "single DICOM file": (lambda c: (c.slices()[0], []), "single DICOM file; pass the folder"),
    "unknown series": (lambda c: (_two_series(c), ["--series", "1.2.3.4"]), "series 1.2.3.4 is not in"),
    "series of a file": (lambda c: (write_image(c.tmp / "ok.nrrd", phantom()), ["--series", "1.2"]),
                         "only be chosen in a DICOM folder"),
    "truncated DICOM slice": (_truncated_slice(62, 300_000), r"cannot read DICOM slice .*\.dcm"),
    "DICOM cut in its header": (_truncated_slice(64, 700), r"corrupt DICOM file .*\.dcm"),
    "truncated NRRD": (_truncated_nrrd, r"cannot read .*scan\.nrrd"),
    "2D image": (lambda c: (write_image(c.tmp / "plane.nrrd", phantom()[0]), []), "2D image"),
    "single-slice volume": (lambda c: (write_image(c.tmp / "one.nrrd", phantom()[:1]), []), "2D image"),
    "localizer series": (_dicom(_set(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])), "no CT volume.*localizer"),
    "MR series": (_dicom(_set(Modality="MR")), "no CT volume.*MR"),
    "MR-like values": (_mr_values, "mr does not look like a CT.*MR image, a label map"),
    "label map": (_label_map, "labels does not look like a CT"),
    "zero spacing": (lambda c: (write_mhd(c.tmp, "0 1 1"), []), r"spacing \(0, 1, 1\) mm is not positive"),
    "negative spacing": (lambda c: (write_mhd(c.tmp, "1 1 -2"), []), r"spacing \(1, 1, -2\) mm is not positive"),
    "12 mm slices": (lambda c: (write_mhd(c.tmp, "0.7 0.7 12"), []), "over 10 mm; too coarse"),
    "missing slice": (_dicom(picks=[60, 61, 62, 63, 65, 66, 67]), r"1 slice\(s\) missing"),
    "uneven spacing": (_dicom(_shift, picks=range(60, 66)), "uneven slice spacing"),
    "gantry tilt": (_dicom(_tilt), "gantry tilt of 15 degrees"),
    "huge volume": (lambda c: (write_mhd(c.tmp, "1 1 1", size="100000 100000 1000"), []), "is too large"),
    "tampered model": (_model_bytes(_flip_last_bytes), "failed its checksum"),
    "truncated model": (_model_bytes(lambda d: d[:-100]), "not a readable model file"),
    "model of another format version": (_model_bytes(_other_version), f"format version {FORMAT_VERSION + 1}"),
    "pickled model": (_pickle_model, "model.pt is not a readable model file"),
}


@pytest.fixture
def context(tmp_path, tiny_model_path, request) -> Context:
    (tmp_path / "in").mkdir()
    return Context(tmp_path / "in", lambda: request.getfixturevalue("lidc1_slices"), tiny_model_path)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(case, context, capsys):
    build, match = BAD_INPUTS[case]
    source, extra = build(context)
    out = context.tmp.parent / "out"
    args = ["detect", str(source), "-o", str(out), "--model", str(context.model), "--device", "cpu"]
    status = main(args + [str(a) for a in extra])
    _assert_one_line_error(status, capsys.readouterr().err, match, out)


@pytest.mark.parametrize("case", ["missing path", "DICOM cut in its header", "MR-like values", "gantry tilt",
                                  "tampered model"])
def test_bad_input_in_a_real_process_prints_no_traceback(case, context):
    build, match = BAD_INPUTS[case]
    source, extra = build(context)
    out = context.tmp.parent / "out"
    proc = _run("detect", source, "-o", out, "--model", context.model, "--device", "cpu", *extra)
    _assert_one_line_error(proc.returncode, proc.stderr, match, out)
    assert proc.stdout == ""


def test_logic_raises_value_error_with_the_command_line_message(context, capsys):
    """``Detector.detect`` (what the Slicer logic and the benchmark call) raises a ``ValueError`` whose text is the
    command line's error line."""
    assert issubclass(NoduleDetectionError, ValueError)
    assert all(issubclass(e, NoduleDetectionError) for e in (InputError, ModelError, OutputError))
    source, _ = _mr_values(context)
    out = context.tmp.parent / "out"
    status = main(["detect", str(source), "-o", str(out), "--model", str(context.model), "--device", "cpu"])
    line = _assert_one_line_error(status, capsys.readouterr().err, "does not look like a CT", out)
    array, geometry = from_sitk(sitk.ReadImage(str(source)))
    detector = Detector.load(context.model, device="cpu")
    with pytest.raises(ValueError) as info:
        detector.detect(CTVolume(array.astype(np.int16), geometry, name="mr"))
    assert line == f"nodule-detection: error: {info.value}"


# ---------------------------------------------------------------------------------------------------------
# Usable but doubtful inputs: the run succeeds and says what is doubtful


def _summary(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow  # two detections, each in a fresh interpreter
def test_several_series_reads_the_largest_ct_and_says_so(context, tmp_path):
    other = generate_uid()
    study = _two_series(context, other)
    proc = _run("detect", study, "-o", tmp_path / "out1", "--model", context.model, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    chosen = [line for line in proc.stderr.splitlines() if "reading series" in line]
    assert len(chosen) == 1 and LIDC1_UID in chosen[0] and "most slices (6) of 2 series" in chosen[0]
    assert _summary(tmp_path / "out1", "study")["input"]["series_uid"] == LIDC1_UID
    proc = _run("detect", study, "-o", tmp_path / "out2", "--model", context.model, "--device", "cpu",
                "--series", other)
    assert proc.returncode == 0, proc.stderr
    assert _summary(tmp_path / "out2", "study")["input"]["series_uid"] == other


@pytest.mark.slow  # a detection in a fresh interpreter
def test_abdomen_scan_warns_that_the_lung_field_is_partial(shared_data, tiny_model_path, tmp_path):
    proc = _run("detect", shared_data / "ct" / ABDOMEN, "-o", tmp_path, "--model", tiny_model_path, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1 and "lung field partial or missing" in warning[0], proc.stderr
    warnings = _summary(tmp_path, "totalsegmentator-example-abdomen")["warnings"]
    assert any("lung field partial or missing" in w for w in warnings)


def test_thick_slices_run_with_a_warning(context, tmp_path, caplog):
    source = _phantom_ct(context.tmp / "thick.nrrd", spacing=(2.0, 2.0, 6.0), shape=(12, 64, 72))
    status = main(["detect", str(source), "-o", str(tmp_path / "out"), "--model", str(context.model),
                   "--device", "cpu"])
    assert status == 0
    warnings = _summary(tmp_path / "out", "thick")["warnings"]
    assert any("over 5 mm; small nodules may be missed" in w for w in warnings)
    assert "over 5 mm" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Nothing lost: existing outputs, failures midway, the user's own files and folders


@pytest.fixture
def done_run(context, tmp_path) -> tuple[Path, Path, list[str]]:
    """A finished run: its input, its output folder and the arguments that made it."""
    source = _phantom_ct(context.tmp / "chest.nrrd")
    out = tmp_path / "out"
    args = ["detect", str(source), "-o", str(out), "--model", str(context.model), "--device", "cpu"]
    assert main(args) == 0
    return source, out, args


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(done_run, capsys):
    _, out, args = done_run
    capsys.readouterr()
    outputs = _files(out)
    table = out / "chest.csv"
    for name in outputs:
        (out / name).unlink()
    table.write_text("the user's own notes\n")
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{table} already exists; use --overwrite" in err
    assert table.read_text() == "the user's own notes\n" and _files(out) == ["chest.csv"]
    assert main(args + ["--overwrite"]) == 0
    assert table.read_text().startswith("seriesuid,coordX,coordY,coordZ,probability")
    assert _files(out) == outputs


def _fail_with(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize(("exc", "status", "match"), [
    (OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out/chest_nodules.png"), 2,
     "Permission denied: /data/out/chest_nodules.png"),
    (MemoryError(), 2, "out of memory: use a smaller input"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_failure_while_writing_leaves_no_file_and_one_line(context, tmp_path, monkeypatch, capsys, exc, status, match):
    """The figure is written last; when it fails, the four files written before it are not left behind either."""
    source = _phantom_ct(context.tmp / "chest.nrrd")
    monkeypatch.setattr(writers, "_write_figure", _fail_with(exc))
    out = tmp_path / "out"
    got = main(["detect", str(source), "-o", str(out), "--model", str(context.model), "--device", "cpu"])
    err = capsys.readouterr().err
    assert got == status and err.count("\n") == 1 and match in err and "Traceback" not in err
    assert _files(out) == []


def test_out_of_memory_in_detection_suggests_what_to_do(context, tmp_path, monkeypatch, capsys):
    import torch

    source = _phantom_ct(context.tmp / "chest.nrrd")
    out = tmp_path / "out"
    args = ["detect", str(source), "-o", str(out), "--model", str(context.model), "--device", "cpu"]
    for exc in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        monkeypatch.setattr(Detector, "detect", _fail_with(exc))
        assert main(args) == 2
        assert capsys.readouterr().err == f"nodule-detection: error: {OUT_OF_MEMORY}\n"
        assert _files(out) == []


def test_a_bug_says_internal_error_with_its_traceback(context, tmp_path, monkeypatch, capsys):
    source = _phantom_ct(context.tmp / "chest.nrrd")
    monkeypatch.setattr(Detector, "detect", _fail_with(RuntimeError("index 7 is out of bounds")))
    out = tmp_path / "out"
    assert main(["detect", str(source), "-o", str(out), "--model", str(context.model)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error, please report it" in err and "out of bounds" in err
    assert _files(out) == []


def test_output_folder_that_is_a_file_or_read_only(context, tmp_path, capsys):
    source = _phantom_ct(context.tmp / "chest.nrrd")
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("keep me")
    args = ["detect", str(source), "--model", str(context.model), "--device", "cpu", "-o"]
    assert main(args + [str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(not_a_folder) in err and not_a_folder.read_text() == "keep me"
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(args + [str(locked)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Permission denied" in err and _files(locked) == []
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# Huge inputs: bounded memory, measured in a child process


def write_big_phantom(path: Path, shape: tuple[int, int, int], spacing_mm: float = 0.4) -> Path:
    """Stream a chest-like ``int16`` phantom ``[k, j, i]`` (body, two lungs, one 10 mm nodule) to a gzip NRRD one
    slice at a time, so that writing it needs only a slice of memory."""
    import gzip

    nk, nj, ni = shape
    jj, ii = np.meshgrid(np.arange(nj, dtype=np.float32), np.arange(ni, dtype=np.float32), indexing="ij")
    body = ((ii - ni / 2) / (0.46 * ni)) ** 2 + ((jj - nj / 2) / (0.36 * nj)) ** 2 <= 1
    header = (
        f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {ni} {nj} {nk}\n"
        f"space directions: ({spacing_mm},0,0) (0,{spacing_mm},0) (0,0,{spacing_mm})\n"
        "kinds: domain domain domain\nendian: little\nencoding: gzip\nspace origin: (0,0,0)\n\n"
    )
    radius = 5.0 / spacing_mm
    with open(path, "wb") as f:
        f.write(header.encode())
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as gz:
            for k in range(nk):
                plane = np.full((nj, ni), -1000, np.int16)
                plane[body] = 40
                z = (k - nk / 2) / (0.42 * nk)
                if abs(z) < 1:
                    for side in (-1, 1):
                        lung = ((ii - ni / 2 - side * 0.2 * ni) / (0.16 * ni)) ** 2 + ((jj - nj / 2) / (0.27 * nj)) ** 2
                        plane[lung <= 1 - z * z] = -850
                    dz = k - nk / 2
                    if abs(dz) < radius:
                        plane[(ii - 0.3 * ni) ** 2 + (jj - nj / 2) ** 2 <= radius**2 - dz**2] = 30
                gz.write(plane.tobytes())
    return path


def test_outline_box_by_box_matches_whole_crop_interpolation():
    """``detect._upsampled_region`` (per nodule box) gives the voxels that upsampling the whole crop gave."""
    import torch
    import torch.nn.functional as F
    from NoduleDetectionLib.detect import _upsampled_region
    from scipy import ndimage

    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.random((20, 24, 28)).astype(np.float32), 1.0)
    prob = np.clip((smooth - smooth.mean()) * 12 + 0.3, 0, 1).astype(np.float32)
    regions, n = ndimage.label(prob >= 0.4)
    assert n >= 5
    crop_shape = (47, 61, 66)
    lab_up = F.interpolate(torch.from_numpy(regions.astype(np.float32))[None, None], size=crop_shape,
                           mode="nearest-exact")[0, 0].numpy()
    prob_up = F.interpolate(torch.from_numpy(prob)[None, None], size=crop_shape, mode="trilinear",
                            align_corners=False)[0, 0].numpy()
    objects = ndimage.find_objects(regions)
    outlined = 0
    for region in range(1, n + 1):
        expected = (lab_up == region) & (prob_up >= 0.5)
        got = np.zeros(crop_shape, bool)
        box, inside = _upsampled_region(prob, regions, region, objects[region - 1], crop_shape)
        got[box] = inside
        differ = got != expected
        assert np.all(np.abs(prob_up[differ] - 0.5) < 1e-5), f"region {region}: {differ.sum()} voxels differ"
        outlined += int(expected.sum())
    assert outlined > 1000


#: Peak resident memory allowed for ``detect`` on a 1024 × 1024 × N int16 scan: 1 GiB for Python, PyTorch and the
#: networks, plus 6 bytes a voxel. Reading is the peak (SimpleITK's image, 2 bytes a voxel, its numpy copy, 2, and
#: the padding mask, 1); detection keeps the input (2), the lung mask (1), a float32 copy of the lung crop only
#: while resampling it, and the label map (2). Measured on 1024 × 1024 × 1000 (2 GiB of voxels): 5.75 GB peak;
#: before the box-by-box outline and the slab-wise lung mask, 1024 × 1024 × 250 already took 6.9 GB.
BYTES_PER_VOXEL = 6
BASE_BYTES = 1024**3


@pytest.mark.slow
def test_huge_scan_runs_in_bounded_memory(tiny_model_path, tmp_path):
    """A 1024 × 1024 × 300 scan through the whole ``detect`` command, its peak memory read from the kernel."""
    shape = (300, 1024, 1024)
    source = write_big_phantom(tmp_path / "big.nrrd", shape)
    out = tmp_path / "out"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "NoduleDetectionLib.cli", "detect", str(source), "-o", str(out),
                                 "--model", str(tiny_model_path), "--device", "cpu"],
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
    assert (out / "big.seg.nrrd").is_file()
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    bound = BASE_BYTES + BYTES_PER_VOXEL * np.prod(shape)
    assert peak < bound, f"peak RSS {peak / 1024**3:.2f} GiB over {bound / 1024**3:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------
# Slicer: the user's nodes are never modified unless chosen as outputs; bad input raises the same ValueError


def _voxels(volume_node) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(volume_node.GetImageData().GetPointData().GetScalars()).copy()


def _points(markups) -> list[tuple[float, ...]]:
    points = []
    for n in range(markups.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(n, p)
        points.append(tuple(p))
    return points


@pytest.mark.mrml
def test_slicer_run_leaves_the_users_nodes_alone(tiny_model_path):
    pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from NoduleDetectionLogicLib import scene

    mrml = scene.create_scene()
    ct = scene.add_volume_node(mrml, make_phantom(np.random.default_rng(3), shape=(24, 64, 72)).volume)
    other_ct = scene.add_volume_node(mrml, make_phantom(np.random.default_rng(4), shape=(20, 48, 56)).volume, "other")
    points = mrml.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my points")
    points.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0), "mine")
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    segmentation.GetSegmentation().AddEmptySegment("liver")
    table = mrml.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    table.AddColumn().SetName("note")
    table.AddEmptyRow()
    matrix = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(matrix)
    before = {"ct": _voxels(ct), "other": _voxels(other_ct), "points": _points(points),
              "matrix": [matrix.GetElement(r, c) for r in range(4) for c in range(4)]}
    detector = Detector.load(tiny_model_path, device="cpu")

    outputs = scene.run_detection(ct, detector, threshold=0.0)
    assert {outputs.markups.GetID(), outputs.segmentation.GetID(), outputs.table.GetID()}.isdisjoint(
        {points.GetID(), segmentation.GetID(), table.GetID()})
    ct.GetIJKToRASMatrix(matrix)
    assert [matrix.GetElement(r, c) for r in range(4) for c in range(4)] == before["matrix"]
    np.testing.assert_array_equal(_voxels(ct), before["ct"])
    np.testing.assert_array_equal(_voxels(other_ct), before["other"])
    assert _points(points) == before["points"] and points.GetNthControlPointLabel(0) == "mine"
    assert list(segmentation.GetSegmentation().GetSegmentIDs()) == ["liver"]
    assert table.GetNumberOfRows() == 1 and table.GetColumnName(0) == "note"

    # A volume that is not CT: the same ValueError as Detector.detect, and the scene gains no node.
    mr = scene.add_volume_node(mrml, CTVolume(np.full((8, 20, 20), 300, np.int16), UNIT_GRID, "mr"))
    count = mrml.GetNumberOfNodes()
    with pytest.raises(ValueError, match="mr does not look like a CT") as info:
        scene.run_detection(mr, detector)
    with pytest.raises(ValueError) as direct:
        detector.detect(CTVolume(np.full((8, 20, 20), 300, np.int16), UNIT_GRID, "mr"))
    assert str(info.value) == str(direct.value)
    assert mrml.GetNumberOfNodes() == count
