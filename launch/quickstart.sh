#!/usr/bin/env bash
# The demo, end to end on a fresh machine: install, build the real demo shards, train, evaluate,
# print the results table. Re-running skips what is already installed, built or trained.
#   bash launch/quickstart.sh [key=value ...]     overrides go to clip-train, e.g. train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${CLIP_TRAIN_CACHE:-$HOME/.cache/clip_train}
RUN_DIR=${RUN_DIR:-runs/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}

bash launch/install.sh demo

SHARDS=$CACHE/demo_shards
EMOJI_TGZ=$CACHE/lobehub-fluent-emoji-3d-1.1.0.tgz  # the version launch/install.sh pins
clip-data demo --out "$SHARDS" --emoji-package "$EMOJI_TGZ"

clip-train configs/demo.yaml run_dir="$RUN_DIR" \
  data.train_shards="$SHARDS/train-*.tar" data.val_shards="$SHARDS/val-*.tar" "$@"
echo "run directory: $RUN_DIR  (metrics.jsonl, results.json, eval/, model/, checkpoints/)"
