"""The ``nodule-detection`` command line: thin entry points over the class API.

Each sub-command is registered by an ``_add_<name>`` function that builds its parser and sets
``func``, the handler called with the parsed arguments. User errors (``NoduleDetectionError``) print one
line to stderr and exit with status 2; nothing prints a traceback for a user error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from . import __version__
from .errors import NoduleDetectionError

log = logging.getLogger("nodule_detection")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, shared by the commands that run the detector."""
    p.add_argument("--model", default=None, metavar="FILE", help="model file (default: the shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the networks run (default: auto = cuda if available)")


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    """``DATASET``, ``-o OUTDIR``, the model options and ``--scans``, shared by the commands that run the
    detector over an annotated data set."""
    p.add_argument("dataset", metavar="DATASET", help="data set folder with nodule annotations")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    _add_model_options(p)
    p.add_argument("--scans", default=None, metavar="LIST",
                   help="only these scans: seriesuids or ct/ entry names, one per line")


def _add_blob_candidates_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blob-candidates", type=int, default=None, metavar="N",
                   help="blob-filter proposals per scan to add to stage 1's candidates (default: the model's)")


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="find lung nodules in a chest CT",
        description=(
            "Find lung nodules in a chest CT (DICOM folder, .nrrd, .nii/.nii.gz, .mhd/.mha) and write "
            "<name>.mrk.json (Slicer markups), <name>.seg.nrrd (Slicer segmentation), <name>.csv "
            "(LUNA16 style, world LPS mm), <name>.json (summary) and <name>_nodules.png (a picture per "
            "nodule) into OUTDIR. Not a medical device."
        ),
    )
    p.add_argument("input", nargs="+",
                   help="CT: DICOM folder or image file. Several inputs, a .txt list of scans (one path a line) "
                        "or a cohort folder (one that directly holds image files, or only subfolders: one "
                        "scan each) make a cohort: one model load, each scan's outputs plus status/<name>.json, "
                        "cohort_candidates.csv and cohort_status.csv in OUTDIR; rerunning resumes (finished "
                        "scans are skipped); under torchrun the scans are shared out among the ranks")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="report nodules with probability >= P (default: the model's own threshold)")
    _add_model_options(p)
    p.add_argument("--series", default=None, metavar="UID",
                   help="SeriesInstanceUID to use when a DICOM folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from .cohort import detect_cohort, is_cohort
    from .pipeline import detect_to_files

    if is_cohort(args.input):
        if args.series:
            raise NoduleDetectionError("--series applies to one DICOM folder, not to a cohort")
        cohort = detect_cohort(args.input, args.output, model=args.model, threshold=args.threshold,
                               device=args.device, overwrite=args.overwrite, show_progress=True)
        for path in cohort.paths.values():
            print(path)
        for status in cohort.failed:
            print(f"{status.scan}: {status.status}: {status.reason}", file=sys.stderr)
        return 1 if cohort.failed else 0
    paths = detect_to_files(
        args.input[0], args.output, model=args.model, threshold=args.threshold, device=args.device,
        series_uid=args.series, overwrite=args.overwrite, show_progress=True,
    )
    for path in paths.values():
        print(path)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="LUNA16 FROC evaluation of a candidates file",
        description=(
            "Score nodule candidates (LUNA16 result CSV: seriesuid,coordX,coordY,coordZ,probability, world "
            "LPS mm) against annotations with the protocol of the official LUNA16 script: sensitivity at "
            "1/8..8 false positives per scan, CPM, 95% bootstrap intervals. Writes froc.json, froc.png, "
            "froc_curve.csv and missed_nodules.csv into OUTDIR."
        ),
    )
    p.add_argument("--annotations", required=True, metavar="CSV",
                   help="LUNA16 annotations.csv, or a table with a status column (nodule/excluded/mass)")
    p.add_argument("--excluded", default=None, metavar="CSV", help="LUNA16 annotations_excluded.csv")
    p.add_argument("--candidates", required=True, metavar="CSV", help="candidates (LUNA16 result file)")
    p.add_argument("--scans", default=None, metavar="LIST",
                   help="seriesuids that count, one per line (default: every scan of the annotation files)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    _add_bootstrap_options(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_files

    result, paths = evaluate_files(
        args.annotations, args.candidates, args.output, excluded=args.excluded, scans=args.scans,
        n_bootstrap=args.bootstrap, seed=args.seed, overwrite=args.overwrite,
    )
    print(f"CPM {result.cpm:.4f}")
    for path in paths.values():
        print(path)
    return 0


def _add_evaluate_detector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-detector",
        help="run the detector over a data set and score it (LUNA16 FROC)",
        description=(
            "Run the detector over every scan of DATASET (a LUNA16 folder: subset*/*.mhd or *.mhd with "
            "annotations.csv and annotations_excluded.csv; or a folder laid out like ../shared/data: ct/ "
            "entries and annotations.csv with scan and status columns) and score the candidates as "
            "'evaluate' does. Writes candidates.csv, report.json, report.md and the FROC outputs into OUTDIR."
        ),
    )
    _add_dataset_options(p)
    p.add_argument("--threshold", type=float, default=0.0, metavar="P",
                   help="keep candidates with probability >= P (default 0: all, so the FROC covers the curve)")
    _add_bootstrap_options(p)
    p.set_defaults(func=_run_evaluate_detector)


