"""Batch nodule detection with 3D Slicer, without its main window.

Usage (one or more CT files, then the output folder)::

    Slicer --no-main-window --python-script detect_batch.py -- scan1.nrrd [scan2.nii.gz ...] outdir \
        [--threshold 0.5] [--device auto|cpu|cuda] [--model my_model.safetensors] [--overwrite]

For each scan it writes ``<name>.mrk.json`` (nodule centres), ``<name>.seg.nrrd`` (one segment per nodule) and
``<name>.tsv`` (the results table) into ``outdir`` and prints one line per scan; exit status 0 on success.
Existing outputs are kept unless ``--overwrite`` is given. The scene logic is the same as the module panel's
(``NoduleDetection.NoduleDetectionLogic.process``). Python packages missing at first use are installed without
asking (torch through the PyTorch extension).
"""

import argparse
import os
import sys
import traceback

import slicer


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="detect_batch.py", description="Detect lung nodules in CT files.")
    parser.add_argument("inputs", nargs="+", help="CT files readable by Slicer (.nrrd, .nii.gz, .mha, ...)")
    parser.add_argument("outdir", help="output folder (created if missing)")
    parser.add_argument("--threshold", type=float, default=None, help="probability threshold (default: model's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model", default="", help="model file (default: the shipped model)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args([a for a in argv if a != "--"])


def main(argv):
    args = parse_args(argv)
    import NoduleDetection

    logic = NoduleDetection.NoduleDetectionLogic()
    logic.setupPythonRequirements(askConfirmation=False)
    os.makedirs(args.outdir, exist_ok=True)
    for path in args.inputs:
        slicer.mrmlScene.Clear()
        volume = slicer.util.loadVolume(path)
        name = volume.GetName()
        targets = [os.path.join(args.outdir, f"{name}{suffix}") for suffix in (".mrk.json", ".seg.nrrd", ".tsv")]
        existing = [p for p in targets if os.path.exists(p)]
        if existing and not args.overwrite:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
        outputs = logic.process(volume, model=args.model, threshold=args.threshold, device=args.device)
        for node, target in zip(outputs, targets):
            if not slicer.util.saveNode(node, target):
                raise OSError(f"could not write {target}")
        print(f"{name}: {outputs.markups.GetNumberOfControlPoints()} finding(s) -> {args.outdir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as exc:
        traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
