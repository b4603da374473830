#!/usr/bin/env bash
# The GPU benchmark in one command: training, the loss and zero-shot evaluation, side by side with
# OpenCLIP, on one NVIDIA GPU in under 9 minutes; writes benchmarks/results/gpu.json, prints a table.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine (no network needed)
#   bash benchmarks/gpu.sh --dry           # every stage at tiny size on the CPU (tests/test_benchmarks.py)
#   bash benchmarks/gpu.sh --budget 300 --stages loss,eval    # options go to benchmarks/gpu.py
#
# What it installs, and from where: the GPU machine's own torch, torchvision, timm, transformers and
# accelerate are used as they are (their versions go into gpu.json). What such a machine usually
# lacks comes as wheels carried in benchmarks/wheels/ (benchmarks/gpu_wheels.sh downloads them, for
# the GPU machine's Python, on a machine with pip access; see benchmarks/README-gpu.md):
#   clip/      webdataset 1.x, open-clip-torch, ftfy, wcwidth, braceexpand, inf-cl
#   openclip/  webdataset 0.2.86, which OpenCLIP's trainer needs (its data.py uses old internals)
# installed with `pip --no-index --no-deps --target` into two folders of $GPU_WORK: clip_train's
# children see the first, OpenCLIP's trainer sees the second in front of it. Without
# benchmarks/wheels/ (--dry on a development machine) the first is not needed (launch/install.sh
# installed it all) and the second is installed from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GPU_WORK:-/tmp/clip_train_gpu}
WHEELS=benchmarks/wheels
SITE=$WORK-site/clip
OPENCLIP_SITE=$WORK-site/openclip
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --target)

rm -rf "$WORK-site"
if [ -d "$WHEELS/clip" ]; then
  "${PIP[@]}" "$SITE" --no-index "$WHEELS"/clip/*.whl
  "${PIP[@]}" "$OPENCLIP_SITE" --no-index "$WHEELS"/openclip/*.whl
else
  "${PIP[@]}" "$OPENCLIP_SITE" webdataset==0.2.86
fi
# open_clip_train.data imports pandas: the GPU machines' image has it, a development machine may not
"$PY" -c "import pandas" 2>/dev/null || "${PIP[@]}" "$OPENCLIP_SITE" pandas tzdata
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"
exec "$PY" benchmarks/gpu.py --work "$WORK" --openclip-pythonpath "$OPENCLIP_SITE:$PYTHONPATH" "$@"
