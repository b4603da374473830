#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.sh installs on a GPU machine without network, into
# benchmarks/wheels/ (git-ignored), for that machine's Python: run this where pip can reach an index.
#
#   bash benchmarks/gpu_wheels.sh            # for CPython 3.12 on x86-64 Linux
#   bash benchmarks/gpu_wheels.sh 3.11       # another Python version
#
# clip/ holds timm and accelerate at the versions this checkout runs (launch/install.sh), and what
# clip_train and OpenCLIP need beyond the GPU machine's own torch, torchvision and transformers (the
# newest transformers needs a huggingface_hub such images lack); openclip/ holds the webdataset
# OpenCLIP's trainer needs. Versions are this environment's, pinned when not installed. A machine that
# lacks more (pandas for open_clip_train.data, say) needs those added to the lists below.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PYTHON:-python3}
version() {  # the installed version of $1, else $2
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$2"
}
CLIP=(
  "timm==$(version timm 1.0.31)"
  "accelerate==$(version accelerate 1.16.0)"
  "webdataset==$(version webdataset 1.0.2)"
  "open-clip-torch==$(version open-clip-torch 3.3.0)"
  "ftfy==$(version ftfy 6.3.1)"
  "wcwidth==$(version wcwidth 0.2.13)"
  "braceexpand==$(version braceexpand 0.1.7)"
  "inf-cl==1.2.1"
)
OPENCLIP=("webdataset==0.2.86")  # the newest open-clip-torch[training] accepts
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
download() {  # folder, requirements...
  local folder=benchmarks/wheels/$1
  shift
  rm -rf "$folder"
  mkdir -p "$folder"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform any -d "$folder" "$@"
}
download clip "${CLIP[@]}"
download openclip "${OPENCLIP[@]}"
ls -l benchmarks/wheels/*/
