"""clip_train's side of gpu.sh's training stage: one process per architecture and compile setting.

    python benchmarks/gpu_train.py --label ViT-B-32 --model '{"arch": "openclip:ViT-B-32"}' \
        --shards 'DIR/train-{000000..000031}.tar' --batches 256,512 --compile on --rows ROWS.jsonl

For each batch size, two measurements of one run configuration (the same YAML a clip-train run
would read: model, bf16, AdamW, cosine schedule, gradient clipping at 1.0, train.compile):

- model_only: the accelerator, model, loss, optimizer and schedule built by the trainer's own
  builders (clip_train/train/build.py), prepared by Accelerate, then its step as the trainer runs it
  (autocast, loss, backward, gradient clipping, the two finiteness checks that synchronise,
  optimizer and schedule step, logit-scale clamp) on one batch that is already on the device:
  uint8 images (random pixels, normalised in the step, as the loader's are) and the tokens of
  captions like the shards' (gpu_shards.captions). --model-warmup untimed steps, then
  --model-steps timed ones between two device synchronisations.
- pipeline: clip_train.train.main itself on the shards (train.log_every --log-every, no evaluation,
  no checkpoint before the last step), run in this process after the model-only measurement;
  samples/s over the log windows after --skip steps, from its own metrics.jsonl.

MFU = FLOPs per pair (clip_train.flops.count_training_flops, counted once on the model before it is
moved or compiled, as the trainer counts it) x samples/s / --peak-flops. Each measurement starts
from torch._dynamo.reset(): otherwise the second batch size would be compiled as a dynamic shape
(automatic dynamic shapes), which a real run, with one batch size, never is; inductor's on-disk
caches survive the reset, so a second compile of the same graph (model_only, then pipeline) loads
its kernels instead of building them again. --warm-only builds and compiles each batch size's
model and runs one step, nothing timed: gpu.py runs it beside the loss stage to fill those caches.

Rows (one JSON object per line, appended as each measurement ends, so a killed process keeps
what it finished) go to --rows; --deadline (a Unix time) skips what would not end before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIM = {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.2, "grad_clip": 1.0}
WARMUP_STEPS = 10  # the schedule's; irrelevant to speed, the same on OpenCLIP's side
# seconds a measurement is at least expected to take here: less left before the deadline, skip it
MIN_SECONDS = {
    ("model_only", False): 10, ("pipeline", False): 20, ("model_only", True): 30, ("pipeline", True): 40,
    ("warm", True): 30,
}  # fmt: skip


def run_config(opts, batch: int, compile_: bool, run_dir: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": opts.model,
        "data": {"train_shards": opts.shards, "batch_size": batch, "num_workers": opts.workers},
        "optim": {**{k: v for k, v in OPTIM.items()}, "warmup_steps": WARMUP_STEPS, "schedule": "cosine"},
        "train": {
            "steps": opts.steps,
            "precision": opts.precision,
            "seed": 0,
            "log_every": opts.log_every,
            "ckpt_every": 0,
            "resume": "none",
            "compile": compile_,
            "compile_backend": opts.compile_backend,
            "peak_flops": opts.peak_flops,
        },
    }


def load_run_config(opts, batch: int, compile_: bool, run_dir: Path):
    import yaml

    from clip_train.config import load_config

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(run_config(opts, batch, compile_, run_dir), sort_keys=False))
    return load_config([path])


def model_only(cfg, batch: int, steps: int, warmup: int) -> dict:
    import torch
    from gpu_shards import captions  # benchmarks/ is on sys.path

    from clip_train.models.tokenizer import build_tokenizer
    from clip_train.models.transforms import batch_normalizer
    from clip_train.train.build import (
        build_accelerator,
        build_model,
        build_optimization,
        resolve_model_config,
    )

    build_start = time.perf_counter()
    accelerator = build_accelerator(cfg)
    # the trainer's builders; the schedule spans the timed steps and the warm-up
    cfg.train.steps = warmup + steps
    model, flop_metrics = build_model(cfg, resolve_model_config(cfg), world_size=1)
    flops = flop_metrics.flops_per_sample
    loss_fn, optimizer, scheduler = build_optimization(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    normalize = batch_normalizer(unwrapped.visual, cfg.model.image, reuse=1)
    device, size = accelerator.device, cfg.model.image.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    tokens = build_tokenizer(cfg.model.text)(captions(batch)).to(device)

    def step() -> None:
        with accelerator.autocast():
            loss = loss_fn(*model(normalize(images), tokens))
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        # the trainer's two host reads of the step (they synchronise with the device)
        bool(torch.isfinite(grad_norm).item()) and bool(torch.isfinite(loss).item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        unwrapped.clamp_logit_scale()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    first_start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    row = {
        "samples_per_s": steps * batch / seconds,
        "step_s": seconds / steps,
        "steps_timed": steps,
        "flops_per_sample": flops,
        "build_s": first_start - build_start,
        "warmup_s": start - first_start,  # compilation, when compiled
        "text_columns": int(unwrapped.text.trimmed_width(tokens)),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row  # the model, optimizer and batch go with this frame (measure() collects them)


def windows_rate(logged: dict[int, float], skip: int, batch: int) -> dict:
    """Samples/s over the log windows that start at or after step `skip`. logged: step -> mean
    seconds per step over the window that ends there (from the previous logged step)."""
    steps = sorted(logged)
    samples = seconds = 0.0
    timed = 0
    for prev, step in zip(steps, steps[1:]):
        if prev >= skip:
            timed += step - prev
            samples += (step - prev) * batch
            seconds += (step - prev) * logged[step]
    if not seconds:
        raise RuntimeError(f"no log window after step {skip} (logged steps {steps})")
    return {"samples_per_s": samples / seconds, "step_s": seconds / timed, "steps_timed": timed}


def pipeline(cfg, run_dir: Path, batch: int, skip: int) -> dict:
    from clip_train.train import main as train_main

    start = time.perf_counter()
    train_main(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    logged = {r["step"]: batch / r["samples_per_s"] for r in train}
    logged[0] = 0.0  # the first window starts at step 0
    row = windows_rate(logged, skip, batch)
    steady = [r for r in train if r["step"] > skip]
    row["flops_per_sample"] = train[-1].get("flops_per_sample")
    row["data_wait_frac"] = sum(r["data_wait_frac"] for r in steady) / max(len(steady), 1)
    row["wall_s"] = wall
    row["first_window_s"] = train[0]["step"] * batch / train[0]["samples_per_s"]  # compile lands here
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a B/16 are GBs; the disk is not endless
    return row


def measure(opts, mode: str, batch: int, compile_: bool) -> dict:
    import torch

    row = {"arch": opts.label, "side": "clip_train", "mode": mode, "batch": batch, "compile": compile_}
    left = opts.deadline - time.time() if opts.deadline else float("inf")
    if left < MIN_SECONDS[(mode, compile_)] * opts.min_seconds_scale:
        return {**row, "status": f"skipped (time budget: {max(left, 0):.0f} s left)"}
    torch._dynamo.reset()  # see the module docstring
    run_dir = opts.work / f"{opts.label}-{mode}-b{batch}-c{int(compile_)}"
    try:
        cfg = load_run_config(opts, batch, compile_, run_dir)
        if mode == "pipeline":
            result = pipeline(cfg, run_dir, batch, opts.skip)
        else:
            steps = 1 if mode == "warm" else opts.model_steps
            result = model_only(cfg, batch, steps, 0 if mode == "warm" else opts.model_warmup)
    except Exception as error:  # a failed cell (a compile error, say) must not lose the others
        traceback.print_exc()
        return {**row, "status": "failed: " + (str(error).strip().splitlines() or [type(error).__name__])[0]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mfu = result["flops_per_sample"] * result["samples_per_s"] / opts.peak_flops if opts.peak_flops else None
    return {**row, "status": "ok", **result, "mfu": mfu}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the architecture's name in the rows")
    parser.add_argument("--model", required=True, type=json.loads, help="the run's model section, JSON")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batches", default="256,512")
    parser.add_argument("--compile", choices=("on", "off"), default="off")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48, help="pipeline steps per run")
    parser.add_argument("--skip", type=int, default=16, help="pipeline steps left out (start-up, compile)")
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=15)
    parser.add_argument("--model-warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=989e12)
    parser.add_argument("--deadline", type=float, default=0.0)
    parser.add_argument("--min-seconds-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    import train as bench_train  # benchmarks/train.py: its dry-mode model is a timm ViT it registers

    bench_train.register_timm_models()
    if opts.skip >= opts.steps or opts.skip % opts.log_every:
        print("gpu_train.py: error: --skip must be a multiple of --log-every below --steps", file=sys.stderr)
        return 2
    compile_ = opts.compile == "on"
    modes = ("warm",) if opts.warm_only else ("model_only", "pipeline")
    for batch in (int(b) for b in opts.batches.split(",")):
        for mode in modes:
            row = measure(opts, mode, batch, compile_ or mode == "warm")
            with opts.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shown = f"{row['samples_per_s']:.1f} samples/s" if row["status"] == "ok" else row["status"]
            print(f"  {opts.label} {mode} batch {batch} compile {compile_}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
