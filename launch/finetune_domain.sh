#!/usr/bin/env bash
# Fine-tune a trained model on a domain's image-text pairs, evaluate before and after on the domain's
# held-out split and on reference tasks, and print the table (WiSE-FT: alpha 0 = before, 1 = after).
#
#   bash launch/finetune_domain.sh                    # the demo: the Tux Paint stamps are the domain
#   DOMAIN_MANIFEST=pairs.csv IMAGE_COL=file CAPTION_COL=text [CATEGORY_COL=label] [SEP=auto] \
#     bash launch/finetune_domain.sh [key=value ...]  # your CSV/TSV/JSONL of image paths and captions
#   DOMAIN_FOLDER=photos/ bash launch/finetune_domain.sh   # images with same-named .txt captions
#
# BASE: the model to start from (a run directory, checkpoint or model folder; default runs/demo,
# which launch/quickstart.sh trains first when it is missing). RUN_DIR: where the fine-tuned run
# goes (default runs/finetune-domain for the demo, runs/finetune-<manifest or folder name> otherwise, so
# that another domain does not land in, and resume, the demo's run). With a category column (the demo has one) the domain's
# held-out images are also classified zero-shot by category. Overrides go to clip-train.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${CLIP_TRAIN_CACHE:-$HOME/.cache/clip_train}
BASE=${BASE:-runs/demo}
# the domain's name: its shard folder's, its zero-shot metric's (<folder>/acc1) and its run's
name=demo
[ -n "${DOMAIN_MANIFEST:-}" ] && name=$(basename "${DOMAIN_MANIFEST%.*}")
[ -n "${DOMAIN_FOLDER:-}" ] && name=$(basename "$DOMAIN_FOLDER")
if [ "$name" = demo ]; then RUN_DIR=${RUN_DIR:-runs/finetune-domain}; else RUN_DIR=${RUN_DIR:-runs/finetune-$name}; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}

bash launch/install.sh demo
if [ ! -e "$BASE" ]; then
  if [ "$BASE" != "runs/demo" ]; then
    echo "finetune_domain: error: BASE=$BASE does not exist: point BASE at a run directory or model folder" >&2
    exit 2
  fi
  echo "== no base model yet: training the demo model first (launch/quickstart.sh)"
  RUN_DIR=runs/demo bash launch/quickstart.sh
fi

# ---- the domain's shards: one folder per input (clip-data reuses a finished folder)
SHARDS=${DOMAIN_SHARDS:-$CACHE/finetune/domain-$name}
CATEGORY_COL=${CATEGORY_COL:-}
if [ -n "${DOMAIN_MANIFEST:-}" ]; then
  clip-data manifest "$DOMAIN_MANIFEST" --image-col "${IMAGE_COL:?set IMAGE_COL}" \
    --caption-col "${CAPTION_COL:?set CAPTION_COL}" ${CATEGORY_COL:+--category-col "$CATEGORY_COL"} \
    --sep "${SEP:-auto}" --out "$SHARDS"
elif [ -n "${DOMAIN_FOLDER:-}" ]; then
  clip-data folder "$DOMAIN_FOLDER" --out "$SHARDS"
else
  # The demo domain: the Tux Paint stamps (cut-out photographs; a tenth of the demo's training
  # pairs), written as a CSV manifest the way a user's own data would come (image path, caption,
  # class); Fashion-MNIST and the emoji renders are the reference. The held-out split is the demo's
  # content hash split, so the base model never trained on the domain's test images.
  MANIFEST=$CACHE/finetune/tuxpaint.csv
  if [ ! -f "$MANIFEST" ]; then
    mkdir -p "$(dirname "$MANIFEST")"
    python3 -m clip_train finetune demo-manifest --categories all --out "$MANIFEST"
  fi
  CATEGORY_COL=category
  clip-data manifest "$MANIFEST" --image-col image --caption-col caption --category-col category --out "$SHARDS"
fi

REFERENCE='{dataset: fashion-mnist, limit: 1000, templates: ["a photo of a {c}.", "a picture of a {c}.", "a {c}."]}, {dataset: emoji}'
if [ -n "$CATEGORY_COL" ]; then
  ZEROSHOT="[{dataset: 'wds:$SHARDS', class_key: 'json:category'}, $REFERENCE]"
  DOMAIN_METRIC="$(basename "$SHARDS")/acc1"
else
  ZEROSHOT="[$REFERENCE]"
  DOMAIN_METRIC=retrieval/image_retrieval_recall@5
fi

clip-train configs/finetune-domain.yaml run_dir="$RUN_DIR" model.init_from="$BASE" \
  data.train_shards="$SHARDS/train-*.tar" data.val_shards="$SHARDS/val-*.tar" \
  "eval.zeroshot=$ZEROSHOT" finetune.domain_metric="$DOMAIN_METRIC" \
  finetune.reference_metric=fashion-mnist/acc1 "$@"
python3 -m clip_train finetune "$RUN_DIR"
echo "run directory: $RUN_DIR  (eval/wise/wise.json and wise.png: every metric per alpha)"
