"""Console entry points: clip-train, clip-eval, clip-data (also `python -m clip_train train|eval|data`).

Errors a user can cause (config typos, missing files, incompatible resumes) end in one line on
stderr, `<prog>: error: <what> : <fix>`, and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clip_train.config import ConfigError, EvalConfig, ZeroShotTask, load_config

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    # Imported lazily so that `clip-train --help` and config errors never wait for torch.
    from clip_train.checkpoint import ResumeError
    from clip_train.data import DataError
    from clip_train.evaluate.datasets import DatasetError
    from clip_train.models.pretrained import WeightsMismatchError

    return (*USER_ERRORS, ResumeError, DataError, DatasetError, WeightsMismatchError, FloatingPointError)


def _fail(prog: str, error: Exception) -> int:
    # An error raised in a DataLoader worker comes back with the worker's traceback in its message;
    # its last line is the message itself.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    print(f"{prog}: error: {lines[-1] if lines else type(error).__name__}", file=sys.stderr)
    return 2


TRAIN_USAGE = """usage: clip-train CONFIG.yaml [CONFIG.yaml ...] [key.sub=value ...]

Train a CLIP model. YAML files merge in order, then the key=value overrides, e.g.
  clip-train configs/demo.yaml run_dir=runs/demo optim.lr=1e-4 train.steps=500
"""


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if argv else 2
    paths = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = load_config(paths, overrides)
    except ConfigError as e:
        return _fail("clip-train", e)
    from clip_train import train

    try:
        metrics = train.main(cfg)
    except _user_errors() as e:
        return _fail("clip-train", e)
    if metrics:
        print(f"\nresults ({cfg.run_dir}):\n{train.format_results(metrics)}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clip-eval",
        description="Evaluate a saved model: a model folder, a checkpoint, or a run directory.",
    )
    parser.add_argument(
        "target", help="model folder (config.json + model.safetensors), checkpoint or run dir"
    )
    parser.add_argument(
        "--zeroshot", nargs="*", default=None, help="datasets: fashion-mnist or class folders"
    )
    parser.add_argument(
        "--templates", nargs="*", default=None, help='prompt templates with {c}, e.g. "a {c}."'
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images per dataset")
    parser.add_argument("--retrieval", default=None, help="shards of held-out image-caption pairs")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="folder for the JSON results (default: <target>/eval)")
    args = parser.parse_args(argv)
    try:
        return _evaluate(args)
    except (*_user_errors(),) as e:
        return _fail("clip-eval", e)


def _evaluate(args) -> int:
    import torch

    from clip_train.evaluate.runner import run_evaluation
    from clip_train.models.clip import ClipModel, load_tokenizer
    from clip_train.models.towers import build_image_transforms

    model_dir, run_cfg = resolve_model_dir(Path(args.target))
    if args.zeroshot is None and args.retrieval is None and run_cfg is not None:
        eval_cfg, val_shards = run_cfg.eval, run_cfg.data.val_shards
    else:
        tasks = [ZeroShotTask(dataset=d) for d in args.zeroshot or []]
        if args.templates:
            for task in tasks:
                task.templates = list(args.templates)
        eval_cfg, val_shards = (
            EvalConfig(zeroshot=tasks, retrieval=bool(args.retrieval)),
            args.retrieval or "",
        )
    for task in eval_cfg.zeroshot:
        task.limit = args.limit or task.limit
    eval_cfg.batch_size = args.batch_size
    if not eval_cfg.zeroshot and not (eval_cfg.retrieval and val_shards):
        raise ConfigError("nothing to evaluate: pass --zeroshot DATASET and/or --retrieval SHARDS")
    precision = args.precision or (run_cfg.train.precision if run_cfg else "fp32")

    model = ClipModel.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    _, eval_transform = build_image_transforms(model.visual, model.cfg.image)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = Path(args.out) if args.out else model_dir.parent / "eval" / "clip-eval"
    metrics = run_evaluation(
        model, tokenizer, eval_transform, eval_cfg, val_shards, device, precision, out_dir=out,
        model_name=str(args.target),
    )  # fmt: skip
    from clip_train.train import format_results

    print(f"results ({model_dir}):\n{format_results(metrics)}\nwritten to {out}")
    (out / "summary.json").write_text(json.dumps(metrics, indent=1))
    return 0


def resolve_model_dir(target: Path):
    """A model folder and, when known, the run config: from a model folder, checkpoint or run dir."""
    from clip_train.checkpoint import find_latest

    if not target.exists():
        raise FileNotFoundError(
            f"{target} does not exist: pass a model folder, a checkpoint or a run directory"
        )
    run_cfg = None
    run_dir = None
    if (target / "config.yaml").is_file():  # a run directory
        run_dir = target
        model_dir = target / "model"
        if not (model_dir / "config.json").is_file():
            latest = find_latest(target)
            model_dir = latest / "model" if latest else model_dir
    elif (target / "model" / "config.json").is_file():  # a checkpoint folder
        model_dir = target / "model"
        run_dir = target.parent.parent
    else:
        model_dir = target
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        run_cfg = load_config([run_dir / "config.yaml"])
    return model_dir, run_cfg


def data_main(argv: list[str] | None = None) -> int:
    from clip_train.data.build import main

    return main(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "data": data_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m clip_train {train,eval,data} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
