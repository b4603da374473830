"""Proof that a restructuring changes no number: the same tiny runs at a base commit and at the
working tree, their losses and final weights compared bit for bit.

    python tests/same_numbers.py --base HEAD~3 [--out same_numbers.json] [--only plain,accum]

Runs (configs/tiny.yaml on generated shape-caption shards, fp32, seed 0):
  plain          8 steps
  accum          train.accum_steps=2
  siglip_tiled   SigLIP loss, tiled, block 4
  infonce_tiled  InfoNCE, tiled, block 4, accumulated
  two_process    2 processes on gloo (torchrun), tiled
  resumed        SIGTERM after step 4 (exit 75), then run again to resume to step 8

Each side runs its own code: the base commit from a git worktree, put first on PYTHONPATH.
Exit code 0 when every run matches; 1 (and the first differing step or tensor) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_tiny_shards  # noqa: E402

RUNS = {
    "plain": [],
    "accum": ["train.accum_steps=2"],
    "siglip_tiled": ["loss.kind=siglip", "loss.impl=tiled", "loss.block_size=4"],
    "infonce_tiled": ["loss.impl=tiled", "loss.block_size=4", "train.accum_steps=2"],
    "two_process": ["loss.impl=tiled", "loss.block_size=4"],
    "resumed": [],
}


def build_shards(root: Path) -> Path:
    return write_tiny_shards(root)  # the test suite's tiny shards (tests/conftest.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(name: str, shards: Path, run_dir: Path) -> list[str]:
    train = ["-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={run_dir}"]
    train += [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-000000.tar"]
    train += RUNS[name]
    if name == "two_process":
        launcher = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
        ]
        return [sys.executable, *launcher, *train]
    return [sys.executable, *train]


def _run_resumed(command: list[str], env: dict, cwd: Path) -> None:
    """Start, SIGTERM once step 4 is logged (the run checkpoints at a step boundary, exits 75), resume."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        if line.startswith("[train 4]"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    if proc.returncode != 75:
        raise RuntimeError(f"the interrupted run exited {proc.returncode}, not 75")
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, timeout=300)


def run_side(tree: Path, shards: Path, out: Path, names: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for name in names:
        run_dir = out / name
        command = _command(name, shards, run_dir)
        if name == "resumed":
            _run_resumed(command, env, tree)
        else:
            done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{name} at {tree} failed: {done.stderr[-2000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # a resumed run appends: the last record of each step counts
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def compare(base: Path, new: Path) -> dict:
    """The first differing step, tensor and evaluation metric of two runs (None: identical)."""
    a, b = _losses(base), _losses(new)
    loss_diff = next((s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)), None)
    wa = load_file(base / "model" / "model.safetensors")
    wb = load_file(new / "model" / "model.safetensors")
    weight_diff = None
    if set(wa) != set(wb):
        weight_diff = f"keys differ: {sorted(set(wa) ^ set(wb))[:3]}"
    else:
        weight_diff = next((k for k in sorted(wa) if not torch.equal(wa[k], wb[k])), None)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (base, new))
    eval_diff = next((k for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k) and "_s" not in k), None)
    return {"steps": len(b), "losses": loss_diff, "weights": weight_diff, "eval": eval_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit before the restructuring")
    parser.add_argument("--out", help="write the comparison as JSON here")
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated runs")
    args = parser.parse_args()
    names = args.only.split(",")
    if unknown := sorted(set(names) - set(RUNS)):
        parser.error(f"unknown --only {unknown}: choose from {', '.join(RUNS)}")
    work = Path(tempfile.mkdtemp(prefix="same_numbers-"))
    base_tree = work / "base"
    try:
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        shards = build_shards(work / "data")
        started = time.time()
        run_side(base_tree, shards, work / "base_runs", names)
        run_side(REPO, shards, work / "new_runs", names)
        rows = {name: compare(work / "base_runs" / name, work / "new_runs" / name) for name in names}
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True
        )
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'run':<15} {'steps':>5}  {'losses':<12} {'weights':<12} eval   (base {args.base})")
    for name, row in rows.items():
        losses = "identical" if row["losses"] is None else f"step {row['losses']}"
        weights, evals = ("identical" if row[k] is None else row[k] for k in ("weights", "eval"))
        print(f"{name:<15} {row['steps']:>5}  {losses:<12} {weights:<12} {evals}")
    print(f"({time.time() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"base": args.base, "runs": rows}, indent=1))
    return 0 if all(v is None for r in rows.values() for k, v in r.items() if k != "steps") else 1


if __name__ == "__main__":
    sys.exit(main())
