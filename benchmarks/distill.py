"""Distillation on the demo data: the same small student trained with and without the demo
model as its teacher, two seeds each; held-out retrieval R@1 and the zero-shot sets.

    python benchmarks/distill.py --teacher runs/demo      # the demo shards, configs/distill-demo.yaml
    python benchmarks/distill.py --dry --teacher T --shards S   # the plumbing on configs/tiny.yaml, 2 steps

Steps: `clip-data teacher` writes the teacher's embeddings into a copy of the shards (once; kept
under --work); then for each seed both arms train on those shards, `distill` with
distill.mode=offline and `plain` with distill.mode=none (the loader ignores the extra members, so
both arms read the same samples in the same order from the same initial weights). Each run is a
fresh clip-train process. Prints one row per run and the mean per arm; writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CLIP_TRAIN_CACHE", Path.home() / ".cache" / "clip_train"))
ARMS = {"plain": ["distill.mode=none"], "distill": ["distill.mode=offline"]}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _headline(results: dict) -> dict:
    """R@1 both ways and every zero-shot top-1 of a results.json."""
    keep = {}
    for key, value in results.items():
        if key.endswith(("text_retrieval_recall@1", "image_retrieval_recall@1", "/acc1")):
            keep[key] = value
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher: model folder, checkpoint or run")
    parser.add_argument("--shards", default=str(CACHE / "demo_shards"), help="the shards to distill on")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-distill")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distill.json")
    parser.add_argument("--dry", action="store_true", help="configs/tiny.yaml, 2 steps, no zero-shot")
    args = parser.parse_args(argv)
    python = [sys.executable, "-m", "clip_train"]
    shards = args.work / "teacher-shards"
    if not (shards / "stats.json").is_file():
        _run(
            [
                *python,
                "data",
                "teacher",
                "--teacher",
                args.teacher,
                "--shards",
                args.shards,
                "--out",
                str(shards),
            ]
        )
    if args.dry:
        configs = ["configs/tiny.yaml", "train.steps=2", "train.ckpt_every=0", "eval.zeroshot=[]"]
    else:
        configs = ["configs/demo.yaml", "configs/distill-demo.yaml"]
    data = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar"]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, settings in ARMS.items():
            run_dir = args.work / f"{arm}-seed{seed}"
            _run([*python, "train", *configs, f"run_dir={run_dir}", f"train.seed={seed}", *data, *settings])
            results = json.loads((run_dir / "results.json").read_text())
            rows.append({"arm": arm, "seed": seed, **_headline(results)})
    metrics = sorted({key for row in rows for key in row} - {"arm", "seed"})
    means = {
        arm: {key: statistics.mean(row[key] for row in rows if row["arm"] == arm) for key in metrics}
        for arm in ARMS
    }
    print(" | ".join(["arm", "seed", *metrics]))
    for row in rows:
        print(" | ".join([row["arm"], str(row["seed"]), *(f"{row[key]:.3f}" for key in metrics)]))
    for arm, mean in means.items():
        print(" | ".join([arm, "mean", *(f"{mean[key]:.3f}" for key in metrics)]))
    report = {"teacher": args.teacher, "shards": args.shards, "dry": args.dry, "runs": rows, "means": means}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
