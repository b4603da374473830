"""Run the configured evaluations on a model: zero-shot classification and held-out retrieval.

Used by the trainer (every eval_every steps and at the end) and by clip-eval on a saved model.
Each task's result is also written as JSON in CLIP_benchmark's output layout
({"dataset", "model", "task", "metrics"}) when an output folder is given.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from clip_train.config import EvalConfig, ZeroShotTask
from clip_train.data.pipeline import build_eval_loader
from clip_train.evaluate.datasets import load_dataset
from clip_train.evaluate.metrics import (
    classification_metrics,
    classifier_weights,
    confusion_matrix,
    retrieval_recall,
)

ZERO_SHOT_LOGIT_SCALE = 100.0  # fixed, as in CLIP / OpenCLIP / CLIP_benchmark zero-shot evaluation


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device, precision: str, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        with autocast(device, precision):
            out.append(model.encode_text(tokens).float())
    return torch.cat(out)


@torch.no_grad()
def zeroshot_classification(model, tokenizer, transform, task: ZeroShotTask, device, precision, batch_size):
    data = load_dataset(task.dataset, task.limit)
    prompts = [template.format(c=name) for name in data.classnames for template in task.templates]
    prompt_emb = encode_texts(model, tokenizer, prompts, device, precision, batch_size)
    weights = classifier_weights(prompt_emb.view(len(data.classnames), len(task.templates), -1))
    logits = []
    for start in range(0, len(data), batch_size):
        batch = torch.stack(
            [transform(data.image(i)) for i in range(start, min(start + batch_size, len(data)))]
        )
        with autocast(device, precision):
            image_emb = model.encode_image(batch.to(device)).float()
        logits.append(ZERO_SHOT_LOGIT_SCALE * image_emb @ weights.T)
    logits = torch.cat(logits).cpu()
    labels = torch.tensor(data.labels)
    metrics = classification_metrics(logits, labels)
    extra = {"classnames": data.classnames, "confusion_matrix": confusion_matrix(logits, labels).tolist()}
    return data.name, metrics, extra


@torch.no_grad()
def heldout_retrieval(
    model, tokenizer, transform, shards: str, device, precision, batch_size, limit: int = 0
):
    image_emb, text_emb, seen = [], [], 0
    for images, tokens, _captions, _keys in build_eval_loader(
        shards, batch_size=batch_size, transform=transform, tokenize=tokenizer
    ):
        with autocast(device, precision):
            image_emb.append(model.encode_image(images.to(device)).float())
            text_emb.append(model.encode_text(tokens.to(device)).float())
        seen += len(images)
        if limit and seen >= limit:
            break
    image_emb, text_emb = torch.cat(image_emb), torch.cat(text_emb)
    if limit:
        image_emb, text_emb = image_emb[:limit], text_emb[:limit]
    # One caption per held-out image: caption j belongs to image j.
    metrics = retrieval_recall(image_emb, text_emb, torch.arange(len(text_emb)))
    return metrics, {"num_pairs": len(text_emb)}


def run_evaluation(
    model,
    tokenizer,
    transform,
    cfg: EvalConfig,
    val_shards: str,
    device: torch.device,
    precision: str,
    out_dir: str | Path | None = None,
    model_name: str = "clip_train",
) -> dict[str, float]:
    """Every configured task; returns flat metrics such as 'fashion-mnist/acc1', 'retrieval/...'."""
    was_training = model.training
    model.eval()
    flat: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for task in cfg.zeroshot:
            name, metrics, extra = zeroshot_classification(
                model, tokenizer, transform, task, device, precision, cfg.batch_size
            )
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
            _write_result(out_dir, name, "zeroshot_classification", model_name, metrics, extra)
        if cfg.retrieval and val_shards:
            metrics, extra = heldout_retrieval(
                model,
                tokenizer,
                transform,
                val_shards,
                device,
                precision,
                cfg.batch_size,
                cfg.retrieval_limit,
            )
            flat.update({f"retrieval/{k}": v for k, v in metrics.items()})
            _write_result(out_dir, "heldout", "zeroshot_retrieval", model_name, metrics, extra)
    finally:
        model.train(was_training)
    flat["eval_seconds"] = time.perf_counter() - started
    return flat


def _write_result(out_dir, dataset: str, task: str, model_name: str, metrics: dict, extra: dict) -> None:
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"dataset": dataset, "model": model_name, "task": task, "metrics": metrics, **extra}
    (out_dir / f"{dataset}_{task}.json").write_text(json.dumps(record, indent=1))