def _run_evaluate_detector(args: argparse.Namespace) -> int:
    from .datasets import read_scan_list
    from .evaluate import evaluate_detector

    paths = evaluate_detector(
        args.dataset, args.output, model=args.model, threshold=args.threshold, device=args.device,
        scans=read_scan_list(args.scans) if args.scans else None, n_bootstrap=args.bootstrap, seed=args.seed,
        overwrite=args.overwrite,
    )
    for path in paths.values():
        print(path)
    return 0


def _add_make_lesion_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-lesion-dataset",
        help="insert synthetic lesions into copies of host scans (a validation set)",
        description=(
            "Insert LESIONS synthetic lesions (LUNA16-like mix: 3-30 mm, mostly under 10 mm; solid, part-solid, "
            "ground-glass; free, juxtavascular, juxtapleural) into copies of the host scans of SOURCE (LUNA16 "
            "or shared layout), at most PER_COPY per copy, and write a shared-layout data set into OUTDIR: "
            "ct/<host>-ins<seed>-<copy>.nrrd, annotations.csv (inserted lesions as nodule rows with texture, "
            "shape, position; the hosts' findings carried over), lesions.json and README.md. Deterministic for "
            "a seed; training configs use insertion seeds below 1000, so validation sets use 1000 and up."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="data set folder holding the host scans")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    p.add_argument("--scans", nargs="+", default=None, metavar="SCAN",
                   help="host scans: seriesuids or ct/ entry names (default: every scan of SOURCE)")
    p.add_argument("--lesions", type=int, default=300, help="lesions to insert in all (default 300)")
    p.add_argument("--per-copy", type=int, default=25, help="at most this many lesions per copy (default 25)")
    p.add_argument("--seed", type=int, default=1000, help="seed of lesions and placements (default 1000)")
    p.add_argument("--keep-real-nodules", action="store_true",
                   help="keep the hosts' real nodules as nodule rows (default: they become excluded rows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUTDIR")
    p.set_defaults(func=_run_make_lesion_dataset)


def _run_make_lesion_dataset(args: argparse.Namespace) -> int:
    from .lesion_dataset import make_lesion_dataset

    paths = make_lesion_dataset(
        args.source, args.output, scans=args.scans, lesions=args.lesions, per_copy=args.per_copy, seed=args.seed,
        keep_real_nodules=args.keep_real_nodules, overwrite=args.overwrite,
    )
    print(paths["readme"].read_text(), end="")
    return 0


