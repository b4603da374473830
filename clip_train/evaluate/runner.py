"""Run the configured evaluations on a model: zero-shot classification and image-text retrieval.

Used by the trainer (every eval_every steps and at the end, on every rank) and by clip-eval on a
saved model. With several processes every rank encodes its share of the images and prompts
(encode.py) and gets the same metrics; only the main process writes files. Per task, in
out_dir: `<dataset>_<task>.json` in CLIP_benchmark's layout ({"dataset", "model", "task",
"metrics"} plus details) and, with plots on, `<dataset>_<task>.png`.

A set is named after its folder (datasets.naming_path). Two sets of one name, such as
CLIP_benchmark's a/test/0.tar and b/test/0.tar, are named by as many folders as tell them apart
(a-test, b-test), and the same folder twice is numbered (test, test-2): no task ever overwrites
another's results or metrics.

Protocol (OpenCLIP's zero-shot classifier, CLIP_benchmark's metrics): L2-normalised embeddings;
class embedding = renormalised mean of the normalised embeddings of its prompts; logits = 100 x
cosine; top-1, top-5 (more than 5 classes), mean per-class recall; retrieval recall@k both ways,
an image counting as retrieved when any of its captions is in the top k.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from clip_train import distributed
from clip_train.config import ConfigError, EvalConfig, RetrievalTask, ZeroShotTask
from clip_train.evaluate import datasets
from clip_train.evaluate.datasets import LabelledImages, load_dataset
from clip_train.evaluate.encode import EvalContext, encode_images, encode_texts
from clip_train.evaluate.metrics import (
    classification_metrics,
    confusion_matrix,
    retrieval_ranks,
    retrieval_recall,
)
from clip_train.evaluate.probe import linear_probe
from clip_train.evaluate.progress import EvalProgress
from clip_train.evaluate.prompts import load_templates
from clip_train.evaluate.registry import registered_names
from clip_train.evaluate.retrieval_sets import load_retrieval
from clip_train.evaluate.zeroshot import ZeroShotClassifier

RECALL_KS = (1, 5, 10)


def zeroshot_classification(model, tokenizer, transform, task: ZeroShotTask, ctx: EvalContext):
    data = load_dataset(task.dataset, task.limit, classnames=task.classnames, class_key=task.class_key)
    try:
        templates = load_templates(task.templates or task.template_set, data.name)
    except ValueError as e:  # a template file the user wrote: a config error, reported in one line
        raise ConfigError(str(e)) from None
    classifier = ZeroShotClassifier(model, tokenizer, data.classnames, templates, ctx=ctx)
    logits = classifier.logits(encode_images(model, data.image, len(data), transform, ctx))
    labels = torch.tensor(data.labels)
    metrics = classification_metrics(logits, labels)
    if task.linear_probe_train:
        metrics.update(_linear_probe(model, transform, task, data, ctx))
    extra = {
        "classnames": data.classnames,
        "templates": templates,
        "num_images": len(data),
        "confusion_matrix": confusion_matrix(logits, labels).tolist(),
    }
    return data.name, metrics, extra


def _linear_probe(model, transform, task: ZeroShotTask, test: LabelledImages, ctx: EvalContext) -> dict:
    train = datasets.load_train_split(task.dataset)
    if train is None:
        raise ConfigError(
            f"linear_probe_train needs a training split; {task.dataset!r} has none: use a dataset "
            f"registered with one ({', '.join(registered_names('train'))}) or set linear_probe_train=0"
        )
    keep = np.linspace(0, len(train) - 1, min(task.linear_probe_train, len(train))).round().astype(int)
    train_features = encode_images(
        model, lambda i: train.image(int(keep[i])), len(keep), transform, ctx, features=True
    )
    test_features = encode_images(model, test.image, len(test), transform, ctx, features=True)
    train_labels = torch.tensor([train.labels[i] for i in keep])
    result = linear_probe(
        train_features, train_labels, test_features, torch.tensor(test.labels), len(test.classnames)
    )
    return {**result, "linear_probe_train_images": float(len(keep))}


def image_text_retrieval(model, tokenizer, transform, task: RetrievalTask, ctx: EvalContext):
    data = load_retrieval(
        task.dataset,
        task.limit,
        image_col=task.image_col,
        caption_col=task.caption_col,
        captions=task.captions,
    )
    image_emb = encode_images(model, data.image, data.num_images, transform, ctx)
    text_emb = encode_texts(model, tokenizer, data.captions, ctx)
    owners = torch.tensor(data.caption_image)
    metrics = retrieval_recall(image_emb, text_emb, owners, ks=RECALL_KS)
    ranks = retrieval_ranks(image_emb, text_emb, owners) if distributed.is_main() else None  # for the plot
    extra = {"num_images": data.num_images, "num_captions": len(data.captions)}
    return data.name, metrics, extra, ranks


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
    val_captions: str = "whole",
) -> dict[str, float]:
    """Every configured task; returns flat metrics such as 'fashion-mnist/acc1', 'retrieval/...'.
    `val_captions`: data.captions, how the val_shards samples hold their captions.

    Call it on every rank of a process group (all or none): each encodes its share.
    """
    was_training = model.training
    model.eval()
    ctx = EvalContext(
        device, precision, cfg.batch_size, jit_image_tower=cfg.jit_image_tower, image_chunk=cfg.image_chunk
    )
    write = out_dir is not None and distributed.is_main()
    flat: dict[str, float] = {}
    started = time.perf_counter()
    retrieval_tasks = list(cfg.retrieval_tasks)
    heldout = bool(cfg.retrieval and val_shards)
    if heldout:
        # "whole" trains on the text as one caption; the held-out pairs were always read by line
        captions = "txt-lines" if val_captions == "whole" else val_captions
        retrieval_tasks.insert(
            0, RetrievalTask(dataset=val_shards, limit=cfg.retrieval_limit, captions=captions)
        )
    # named before anything is evaluated: a name depends on the other tasks' folders
    zeroshot_names = unique_names([datasets.naming_path(t.dataset) for t in cfg.zeroshot])
    retrieval_names = unique_names(
        [Path("heldout")] * heldout  # the held-out pairs' historical name
        + [datasets.naming_path(t.dataset, retrieval=True) for t in cfg.retrieval_tasks]
    )
    progress = EvalProgress(len(zeroshot_names) + len(retrieval_names), enabled=distributed.is_main())
    try:
        for task, name in zip(cfg.zeroshot, zeroshot_names, strict=True):
            _, metrics, extra = zeroshot_classification(model, tokenizer, transform, task, ctx)
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
            if write:
                path = _write_result(out_dir, name, "zeroshot_classification", model_name, metrics, extra)
                if cfg.plots:
                    from clip_train.evaluate.plots import plot_confusion

                    title = f"{name}: top-1 {metrics['acc1']:.3f}"
                    plot_confusion(
                        extra["confusion_matrix"], extra["classnames"], title, path.with_suffix(".png")
                    )
            progress.task_done(name, extra["num_images"])
        for index, (task, name) in enumerate(zip(retrieval_tasks, retrieval_names, strict=True)):
            _, metrics, extra, ranks = image_text_retrieval(model, tokenizer, transform, task, ctx)
            # the held-out pairs keep their historical prefix "retrieval/"
            prefix = "retrieval" if index == 0 and heldout else f"retrieval-{name}"
            flat.update({f"{prefix}/{k}": v for k, v in metrics.items()})
            if write:
                path = _write_result(out_dir, name, "zeroshot_retrieval", model_name, metrics, extra)
                if cfg.plots:
                    from clip_train.evaluate.plots import plot_recall_curves

                    plot_recall_curves(*ranks, f"{name}: recall@k", path.with_suffix(".png"))
            progress.task_done(prefix, extra["num_images"])
    finally:
        progress.close()
        model.train(was_training)
    flat["eval_seconds"] = time.perf_counter() - started
    return flat


def _write_result(out_dir, dataset: str, task: str, model_name: str, metrics: dict, extra: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"dataset": dataset, "model": model_name, "task": task, "metrics": metrics, **extra}
    path = out_dir / f"{_file_safe(dataset)}_{task}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def unique_names(paths: list[Path]) -> list[str]:
    """A name per path, unique also as a file name: the last part, or as many parts joined by "-"
    as tell it from the other paths of that name; a path given twice is numbered ("test-2")."""
    parts = [p.relative_to(p.anchor).parts if p.anchor else p.parts for p in paths]
    depth = [1] * len(paths)
    grown = True
    while grown:
        names = ["-".join(q[-d:]) for q, d in zip(parts, depth)]
        clashes = defaultdict(list)
        for i, name in enumerate(names):
            clashes[_file_safe(name)].append(i)
        grown = False
        for group in clashes.values():
            for i in group:
                # only while another path of the group differs: more parts cannot split equal paths
                if depth[i] < len(parts[i]) and any(paths[j] != paths[i] for j in group):
                    depth[i] += 1
                    grown = True
    taken = {_file_safe(name) for name in names}
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, count = name, 1
        # numbered only where more parts cannot help, and never onto a name another path has
        while _file_safe(candidate) in used or (count > 1 and _file_safe(candidate) in taken):
            count += 1
            candidate = f"{name}-{count}"
        used.add(_file_safe(candidate))
        unique.append(candidate)
    return unique


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
