"""Console entry points: clip-train, clip-eval, clip-data, clip-export (also `python -m clip_train
train|eval|data|export`, and `python -m clip_train finetune`).

Errors a user can cause (config typos, missing files, incompatible resumes) end in one line on
stderr, `<prog>: error: <what> : <fix>`, and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clip_train import preemption
from clip_train.config import ConfigError, EvalConfig, RetrievalTask, ZeroShotTask, load_config
from clip_train.errors import fail

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    # Imported lazily so that `clip-train --help` and config errors never wait for torch.
    from clip_train.checkpoint import CheckpointWriteError, ResumeError
    from clip_train.data import DataError
    from clip_train.evaluate.datasets import DatasetError
    from clip_train.models.pretrained import WeightsMismatchError

    return (
        *USER_ERRORS,
        ResumeError,
        CheckpointWriteError,
        DataError,
        DatasetError,
        WeightsMismatchError,
        FloatingPointError,
    )


TRAIN_USAGE = """usage: clip-train CONFIG.yaml [CONFIG.yaml ...] [key.sub=value ...]

Train a CLIP model. YAML files merge in order, then the key=value overrides, e.g.
  clip-train configs/demo.yaml run_dir=runs/demo optim.lr=1e-4 train.steps=500
"""


def train_main(argv: list[str] | None = None, hooks=None) -> int:
    """clip-train; hooks: a clip_train.train.TrainHooks acting at each step (tests/fault_run.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if argv else 2
    preemption.install()  # first: a signal while torch loads must not kill the run (exit 143)
    paths = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = load_config(paths, overrides)
    except ConfigError as e:
        return fail("clip-train", e)
    from clip_train import train

    try:
        metrics = train.main(cfg, hooks)
    except preemption.Preempted as e:
        print(f"clip-train: {e}", file=sys.stderr)
        return preemption.EXIT_CODE
    except _user_errors() as e:
        return fail("clip-train", e)
    if metrics:
        print(f"\nresults ({cfg.run_dir}):\n{train.format_results(metrics)}")
    return 0


EVAL_EPILOG = """examples:
  clip-eval runs/demo                                    # the run's own evaluation config
  clip-eval runs/demo/model --zeroshot fashion-mnist tuxpaint emoji --template-set openai_imagenet
  clip-eval runs/demo --zeroshot wds:data/val-{000..003}.tar --class-key json:label --classnames names.txt
  clip-eval runs/demo --retrieval data/val-*.tar pairs.csv --linear-probe 2000
  torchrun --nproc_per_node 2 -m clip_train eval runs/demo --zeroshot fashion-mnist   # split over 2 processes
"""


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clip-eval",
        description="Evaluate a saved model: a model folder, a checkpoint, or a run directory.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target", help="model folder (config.json + model.safetensors), checkpoint or run dir"
    )
    parser.add_argument(
        "--zeroshot",
        nargs="*",
        default=None,
        help="classification sets: fashion-mnist, tuxpaint, emoji, a folder of class folders, wds:SHARDS",
    )
    parser.add_argument(
        "--templates", nargs="*", default=None, help='prompt templates with {c}, e.g. "a {c}."'
    )
    parser.add_argument("--template-set", default="", help="default, openai_imagenet or a file of templates")
    parser.add_argument("--classnames", default="", help="file of class names, one per line")
    parser.add_argument(
        "--class-key", default="cls", help="wds: sample member (or json:FIELD) holding the class"
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate N evenly spaced images per dataset")
    parser.add_argument(
        "--retrieval",
        nargs="*",
        default=None,
        help="image-caption sets: shards, or .csv/.tsv/.jsonl manifests",
    )
    parser.add_argument(
        "--linear-probe", type=int, default=0, metavar="N", help="also a linear probe on N images"
    )
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG per task")
    parser.add_argument("--out", default=None, help="folder for the results (default: <run>/eval/clip-eval)")
    args = parser.parse_args(argv)
    try:
        return _evaluate(args)
    except (*_user_errors(),) as e:
        return fail("clip-eval", e)


def _eval_config(args, run_cfg) -> tuple[EvalConfig, str]:
    """The tasks: the command line's, else the run's own evaluation config."""
    if args.zeroshot is None and args.retrieval is None:
        if run_cfg is None:
            raise ConfigError("nothing to evaluate: pass --zeroshot DATASET and/or --retrieval SHARDS")
        eval_cfg, val_shards = run_cfg.eval, run_cfg.data.val_shards
    else:
        tasks = [
            ZeroShotTask(
                dataset=d,
                templates=list(args.templates or []),
                template_set=args.template_set,
                classnames=args.classnames,
                class_key=args.class_key,
            )
            for d in args.zeroshot or []
        ]
        retrieval = [RetrievalTask(dataset=d) for d in args.retrieval or []]
        eval_cfg, val_shards = EvalConfig(zeroshot=tasks, retrieval=False, retrieval_tasks=retrieval), ""
    for task in eval_cfg.zeroshot:
        task.limit = args.limit or task.limit
        if args.linear_probe:
            task.linear_probe_train = args.linear_probe
    for task in eval_cfg.retrieval_tasks:
        task.limit = args.limit or task.limit
    eval_cfg.retrieval_limit = args.limit or eval_cfg.retrieval_limit
    eval_cfg.batch_size = args.batch_size
    eval_cfg.plots = eval_cfg.plots and not args.no_plots
    if not eval_cfg.zeroshot and not eval_cfg.retrieval_tasks and not (eval_cfg.retrieval and val_shards):
        raise ConfigError("nothing to evaluate: pass --zeroshot DATASET and/or --retrieval SHARDS")
    return eval_cfg, val_shards


def _evaluate(args) -> int:
    import torch
    from accelerate import Accelerator

    from clip_train.evaluate.runner import run_evaluation
    from clip_train.inference import load
    from clip_train.paths import resolve_model_folder
    from clip_train.train import format_results

    model_dir, run_cfg = resolve_model_folder(args.target), _run_config_of(Path(args.target))
    eval_cfg, val_shards = _eval_config(args, run_cfg)
    precision = args.precision or (run_cfg.train.precision if run_cfg else "fp32")
    # Under torchrun the Accelerator joins the process group: each process encodes its share.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, eval_transform, tokenizer = load(model_dir, accelerator.device)
    out = Path(args.out) if args.out else model_dir.parent / "eval" / "clip-eval"
    metrics = run_evaluation(
        model, tokenizer, eval_transform, eval_cfg, val_shards, accelerator.device, precision, out_dir=out,
        model_name=str(args.target), val_captions=run_cfg.data.captions if run_cfg else "whole",
    )  # fmt: skip
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(metrics, indent=1))
        print(f"results ({model_dir}):\n{format_results(metrics)}\nwritten to {out}")
    accelerator.end_training()
    return 0


