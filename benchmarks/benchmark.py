"""Benchmark: the whole ``nodule-detection detect`` process against a SimpleITK read and MONAI's network.

On one machine, in one run, for each scan (default: LIDC-IDRI-0002 and LIDC-IDRI-0003 of ../shared/data):

* **ours**: ``nodule-detection detect SCAN -o TMP`` as a separate process: whole-process wall time, peak
  resident memory of that process (``wait4``), and wall time per stage from its log line
  (``timings read=… preprocess=… stage1=… blobs=… masses=… stage2=… shape=… postprocess=… write=…``; ``shape``
  only for a model that weighs the candidates' shape); ``startup`` is the rest
  (Python and library imports, model load);
* **floor**: a process that only reads the scan with SimpleITK (no detector can beat it);
* **MONAI**: the ``lung_nodule_ct_detection`` bundle's RetinaNet (3D ResNet50-FPN) on whole 512×512×192
  sliding windows (``monai_window.py`` in ``benchmarks/.venv-monai``, see ``setup_monai_env.sh``), random
  weights. A scan needs as many windows as the bundle's sliding window (overlap 0.25) takes over the scan
  resampled to 0.703125 × 0.703125 × 1.25 mm; the scan's MONAI time is the measured mean seconds per window
  times that number, i.e. **extrapolated** from the windows timed (``--monai-windows``, default 1), and the
  JSON says so. Only the network is timed (no resampling, no box decoding), which understates MONAI.

* **accuracy**: ``nodule-detection evaluate-detector`` on the real validation scans with the same model; its CPM
  must lie within 0.01 of the model card's (``Resources/Models/evaluation_real/froc.json``).

Prints a table and writes ``benchmarks/results/benchmark.json`` with the machine, every figure, the ratios
(ours / floor, MONAI / ours) and whether the targets are met on LIDC-IDRI-0002 (the whole detect process in at
most 20 s and 3 GB, at least 50× faster than MONAI's network, accuracy unchanged). Run it on a quiet machine::

    benchmarks/setup_monai_env.sh                    # once
    .venv/bin/python benchmarks/benchmark.py --model Resources/Models/nodule_detector.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SCANS = [REPO.parent / "shared" / "data" / "ct" / f"LIDC-IDRI-000{n}.nrrd" for n in (2, 3)]
MONAI_PYTHON = HERE / ".venv-monai" / "bin" / "python"
#: MONAI lung_nodule_ct_detection settings (configs/inference.json of the bundle).
MONAI_SPACING_XYZ = (0.703125, 0.703125, 1.25)
MONAI_WINDOW_XYZ = (512, 512, 192)
MONAI_OVERLAP = 0.25
VALIDATION_DATA = REPO.parent / "shared" / "data"
VALIDATION_LIST = REPO / "Resources" / "Models" / "validation_scans.txt"
#: The accuracy target: the validation CPM within this of the model card's.
ACCURACY_TOLERANCE = 0.01
TARGETS = {"scan": "LIDC-IDRI-0002", "max_wall_s": 20.0, "max_peak_rss_gb": 3.0, "min_monai_over_ours": 50.0}
STAGES = ("read", "preprocess", "stage1", "blobs", "masses", "stage2", "shape", "postprocess", "write")
TIMINGS_LINE = re.compile(r"timings ((?:\w+=[\d.]+ ?)+) s$", re.MULTILINE)


def run_process(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: wall seconds, peak RSS (bytes, from ``wait4``), exit status, stdout, stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": proc.returncode,
                "stdout": out.read(), "stderr": err.read()}


def monai_windows(path: Path) -> dict:
    """Number of 512×512×192 windows MONAI's sliding window (overlap 0.25) takes over ``path`` at its spacing."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = [round(n * s / t) for n, s, t in zip(reader.GetSize(), reader.GetSpacing(), MONAI_SPACING_XYZ)]
    counts = []
    for n, roi in zip(size, MONAI_WINDOW_XYZ):
        # monai.inferers.utils._get_scan_interval and monai.data.utils.dense_patch_slices (image padded to roi).
        n = max(n, roi)
        interval = roi if n == roi else max(1, int(roi * (1 - MONAI_OVERLAP)))
        counts.append(next(d for d in range(math.ceil(n / interval)) if d * interval + roi >= n) + 1)
    return {"resampled_size_xyz": size, "windows_xyz": counts, "windows": math.prod(counts)}


def cli_command() -> list[str]:
    """How to start ``nodule-detection`` with this Python: its console script, else ``-m NoduleDetectionLib.cli``."""
    script = Path(sys.executable).with_name("nodule-detection")
    return [str(script)] if script.exists() else [sys.executable, "-m", "NoduleDetectionLib.cli"]


