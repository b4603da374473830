#!/usr/bin/env bash
# The OpenCLIP peer of benchmarks/data.py in a virtual environment of its own; quick when it is
# already set up (prints the venv's python either way, on the last line).
#
#   bash benchmarks/openclip_venv.sh        # -> ~/.cache/clip_train/venv-openclip/bin/python
#
# Why a venv: OpenCLIP's trainer (open_clip_train, shipped in the open-clip-torch distribution)
# needs the `training` extra, which pins webdataset <= 0.2.86 because open_clip_train/data.py uses
# webdataset internals that newer releases moved; clip_train runs on webdataset 1.x. The venv sees
# the main environment's packages (--system-site-packages: torch, torchvision, timm, transformers,
# open_clip itself) and holds only what differs, its own webdataset 0.2.86 shadowing the system's.
# torch stays constrained by launch/constraints.txt, so nothing multi-GB is ever downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${CLIP_TRAIN_CACHE:-$HOME/.cache/clip_train}
VENV=${OPENCLIP_VENV:-$CACHE/venv-openclip}
WDS_VERSION=0.2.86  # the newest webdataset open-clip-torch[training] accepts

works() {
  # from / so that nothing in this checkout is imported by accident
  [ -x "$VENV/bin/python" ] && (cd / && "$VENV/bin/python" - "$WDS_VERSION" <<'PYCHECK' 2>/dev/null)
import importlib.metadata, sys
import open_clip, open_clip_train.data  # the import that fails on webdataset 1.x or without pandas
sys.exit(0 if importlib.metadata.version("webdataset") == sys.argv[1] else 1)
PYCHECK
}

if ! works; then
  echo "== setting up the OpenCLIP venv in $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv --system-site-packages "$VENV"
  # open-clip-torch itself is normally already installed in the main environment (pip sees it
  # through the system site-packages and keeps it); the extra brings pandas, fsspec and the old
  # webdataset into the venv. pip then warns that clip-train (also seen through the system
  # site-packages) wants webdataset 1.x: expected, as nothing of clip_train's pipeline runs here.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c launch/constraints.txt \
    "open-clip-torch[training]" "webdataset==$WDS_VERSION" >&2
  if ! works; then
    echo "openclip_venv.sh: error: $VENV/bin/python still cannot import open_clip_train.data with" \
      "webdataset $WDS_VERSION" >&2
    exit 1
  fi
fi
echo "$VENV/bin/python"
