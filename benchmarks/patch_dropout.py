"""Patch dropout's training speed: the benchmark ViT with model.image.patch_dropout 0.5 against 0,
side by side in one process.

    python benchmarks/patch_dropout.py                 # bench ViT-B/32-style 6x256 + BERT 6x256, batch 64
    python benchmarks/patch_dropout.py --quick         # seconds: the tiny bench ViT (used by the tests)
    python benchmarks/patch_dropout.py --rates 0,0.25,0.5,0.75 --out benchmarks/results/patch_dropout.json

The model is benchmarks/train.py's ("full": timm ViT, patch 32, 6 blocks of width 256, 224 px, so
49 patch tokens and a class token; BERT 6 x 256 with MiniLM's vocabulary, context 32), one per rate,
built by the trainer's own builders (clip_train/train/build.py: same seed, so the same initial
weights) and trained by the trainer's own step (train/step.py compute_gradients and apply_update:
autocast, loss, backward, clipping, AdamW and schedule) on one fixed batch already in memory
(random pixels, MiniLM tokens of fixed captions): no data loading, so the figure is the model's.
The rates take turns, one timed round of --steps steps each, --rounds times, after --warmup untimed
steps each: a machine that gets busier or quieter during the run slows every rate alike. Reported:
samples/s of the whole training step and of the image tower's forward and backward alone (the part
patch dropout shortens; the text tower and the loss are untouched), the median over the rounds,
and each rate's speed-up over rate 0.

FLIP (Li et al., 2023) reports 2-3x for large ViTs on GPUs at 50-75% dropout; here the text tower,
the patch embedding and the optimizer step are a fixed cost the dropped tokens do not reduce.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import train as bench_train  # noqa: E402  (benchmarks/train.py: the architectures and their timm ViTs)


def run_config(arch: dict, rate: float, batch: int, steps: int, precision: str):
    from clip_train.config import RunConfig, build_dataclass, fill_loss_defaults, validate

    model = {
        "image": {
            "name": arch["timm_model"],
            "image_size": arch["image_size"],
            "channels_last": False,
            "patch_dropout": rate,
        },
        "text": {
            "tokenizer": arch["tokenizer"],
            "hf_config": {
                "model_type": "bert",
                "vocab_size": 30522,  # MiniLM's WordPiece vocabulary
                "max_position_embeddings": arch["max_positions"],
                **arch["bert"],
            },
            "pooling": "mean",
            "context_length": arch["context_length"],
        },
        "embed_dim": arch["embed_dim"],
    }  # fmt: skip
    sections = {
        "run_dir": "unused",  # nothing is written
        "model": model,
        "data": {"batch_size": batch, "train_shards": "unused.tar"},  # the batch is made here
        "optim": {**bench_train.OPTIM, "warmup_steps": 10},
        "train": {"steps": steps, "precision": precision, "seed": 0},
    }
    cfg = build_dataclass(RunConfig, sections)
    fill_loss_defaults(cfg)
    validate(cfg)
    return cfg


class Contender:
    """One rate's model, optimizer and fixed batch, and the trainer's step over them."""

    def __init__(self, cfg, total_steps: int):
        import torch

        from clip_train.models.tokenizer import build_tokenizer
        from clip_train.models.transforms import batch_normalizer
        from clip_train.train.build import build_accelerator, build_model, build_optimization

        cfg.train.steps = total_steps
        self.cfg, self.accelerator = cfg, build_accelerator(cfg)
        model, _ = build_model(cfg, None, world_size=1)
        self.loss_fn, optimizer, self.scheduler = build_optimization(model, cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        size, batch = cfg.model.image.image_size, cfg.data.batch_size
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
        normalize = batch_normalizer(self.unwrapped.visual, cfg.model.image, reuse=1)
        device = self.accelerator.device
        self.images = normalize(pixels.to(device)).clone()
        captions = [f"a photo of object number {i} on a plain background" for i in range(batch)]
        self.tokens = build_tokenizer(cfg.model.text)(captions).to(device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.model.train()

    def train_steps(self, steps: int) -> float:
        """Seconds for `steps` training steps (the trainer's step functions)."""
        from clip_train.train.step import apply_update, compute_gradients

        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            compute_gradients(
                self.model, [(self.images, self.tokens, None)], self.loss_fn, self.accelerator,
                grad_clip=self.cfg.optim.grad_clip, precision=self.cfg.train.precision,
            )  # fmt: skip
            apply_update(self.optimizer, self.scheduler, self.unwrapped)
        self.sync()
        return time.perf_counter() - start

    def image_tower_steps(self, steps: int) -> float:
        """Seconds for `steps` forward and backward passes of the image tower alone."""
        visual = self.unwrapped.visual
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            with self.accelerator.autocast():
                features = visual(self.images)
            features.float().square().mean().backward()
        self.sync()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(opts) -> dict:
    import torch

    bench_train.register_timm_models()
    arch = bench_train.ARCHS["quick" if opts.quick else "full"]
    total = opts.warmup + opts.rounds * opts.steps
    contenders = {
        rate: Contender(run_config(arch, rate, opts.batch, total, opts.precision), total)
        for rate in opts.rates
    }
    for contender in contenders.values():
        contender.train_steps(opts.warmup)
        contender.image_tower_steps(1)
    train_s = {rate: [] for rate in opts.rates}
    image_s = {rate: [] for rate in opts.rates}
    for _ in range(opts.rounds):
        for rate, contender in contenders.items():  # the rates take turns (see the module docstring)
            train_s[rate].append(contender.train_steps(opts.steps))
            image_s[rate].append(contender.image_tower_steps(opts.steps))
    samples = opts.steps * opts.batch
    rows = []
    for rate in opts.rates:
        train_rate = samples / statistics.median(train_s[rate])
        image_rate = samples / statistics.median(image_s[rate])
        rows.append(
            {
                "patch_dropout": rate,
                "train_samples_per_s": train_rate,
                "image_tower_samples_per_s": image_rate,
            }
        )
    base = rows[0]
    for row in rows:
        row["train_speedup"] = row["train_samples_per_s"] / base["train_samples_per_s"]
        row["image_tower_speedup"] = row["image_tower_samples_per_s"] / base["image_tower_samples_per_s"]
    device = next(iter(contenders.values())).accelerator.device
    meta = {
        "arch": "quick" if opts.quick else "full", "timm_model": arch["timm_model"], "batch": opts.batch,
        "precision": opts.precision, "rounds": opts.rounds, "steps_per_round": opts.steps,
        "warmup_steps": opts.warmup, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    return {"meta": meta, "rows": rows}


def format_table(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"patch dropout, {meta['timm_model']} batch {meta['batch']} {meta['precision']} on {meta['device']} "
        f"({meta['rounds']} rounds of {meta['steps_per_round']} steps, median)",
        f"{'patch_dropout':>13} {'train samples/s':>16} {'speed-up':>9} "
        f"{'image tower samples/s':>22} {'speed-up':>9}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['patch_dropout']:>13.2f} {row['train_samples_per_s']:>16.1f} "
            f"{row['train_speedup']:>8.2f}x {row['image_tower_samples_per_s']:>22.1f} "
            f"{row['image_tower_speedup']:>8.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny bench ViT, a few steps (the tests)")
    parser.add_argument("--rates", default="0,0.5", help="comma-separated; the first is the reference")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--quick: 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per round; default 5 (--quick: 2)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "patch_dropout.json")
    opts = parser.parse_args(argv)
    try:
        opts.rates = [float(r) for r in opts.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {opts.rates!r}: comma-separated numbers in [0, 1), e.g. 0,0.5")
    if not all(0 <= r < 1 for r in opts.rates):
        parser.error(f"--rates {opts.rates}: each rate must be in [0, 1)")
    opts.batch = opts.batch or (8 if opts.quick else 64)
    opts.rounds = opts.rounds or (2 if opts.quick else 5)
    opts.steps = opts.steps or (2 if opts.quick else 5)
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    result = measure(opts)
    print(format_table(result))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