def time_ours(scan: Path, model: Path | None, device: str, repeat: int) -> dict:
    """The whole detect process on ``scan`` (``repeat`` times; the median run is reported, all are kept)."""
    runs = []
    for _ in range(repeat):
        outdir = Path(tempfile.mkdtemp(prefix="nd-bench-"))
        try:
            cmd = cli_command() + ["detect", str(scan), "-o", str(outdir), "--device", device]
            if model is not None:
                cmd += ["--model", str(model)]
            run = run_process(cmd)
            if run["returncode"] != 0:
                raise SystemExit(f"detect failed on {scan}:\n{run['stderr'][-2000:]}")
            summary = json.loads(next(p for p in outdir.glob("*.json") if not p.name.endswith(".mrk.json")).read_text())
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        match = TIMINGS_LINE.search(run["stderr"])
        stages = {k: float(v) for k, v in (kv.split("=") for kv in match.group(1).split())} if match else {}
        stages["startup"] = run["wall_s"] - sum(stages.values())
        runs.append({"wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"], "stages_s": stages,
                     "device": summary["model"].get("device"), "findings": len(summary["nodules"])})
    runs.sort(key=lambda r: r["wall_s"])
    return {**runs[len(runs) // 2], "runs": runs}


def time_floor(scan: Path) -> dict:
    """A process that reads ``scan`` with SimpleITK and nothing else: whole-process and read-only seconds."""
    code = ("import sys, time, SimpleITK as sitk\nt = time.perf_counter()\nsitk.GetArrayViewFromImage("
            "sitk.ReadImage(sys.argv[1]))\nprint(time.perf_counter() - t)")
    run = run_process([sys.executable, "-c", code, str(scan)])
    if run["returncode"] != 0:
        raise SystemExit(f"SimpleITK could not read {scan}:\n{run['stderr'][-2000:]}")
    return {"wall_s": run["wall_s"], "read_s": float(run["stdout"].strip()), "peak_rss_bytes": run["peak_rss_bytes"]}


def time_monai(windows: int) -> dict:
    """Run ``monai_window.py`` for ``windows`` whole windows in MONAI's own environment."""
    if not MONAI_PYTHON.exists():
        raise SystemExit(f"{MONAI_PYTHON} not found: run benchmarks/setup_monai_env.sh first (or --monai-windows 0)")
    env = {**os.environ, "PYTHONPATH": str(HERE / "monai_stub")}
    run = run_process([str(MONAI_PYTHON), str(HERE / "monai_window.py"), "--windows", str(windows)], env=env)
    if run["returncode"] != 0:
        raise SystemExit(f"MONAI timing failed:\n{run['stderr'][-3000:]}")
    result = json.loads(run["stdout"].strip().splitlines()[-1])
    result["process_peak_rss_bytes"] = run["peak_rss_bytes"]
    result["process_wall_s"] = run["wall_s"]
    return result


def check_accuracy(model: Path | None, device: str, reference: Path) -> dict:
    """CPM of ``evaluate-detector`` on the real validation scans now, against the model card's figure."""
    print("accuracy: evaluate-detector on the validation scans ...", file=sys.stderr, flush=True)
    outdir = Path(tempfile.mkdtemp(prefix="nd-bench-eval-"))
    try:
        cmd = cli_command() + ["evaluate-detector", str(VALIDATION_DATA), "--scans", str(VALIDATION_LIST),
                               "-o", str(outdir / "e"), "--device", device]
        cmd += ["--model", str(model)] if model is not None else []
        run = run_process(cmd)
        if run["returncode"] != 0:
            raise SystemExit(f"evaluate-detector failed:\n{run['stderr'][-2000:]}")
        cpm = float(json.loads((outdir / "e" / "froc.json").read_text())["cpm"])
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    card = float(json.loads(reference.read_text())["cpm"])
    return {"cpm": cpm, "card_cpm": card, "card_file": str(reference), "tolerance": ACCURACY_TOLERANCE,
            "within_tolerance": abs(cpm - card) <= ACCURACY_TOLERANCE, "wall_s": run["wall_s"]}


def machine() -> dict:
    """CPU model, usable cores, memory, versions, load average now."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    import torch

    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "memory_bytes": mem,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_average": list(os.getloadavg())}


def gb(n: float) -> float:
    return n / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="*", type=Path, default=DEFAULT_SCANS,
                        help="scans (default: LIDC-IDRI-0002 and -0003 of ../shared/data)")
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of detect per scan; the median is reported")
    parser.add_argument("--monai-windows", type=int, default=1,
                        help="whole MONAI windows to time (each takes minutes on a CPU); 0: skip MONAI")
    parser.add_argument("--monai-result", type=Path, default=None, metavar="JSON",
                        help="use this earlier output of monai_window.py instead of timing MONAI in this run "
                             "(recorded as such in the JSON; the targets then do not come from one run)")
    parser.add_argument("--accuracy-reference", type=Path, default=REPO / "Resources" / "Models" / "evaluation_real"
                        / "froc.json", metavar="FROC_JSON",
                        help="the model card's evaluation (froc.json) that the accuracy check compares with")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy check")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "results" / "benchmark.json")
    args = parser.parse_args()

    info = machine()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for scan in args.scans:
        print(f"{scan.name}: timing detect ...", file=sys.stderr, flush=True)
        ours = time_ours(scan, args.model, args.device, args.repeat)
        rows.append({"scan": scan.name.split(".")[0], "path": str(scan), "ours": ours, "floor": time_floor(scan),
                     "monai_windows": monai_windows(scan)})
    monai = None
    if args.monai_result:
        monai = {**json.loads(args.monai_result.read_text()), "measured_in_this_run": False,
                 "measured_file": str(args.monai_result)}
    elif args.monai_windows > 0:
        print(f"MONAI: timing {args.monai_windows} window(s) of 512x512x192 (minutes each) ...", file=sys.stderr,
              flush=True)
        monai = {**time_monai(args.monai_windows), "measured_in_this_run": True}
    if monai:
        per_window = sum(monai["seconds_per_window"]) / len(monai["seconds_per_window"])
    for row in rows:
        ours = row["ours"]
        row["ours_over_floor"] = ours["wall_s"] / row["floor"]["wall_s"]
        if monai:
            row["monai_s"] = per_window * row["monai_windows"]["windows"]
            row["monai_extrapolated_from_windows"] = len(monai["seconds_per_window"])
            row["monai_over_ours"] = row["monai_s"] / ours["wall_s"]
    accuracy = None if args.no_accuracy else check_accuracy(args.model, args.device, args.accuracy_reference)
    target_row = next((r for r in rows if r["scan"] == TARGETS["scan"]), None)
    met = None
    if target_row:
        met = {"wall": target_row["ours"]["wall_s"] <= TARGETS["max_wall_s"],
               "peak_memory": gb(target_row["ours"]["peak_rss_bytes"]) <= TARGETS["max_peak_rss_gb"],
               "monai_speedup": (target_row.get("monai_over_ours", 0) >= TARGETS["min_monai_over_ours"]) if monai
               else None,
               "accuracy": accuracy["within_tolerance"] if accuracy else None}
    report = {
        "started_utc": started, "machine": info, "load_average_end": list(os.getloadavg()),
        "command": "nodule-detection detect SCAN -o OUTDIR" + (f" --model {args.model}" if args.model else "")
        + f" --device {args.device}",
        "model": str(args.model) if args.model else "shipped", "repeat": args.repeat,
        "monai": monai and {**monai, "spacing_xyz_mm": MONAI_SPACING_XYZ, "overlap": MONAI_OVERLAP,
                            "note": "network forward only, random weights; scan totals are extrapolated: "
                                    "mean seconds per window x windows per scan"},
        "scans": rows, "accuracy": accuracy, "targets": TARGETS, "targets_met": met,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    print(f"\nwritten: {args.output}")
    return 0


def table(report: dict) -> str:
    """A Markdown table of the report (the README's performance table)."""
    head = ("| scan | read | preprocess | stage 1 | blob filter | masses | stage 2 | shape | outline | write | startup "
            "| **whole detect** | peak RSS | SimpleITK read (process) | ours / floor | MONAI network (extrapolated) "
            "| MONAI / ours |")
    lines = [head, "|" + "---|" * 17]
    for r in report["scans"]:
        o, s = r["ours"], r["ours"]["stages_s"]
        monai = (f"{r['monai_s'] / 60:.1f} min ({r['monai_windows']['windows']} windows, from "
                 f"{r['monai_extrapolated_from_windows']} timed)") if "monai_s" in r else "not run"
        lines.append(
            f"| {r['scan']} | " + " | ".join(f"{s[k]:.1f} s" if k in s else "–" for k in (*STAGES, "startup"))
            + f" | **{o['wall_s']:.1f} s** | {gb(o['peak_rss_bytes']):.2f} GB | {r['floor']['wall_s']:.2f} s "
            f"({r['floor']['read_s']:.2f} s read) | {r['ours_over_floor']:.1f}× | {monai} | "
            + (f"{r['monai_over_ours']:.0f}×" if "monai_over_ours" in r else "–") + " |"
        )
    m = report["machine"]
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores_usable']} cores, {gb(m['memory_bytes'] or 0):.0f} GB, "
                 f"torch {m['torch']}; load average at start {m['load_average'][0]:.2f}, at end "
                 f"{report['load_average_end'][0]:.2f}. Targets met: {report['targets_met']}")
    if report.get("accuracy"):
        a = report["accuracy"]
        lines.append(f"Accuracy: validation CPM {a['cpm']:.3f} now, {a['card_cpm']:.3f} in the model card "
                     f"(tolerance {a['tolerance']}): {'unchanged' if a['within_tolerance'] else 'CHANGED'}")
    if report["monai"]:
        mo = report["monai"]
        lines.append(f"MONAI: {len(mo['seconds_per_window'])} window(s) timed, "
                     f"{sum(mo['seconds_per_window']) / len(mo['seconds_per_window']) / 60:.1f} min each, peak "
                     f"{gb(mo['peak_rss_bytes']):.1f} GB; "
                     + ("measured in this run" if mo["measured_in_this_run"] else
                        f"NOT measured in this run (from {mo['measured_file']})"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