def _add_bootstrap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="scan-level bootstrap samples for the 95%% intervals (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune both stages from a JSON config",
        description=(
            "Train the U-net and the 3D CNN as CONFIG.json says (data sources, lesion insertion, steps, "
            "time budget) and write model.safetensors, model_card.md, train_log.jsonl, training_curves.png "
            "and checkpoint.pt into OUTDIR. Runs on several processes or GPUs when started under torchrun."
        ),
    )
    p.add_argument("config", help="training config (JSON); see Resources/Training/*.json")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="run folder (created)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTDIR from its last checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train_run import run_training

    print(run_training(args.config, args.output, resume=args.resume, device=args.device, show_progress=True))
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose a model's candidate threshold, stage weight and default threshold on annotated scans",
        description=(
            "Run the model over every scan of DATASET (LUNA16 or shared layout, as for evaluate-detector), "
            "choose the stage 1 candidate threshold, the stage 1 score (highest probability, or highest logit "
            "through a temperature of 1, 2, 4, 8 or 16), the stage 2 weight and the shape weight with the best CPM, "
            "with the default threshold (the lowest with at most FP false positives per scan), and write "
            "OUTDIR/model.safetensors (the same networks with these values), calibration.json and calibration.md. "
            "The networks are not changed; report the calibrated model's accuracy on other scans than DATASET's."
        ),
    )
    _add_dataset_options(p)
    p.add_argument("--candidate-thresholds", type=float, nargs="+", default=None, metavar="T",
                   help="stage 1 candidate thresholds to try (default 0.05 0.1 0.2 0.3)")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="stage 2 weights to try (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--shape-weights", type=float, nargs="+", default=None, metavar="A",
                   help="weights of a candidate's shape (Hessian dot filter) to try (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--feature-weights", type=float, nargs="+", default=None, metavar="F",
                   help="weights of the candidate-feature model to try (default 0 0.25 0.5 0.75 1 for a model "
                   "with one, fit-features; else 0)")
    _add_blob_candidates_option(p)
    p.add_argument("--stage1-spacing", type=float, default=None, metavar="MM",
                   help="working grid spacing (mm) for stage 1 (default: the model's; finer magnifies small nodules)")
    p.add_argument("--stage1-bf16", action="store_true", default=None,
                   help="run stage 1 in bfloat16 on CPUs that have it natively (default: the model's setting)")
    p.add_argument("--bn-adapt", type=float, default=None, metavar="W",
                   help="share (0-1) of each scan's own batch-norm statistics in stage 1 (default: the model's)")
    p.add_argument("--spare-large", action="store_true", default=None,
                   help="findings at least 15.6 mm wide keep their stage 1 score whatever stage 2 says "
                   "(default: the model's setting)")
    p.add_argument("--fp-per-scan", type=float, default=0.5, metavar="FP",
                   help="false positives per scan allowed at the default threshold (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .datasets import read_scan_list
    from .pipeline import progress_bar

    with progress_bar("calibrating") as progress:
        paths = calibrate(
            args.dataset, args.output, model=args.model, scans=read_scan_list(args.scans) if args.scans else None,
            candidate_thresholds=args.candidate_thresholds, weights=args.weights, dot_weights=args.shape_weights,
            feature_weights=args.feature_weights, blob_candidates=args.blob_candidates,
            stage1_spacing_mm=args.stage1_spacing, stage1_bf16=args.stage1_bf16, bn_adapt=args.bn_adapt,
            spare_large=args.spare_large, fp_per_scan=args.fp_per_scan,
            device=args.device, overwrite=args.overwrite, progress=progress,
        )
    for path in paths.values():
        print(path)
    return 0


def _add_fit_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-features",
        help="fit a model's candidate-feature model (a logistic model over measured features) on training scans",
        description=(
            "Run the model over every scan of DATASET (LUNA16 or shared layout; training scans, e.g. a "
            "make-lesion-dataset folder of training hosts: never validation or test scans), measure each "
            "candidate (stage 1 and 2 outputs, size, intensity, Hessian shape, dense tissue and lung around it), "
            "label it by the evaluator's hit rule and fit a logistic model to them. Writes OUTDIR/model.safetensors "
            "(the model with it; its weight stays 0 until calibrate chooses one), features.csv and features.md."
        ),
    )
    _add_dataset_options(p)
    _add_blob_candidates_option(p)
    p.add_argument("--l2", type=float, default=1e-3, help="ridge penalty on the coefficients (default 0.001)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_run_fit_features)


def _run_fit_features(args: argparse.Namespace) -> int:
    from .calibrate import fit_features
    from .datasets import read_scan_list
    from .pipeline import progress_bar

    with progress_bar("measuring") as progress:
        paths = fit_features(args.dataset, args.output, model=args.model,
                             scans=read_scan_list(args.scans) if args.scans else None,
                             blob_candidates=args.blob_candidates, l2=args.l2, device=args.device,
                             overwrite=args.overwrite, progress=progress)
    for path in paths.values():
        print(path)
    return 0


COMMANDS = [_add_detect, _add_evaluate, _add_evaluate_detector, _add_make_lesion_dataset, _add_train, _add_calibrate,
            _add_fit_features]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="nodule-detection",
        description="Lung nodule detection in chest CT (U-net candidates + 3D CNN false-positive "
        "reduction). Research software: not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / SIGINT stops a run cleanly (exit 130, checkpoint kept) even when the parent started this
        # process with SIGINT ignored, as shells do for background jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args) or 0)
    except NoduleDetectionError as exc:
        return _user_error(str(exc))
    except OSError as exc:  # from a user's path: folder not writable, a file where a folder should be, disk full
        return _user_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except MemoryError:
        return _user_error(OUT_OF_MEMORY)
    except KeyboardInterrupt:
        print("nodule-detection: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's GPU out-of-memory error (torch not imported here)
            return _user_error(OUT_OF_MEMORY)
        traceback.print_exc()
        print(f"nodule-detection: internal error, please report it with the traceback above: {exc!r}", file=sys.stderr)
        return 1


#: What ``main`` says when memory runs out (``MemoryError``, or PyTorch's GPU out-of-memory error).
OUT_OF_MEMORY = ("out of memory: use a smaller input (crop it to the chest), close other programs, or choose the "
                 "other --device (cpu or cuda)")


def _user_error(message: str) -> int:
    """Print a user error as one line on stderr (newlines folded) and return exit status 2."""
    print(f"nodule-detection: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
