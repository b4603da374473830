#!/usr/bin/env bash
# Installs what the tests need (skipped when present) and runs the whole suite.
#   bash launch/test.sh                 everything
#   bash launch/test.sh -m "not slow"   pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
python3 -m ruff check .
# the slowest tests, to keep the suite under its 15-minute budget
python3 -m pytest -q --durations=20 "$@"
