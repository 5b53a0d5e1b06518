#!/usr/bin/env bash
# Create benchmarks/.venv-monai: the environment in which MONAI's lung_nodule_ct_detection network is timed.
#
# A separate environment so that MONAI never enters the project's: torch (the same version as the project's,
# CPU build), monai and numpy. No torchvision: the wheel that matches torch 2.13.0 fails on the CPU build
# here, and MONAI's RetinaNet needs only two small helpers from it, provided by benchmarks/monai_stub/
# (put on PYTHONPATH by benchmark.py for the MONAI process only).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
torch_version="$("$here/../.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
"$python" -m venv "$here/.venv-monai"
"$here/.venv-monai/bin/pip" install --quiet "torch==${torch_version}" monai numpy psutil
"$here/.venv-monai/bin/python" -c 'import monai, torch; print("monai", monai.__version__, "torch", torch.__version__)'
