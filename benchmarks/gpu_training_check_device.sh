#!/bin/bash
# The GPU check's commands on the lent GPU machine, from the repository root (benchmarks/gpu_training_check.py;
# figures in Resources/Models/experiments/gpu_check/README.md). DATA is the folder `prepare` wrote here, SITK an
# xz tar of the SimpleITK package (the machine has no SimpleITK; a wheel, 53 MB, does not fit the 64 MiB transfer):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d /tmp/w SimpleITK==2.5.3
#   (cd /tmp/w && unzip -q simpleitk-*.whl && tar cf - SimpleITK | xz -9 > SITK)                      # 28 MB
# Both travel in `carry`; Resources/Models/experiments (20 MB) was moved out of the working tree for the call.
# Writes env.txt, train_output.txt, summary.json and run.tgz (the run's log, card, curves, calibration and the
# shipped model's detect outputs, twice) under $OUT.
DATA=${1:-.gpucheck}
SITK=${2:-.sitk/sitk.tar.xz}
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xJf "$SITK" -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/NoduleDetection
nd() { python3 -m NoduleDetectionLib.cli "$@"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch, SimpleITK, numpy; print('torch', torch.__version__, SimpleITK.Version(), 'numpy', numpy.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
start=$(date +%s)
nd train "$DATA/config.json" -o /tmp/run --device cuda > "$OUT/train_output.txt" 2>&1
echo "train rc $? in $(( $(date +%s) - start )) s"
for i in 1 2; do
    start=$(date +%s)
    nd detect "$DATA"/ct/*.nrrd -o /tmp/det$i --device cuda > /tmp/det$i.txt 2>&1
    echo "detect $i rc $? in $(( $(date +%s) - start )) s"
done
diff -r -q /tmp/det1 /tmp/det2    # only the JSON reports' timings may differ
python3 benchmarks/gpu_training_check.py summary /tmp/run | tee "$OUT/summary.json"
cd /tmp && tar czf "$OUT/run.tgz" run/train_log.jsonl run/model_card.md run/training_curves.png run/config.json \
    run/calibration/calibration.md run/calibration/calibration.json det1 det2 det1.txt
