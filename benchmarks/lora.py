"""LoRA against full fine-tuning, side by side from the same start model, data and steps: trainable
parameters, peak memory, samples/s and the evaluation before (WiSE alpha 0) and after (alpha 1).

    python benchmarks/lora.py --tiny                  # configs/tiny.yaml on generated shards (minutes)
    python benchmarks/lora.py --base runs/demo --shards ~/.cache/clip_train/finetune/domain-demo
        # the domain recipe (configs/finetune-domain.yaml, what launch/finetune_domain.sh runs; the
        # shards are the ones it builds, the base the demo model it fine-tunes)

Each variant is one clip-train run in a process of its own (so that its peak RSS is its own):
  recipe  the recipe as shipped (locked image tower, the top 4 text layers; domain mode only)
  full    both towers unlocked at the recipe's tower lr (optim.image_lr_mult = text_lr_mult)
  lora    adapters on both towers (rank --rank, alpha 2 x rank) at the head's lr; tower weights frozen
Prints the table; writes JSON (--out, default benchmarks/results/lora.json) with every metric per run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNLOCKED = [
    "model.image.lock=false",
    "model.text.lock=false",
    "model.text.unlocked_layers=0",
    "train.cache_image_features=false",
]


def variants(rank: int, tower_lr_mult: float, domain: bool) -> dict[str, list[str]]:
    full = [*UNLOCKED, f"optim.image_lr_mult={tower_lr_mult}", f"optim.text_lr_mult={tower_lr_mult}"]
    lora = [
        *UNLOCKED,
        *(
            f"model.{t}.lora.{k}={v}"
            for t in ("image", "text")
            for k, v in (("rank", rank), ("alpha", 2 * rank))
        ),
        # the adapters start at zero (a no-op), so they train at the head's lr, not a tower's reduced one
        "optim.image_lr_mult=1.0",
        "optim.text_lr_mult=1.0",
    ]
    return {**({"recipe": []} if domain else {}), "full": full, "lora": lora}


class Probe:
    """Trainer hooks of a child run: the parameter counts the optimizer sees, once."""

    def __init__(self):
        self.counts = None

    def on_step_start(self, trainer, step):
        if self.counts is None:
            params = list(trainer.unwrapped.parameters())
            self.counts = {
                "params": sum(p.numel() for p in params),
                "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "optimized_params": sum(
                    p.numel() for g in trainer.optimizer.param_groups for p in g["params"]
                ),
            }

    def on_loss(self, step, loss):
        return loss

    def on_step_end(self, trainer, step):
        pass


def child(out: Path, argv: list[str]) -> int:
    """One clip-train run in this process; its counts and peak memory go to `out`."""
    import torch

    from clip_train import cli

    probe = Probe()
    start = time.perf_counter()
    code = cli.train_main(argv, hooks=probe)
    record = {
        "exit_code": code,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **(probe.counts or {}),
    }
    if torch.cuda.is_available():
        record["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out.write_text(json.dumps(record))
    return code


def run_variant(name: str, base_args: list[str], extra: list[str], root: Path) -> dict:
    run_dir, probe_file = root / name, root / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", str(probe_file), *base_args, f"run_dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lora benchmark: the {name} run failed:\n{proc.stderr[-3000:]}")
    record = json.loads(probe_file.read_text())
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in train if r.get("kind") == "train"]
    record["samples_per_s"] = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]  # past warm-up
    wise = json.loads((run_dir / "results.json").read_text())["wise"]
    record["before"], record["after"] = wise["rows"][0], wise["rows"][-1]
    record["domain_metric"], record["reference_metric"] = wise["domain_metric"], wise["reference_metric"]
    return {"name": name, "overrides": extra, **record}


def tiny_setup(root: Path) -> list[str]:
    """Generated shards and a start model trained on them for 8 steps (configs/tiny.yaml)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_tiny_shards

    shards = write_tiny_shards(root / "data")
    data = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-000000.tar"]
    base = root / "base"
    cmd = [sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={base}", *data]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return [
        "configs/tiny.yaml",
        *data,
        f"model.init_from={base}",
        "train.steps=24",
        "finetune.wise_alphas=[0,1]",
    ]


def domain_setup(base: str, shards: Path, steps: int) -> list[str]:
    """The arguments launch/finetune_domain.sh gives clip-train for the demo domain."""
    reference = (
        '{dataset: fashion-mnist, limit: 1000, templates: ["a photo of a {c}.", "a picture of a {c}.", '
        '"a {c}."]}, {dataset: emoji}'
    )
    return [
        "configs/finetune-domain.yaml",
        f"model.init_from={base}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-*.tar",
        f"eval.zeroshot=[{{dataset: 'wds:{shards}', class_key: 'json:category'}}, {reference}]",
        f"finetune.domain_metric={shards.name}/acc1",
        "finetune.reference_metric=fashion-mnist/acc1",
        f"train.steps={steps}",
        "finetune.wise_alphas=[0,1]",
    ]


def table(rows: list[dict]) -> str:
    domain, reference = rows[0]["domain_metric"], rows[0]["reference_metric"]
    head = (
        f"| run | trainable params | peak RSS MiB | samples/s | {domain} before -> after "
        f"| {reference} before -> after |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} of {r['params']:,} | {r['peak_rss_mib']:.0f} "
            f"| {r['samples_per_s']:.1f} | {r['before'][domain]:.3f} -> {r['after'][domain]:.3f} "
            f"| {r['before'][reference]:.3f} -> {r['after'][reference]:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml on generated shards")
    parser.add_argument("--base", default="runs/demo", help="domain mode: the model to fine-tune")
    parser.add_argument("--shards", type=Path, help="domain mode: the shards finetune_domain.sh builds")
    parser.add_argument("--steps", type=int, default=120, help="domain mode: fine-tuning steps (recipe: 120)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on both towers (alpha = 2 x rank)")
    parser.add_argument("--tower-lr-mult", type=float, default=0.25, help="full: both towers' lr multiplier")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora.json")
    args = parser.parse_args()
    if not args.tiny and (args.shards is None or not Path(args.base).exists()):
        parser.error(
            "domain mode needs --base (a trained model: launch/quickstart.sh) and --shards; or --tiny"
        )
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        root = Path(tmp)
        base_args = (
            tiny_setup(root) if args.tiny else domain_setup(args.base, args.shards.expanduser(), args.steps)
        )
        runs = variants(args.rank, args.tower_lr_mult, domain=not args.tiny)
        rows = [run_variant(name, base_args, extra, root) for name, extra in runs.items()]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/lora.py " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps({"command": command, "base_args": base_args, "runs": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