def _run_config_of(target: Path):
    """The run config of a run directory or checkpoint (None for a model folder)."""
    from clip_train.paths import RUN_CONFIG_NAME, run_dir_of

    run_dir = run_dir_of(target)
    return load_config([run_dir / RUN_CONFIG_NAME]) if run_dir is not None else None


EXPORT_EPILOG = """examples:
  clip-export runs/demo --to openclip --out exports/demo-openclip
  clip-export runs/demo/checkpoints/step-300 --to hf --out exports/demo-hf
  clip-export runs/demo --weights ema --to openclip --out exports/demo-ema   # a train.ema run
A model the target cannot reproduce exactly is refused, and nothing is written; see
clip_train/export.py for how to load each export and what can be exported.
"""


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clip-export",
        description="Write a saved model for OpenCLIP or as a Hugging Face VisionTextDualEncoderModel.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", help="model folder (config.json + model.safetensors), checkpoint or run dir"
    )
    parser.add_argument("--to", required=True, choices=["openclip", "hf"], help="the library to load it with")
    parser.add_argument(
        "--out", required=True, help="new folder for the export (must not exist, or be empty)"
    )
    parser.add_argument(
        "--weights",
        choices=["live", "ema"],
        default="live",
        help="of a run or checkpoint: the trained weights (live) or their EMA (train.ema, model-ema/)",
    )
    args = parser.parse_args(argv)
    try:
        from clip_train.export import export_model
        from clip_train.paths import resolve_model_folder

        model_dir = resolve_model_folder(args.source, weights=args.weights)
        result = export_model(model_dir, args.to, Path(args.out))
    except _user_errors() as e:  # the export's refusals are ConfigErrors
        return fail("clip-export", e)
    diffs = ", ".join(f"{kind} {diff:.1e}" for kind, diff in result.max_diff.items())
    print(f"exported {model_dir} to {result.folder} ({args.to}); max embedding difference: {diffs}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def data_main(argv: list[str] | None = None) -> int:
    # clip-data knows folders and manifests; the demo's and the teacher's sub-commands come from above it
    from clip_train.data.build import main
    from clip_train.demo.build import add_demo_command
    from clip_train.train.teacher_shards import add_teacher_command

    return main(argv, commands=[add_demo_command, add_teacher_command])


def finetune_main(argv: list[str] | None = None) -> int:
    """`python -m clip_train finetune RUN`: a run's WiSE-FT before/after table (finetune.py);
    `... finetune demo-manifest --categories C --out CSV`: the demo's domain (demo/domain.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo-manifest"]:
        from clip_train.demo.domain import main as demo_manifest

        return demo_manifest(argv[1:])
    from clip_train.finetune import main

    return main(argv)


def import_main(argv: list[str] | None = None) -> int:
    """`clip-import`: an OpenCLIP checkpoint (architecture name or config JSON + weights file) as a
    clip_train model folder, checked against OpenCLIP before it is written (models/openclip_import.py)."""
    from clip_train.models.openclip_import import main as import_openclip_main

    return import_openclip_main(argv, prog="clip-import")


COMMANDS = {
    "train": train_main,
    "eval": eval_main,
    "data": data_main,
    "finetune": finetune_main,
    "export": export_main,
    "import": import_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m clip_train {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
