"""The demo: its real training sources and its evaluation sets, built on the core's public parts.

    sources.py     iterators over the demo sources (Tux Paint, Fluent Emoji 3D, OpenClipart)
    build.py       `clip-data demo`: those sources as shards (cli.py adds it to clip-data)
    eval_sets.py   the evaluation sets fashion-mnist, tuxpaint and emoji
    domain.py      `python -m clip_train finetune demo-manifest`: the fine-tuning recipe's domain
    assets/        the sets' prompt templates and class-name tables

The core knows folders, webdataset shards and manifests only; nothing below this package imports
it. Its evaluation sets are registered like anyone's, with evaluate.registry.register_dataset:
register() below is called by the registry the first time a dataset name is looked up (its
PLUGINS table names this package), so `eval.zeroshot: [{dataset: tuxpaint}]` works without an
import. This file imports nothing at import time: importing demo.sources (clip-data, the
fine-tuning recipe) loads no evaluation code.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "templates"


def register() -> None:
    """Register the demo's evaluation sets (evaluate/registry.py calls this once)."""
    from clip_train.demo import eval_sets
    from clip_train.evaluate.registry import register_dataset

    register_dataset(
        "fashion-mnist",
        eval_sets.fashion_mnist_split,
        splits=("test", "train"),
        templates=TEMPLATES_DIR / "fashion-mnist.txt",
    )
    register_dataset("tuxpaint", eval_sets.tuxpaint_split, templates=TEMPLATES_DIR / "tuxpaint.txt")
    register_dataset("emoji", eval_sets.emoji_split, templates=TEMPLATES_DIR / "emoji.txt")
