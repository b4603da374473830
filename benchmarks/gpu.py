"""benchmarks/gpu.sh's driver: training, the loss and zero-shot evaluation on one GPU, side by side
with OpenCLIP, in one time budget.

    bash benchmarks/gpu.sh                 # on a machine with one NVIDIA GPU (see benchmarks/README-gpu.md)
    bash benchmarks/gpu.sh --dry           # every stage at tiny size on the CPU (run by the tests)

Stages, in this order, each a child process (a failure or a timeout is a row, not the end):

1. shards (beside the loss stage, which leaves the CPU idle): gpu_shards.py writes 4,096 synthetic
   image-caption pairs at 256 px with clip_train's own shard writer; both trainers read them.
2. loss: benchmarks/loss.py --device cuda: tiled InfoNCE (clip_train), OpenCLIP's ClipLoss and
   Inf-CL at N = 32k, 128k, 512k, 1M, d = 512, forward + backward, peak memory and time.
3. training, eager: for ViT-B/32 and ViT-B/16 at batch 256 and 512 per GPU, bf16: clip_train's
   model-only step and its real trainer on the shards (benchmarks/gpu_train.py), then OpenCLIP's
   `open_clip_train.main` with the same architecture (its own ViT-B-32 / ViT-B-16), batch,
   precision (amp_bf16), optimizer settings, workers and shards.
4. evaluation: benchmarks/eval.py --arch openclip:ViT-B-32 on 1,000 generated 256 px JPEGs with
   the 80 ImageNet templates, bf16: clip_train's evaluator against OpenCLIP's loop, images/s.
5. training, compiled: the same cells with train.compile (inductor) and OpenCLIP's --torchcompile,
   the ViT-B/16 at batch 512 first (the cell of the MFU goal), while the budget lasts.

Every child gets a deadline from --budget (seconds for the whole script): a cell that would not
end before it is skipped and says so. Results: --out (JSON, with each child's rows and the
environment) and a table on stdout with the issue's goals (training >= 1.3x OpenCLIP's samples/s,
ViT-B/16 MFU >= 40%, the loss at N = 1M in <= 8 GiB and no slower than Inf-CL) marked as reached
or not: whatever the figures are, they are reported.

--dry: the same stages and code paths at tiny size on the CPU: 64 pairs at 64 px, a 2-block ViT
and BERT (benchmarks/train.py's quick model, given to OpenCLIP as a local-dir model), batch 8,
fp32, N = 256 for the loss, 10 images and 2 templates for the evaluation (--arch
openclip:ViT-B-32 still: the architectures' build path), torch.compile with the aot_eager backend
(the same graph capture, no C++ compile). Its figures mean nothing.

Only the standard library at module level: the OpenCLIP child (--openclip-child) runs this file
where clip_train's webdataset is shadowed by OpenCLIP's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import train as bench_train  # noqa: E402 - benchmarks/train.py: stdlib at module level

ARCHS = ("ViT-B-32", "ViT-B-16")
BATCHES = (256, 512)
# the compiled cells, most wanted first: the ViT-B/16 at 512 is the MFU goal's
COMPILED_ORDER = (("ViT-B-16", 512), ("ViT-B-32", 512), ("ViT-B-16", 256), ("ViT-B-32", 256))
STEPS, SKIP, LOG_EVERY = 48, 16, 8
MODES = ("model_only", "pipeline")  # gpu_train.py's measurements of one cell
DRY = {"steps": 8, "skip": 4, "log_every": 2, "batch": 8, "workers": 2, "compile_backend": "aot_eager"}
COMPILE_BACKEND_ENV = "CLIP_TRAIN_GPU_BENCH_COMPILE_BACKEND"
LOSS_SIZES = "32768,131072,524288,1048576"
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 (the figure)
GOALS = {"train_ratio": 1.3, "b16_mfu": 0.40, "loss_1m_gib": 8.0}
# the shares of --budget by which each stage must end
STAGE_END = {"loss": 0.22, "eager": 0.62, "eval": 0.72, "compiled": 1.0}
OPENCLIP_MIN_S = {False: 25, True: 70}  # an OpenCLIP cell is not started with less left


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    def end_of(self, stage: str) -> float:
        return self.start + self.seconds * STAGE_END[stage]

    def left(self, stage: str) -> float:
        return self.end_of(stage) - time.time()


def run_logged(command: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run a child with its output in `log`; {status, wall_s}, never raising."""
    start = time.perf_counter()
    env = {**bench_train.child_env(), **(env or {})}
    try:
        with open(log, "w") as out:
            code = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=max(timeout, 1)
            ).returncode
        status = "ok" if code == 0 else f"failed (exit {code}): {tail(log)}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    return {"status": status, "wall_s": time.perf_counter() - start, "log": log.name}


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])


# ---- stages --------------------------------------------------------------------------------------


def start_shards(opts) -> subprocess.Popen:
    samples, size, shard_size = (64, 64, 16) if opts.dry else (4096, 256, 128)
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
        "from gpu_shards import build_shards;"
        f"print(json.dumps(build_shards(Path({str(opts.work / 'shards')!r}), {samples}, {size}, {shard_size},"
        f" {opts.cpus})))"
    )
    log = open(opts.work / "shards.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def loss_stage(opts, budget: Budget) -> dict:
    """One loss.py child per implementation, each with an equal share of the stage's time: on the
    GPU one child runs all its sizes, and the first would otherwise take the whole stage."""
    impls = ("tiled", "open_clip", "inf_cl")
    share = budget.left("loss") / len(impls)
    rows, statuses, wall = [], {}, 0.0
    for index, impl in enumerate(impls):
        out = opts.work / f"loss-{impl}.json"
        command = [sys.executable, "benchmarks/loss.py", "--impls", impl, "--out", str(out)]
        if opts.dry:
            command += ["--device", "cpu", "--sizes", "256", "--repeats", "1"]
        else:
            deadline = budget.end_of("loss") - share * (len(impls) - 1 - index)
            command += ["--device", "cuda", "--tf32", "--block", "8192", "--sizes", LOSS_SIZES]
            command += ["--repeats", "2", "--max-repeat-s", "10", "--deadline", str(deadline)]
        result = run_logged(command, opts.work / f"loss-{impl}.log", share + 30)
        statuses[impl], wall = result["status"], wall + result["wall_s"]
        rows += json.loads(out.read_text()).get("rows", []) if out.exists() else []
    ok = all(status == "ok" for status in statuses.values())
    return {"status": "ok" if ok else json.dumps(statuses), "wall_s": wall, "rows": rows}


def model_sections(opts) -> dict:
    """arch -> (clip_train's model section, OpenCLIP's --model)."""
    if not opts.dry:
        return {arch: ({"arch": f"openclip:{arch}"}, arch) for arch in ARCHS}
    folders = bench_train.build_model_folders(bench_train.ARCHS["quick"], opts.work / "dry_model")
    return {"ViT-B-32": ({"init_from": folders["clip_train_dir"]}, f"local-dir:{folders['openclip_dir']}")}


def clip_train_cell(opts, budget, stage, arch, model, batch, compile_) -> list[dict]:
    rows = opts.work / f"rows-{arch}-b{batch}-c{int(compile_)}.jsonl"
    if budget.left(stage) <= 0:
        row = {"arch": arch, "side": "clip_train", "batch": batch, "compile": compile_}
        return [{**row, "mode": mode, "status": "skipped (time budget: 0 s left)"} for mode in MODES]
    steps = DRY if opts.dry else {"steps": STEPS, "skip": SKIP, "log_every": LOG_EVERY}
    command = [
        sys.executable, "benchmarks/gpu_train.py", "--label", arch, "--model", json.dumps(model),
        "--shards", opts.shards, "--batches", str(batch), "--compile", "on" if compile_ else "off",
        "--precision", opts.precision, "--workers", str(opts.workers), "--steps", str(steps["steps"]),
        "--skip", str(steps["skip"]), "--log-every", str(steps["log_every"]),
        "--deadline", str(budget.end_of(stage)), "--work", str(opts.work / "runs"), "--rows", str(rows),
        "--peak-flops", str(opts.peak_flops),
    ]  # fmt: skip
    if opts.dry:
        command += ["--compile-backend", DRY["compile_backend"], "--model-steps", "2", "--model-warmup", "1"]
        command += ["--min-seconds-scale", "0"]
    result = run_logged(command, opts.work / f"{rows.stem}.log", budget.left(stage) + 20)
    found = [json.loads(line) for line in rows.read_text().splitlines()] if rows.exists() else []
    if result["status"] != "ok" or not found:
        done = {row["mode"] for row in found}
        row = {"arch": arch, "side": "clip_train", "batch": batch, "compile": compile_, **result}
        found += [{**row, "mode": mode} for mode in MODES if mode not in done]
    return found


def openclip_argv(opts, arch_name: str, batch: int, compile_: bool, name: str) -> list[str]:
    steps = DRY["steps"] if opts.dry else STEPS
    log_every = DRY["log_every"] if opts.dry else LOG_EVERY
    optim = bench_train.OPTIM
    argv = [
        "--train-data", opts.shards, "--train-num-samples", str(steps * batch),
        "--dataset-type", "webdataset", "--dataset-resampled", "--batch-size", str(batch),
        "--workers", str(opts.workers), "--epochs", "1",
        "--lr", str(optim["lr"]), "--beta1", str(optim["beta1"]), "--beta2", str(optim["beta2"]),
        "--eps", str(optim["eps"]), "--wd", str(optim["weight_decay"]), "--warmup", "10",
        "--lr-scheduler", "cosine", "--grad-clip-norm", str(optim["grad_clip"]),
        "--precision", {"bf16": "amp_bf16", "fp32": "fp32"}[opts.precision], "--model", arch_name,
        "--logs", str(opts.work / "openclip_logs"), "--name", name, "--seed", "0",
        "--log-every-n-steps", str(log_every), "--report-to", "",
    ]  # fmt: skip
    if opts.dry:
        argv += ["--device", "cpu"]
    return argv + (["--torchcompile"] if compile_ else [])


def openclip_cell(opts, budget, stage, arch, arch_name, batch, compile_) -> dict:
    row = {"arch": arch, "side": "open_clip", "mode": "pipeline", "batch": batch, "compile": compile_}
    left = budget.left(stage)
    if left < OPENCLIP_MIN_S[compile_] * (0 if opts.dry else 1):
        return {**row, "status": f"skipped (time budget: {max(left, 0):.0f} s left)"}
    name = f"{arch}-b{batch}-c{int(compile_)}"
    argv = openclip_argv(opts, arch_name, batch, compile_, name)
    env = {"PYTHONPATH": opts.openclip_pythonpath} if opts.openclip_pythonpath else {}
    if opts.dry:
        env[COMPILE_BACKEND_ENV] = DRY["compile_backend"]
    command = [opts.openclip_python, str(BENCH / "gpu.py"), "--openclip-child", *argv]
    log = opts.work / f"openclip-{name}.log"
    result = run_logged(command, log, left + 20, env)
    row.update(result)
    if result["status"] != "ok":
        return row
    skip = DRY["skip"] if opts.dry else SKIP
    logged = {step: values["step_s"] for step, values in bench_train.parse_openclip_log(log, batch).items()}
    logged[0] = 0.0
    import gpu_train  # benchmarks/: stdlib at module level

    try:
        row.update(gpu_train.windows_rate(logged, skip, batch))
    except RuntimeError as error:
        row["status"] = f"failed: {error}"
    shutil.rmtree(opts.work / "openclip_logs" / name, ignore_errors=True)  # its checkpoint is GBs
    return row


def train_cells(opts, budget, stage, cells, models) -> list[dict]:
    rows = []
    for arch, batch, compile_ in cells:
        model, arch_name = models[arch]
        ours = clip_train_cell(opts, budget, stage, arch, model, batch, compile_)
        theirs = openclip_cell(opts, budget, stage, arch, arch_name, batch, compile_)
        rows += ours + [theirs]
        for row in ours + [theirs]:
            shown = f"{row['samples_per_s']:.1f} samples/s" if "samples_per_s" in row else row["status"]
            print(
                f"  {row['side']:10} {arch} {row.get('mode', '')} b{batch} compile={compile_}: {shown}",
                flush=True,
            )
    return rows


def eval_stage(opts, budget: Budget) -> dict:
    out = opts.work / "eval.json"
    command = [sys.executable, "benchmarks/eval.py", "--arch", "openclip:ViT-B-32", "--out", str(out)]
    if opts.dry:
        templates = opts.work / "templates.txt"
        templates.write_text("a photo of a {}.\na drawing of a {}.\n")
        command += [
            "--generate",
            "1",
            "--generate-size",
            "64",
            "--device",
            "cpu",
            "--templates",
            str(templates),
        ]
        command += ["--repeats", "1", "--batch-size", "8"]
    else:
        command += ["--generate", "100", "--generate-size", "256", "--device", "cuda", "--precision", "bf16"]
        command += ["--batch-size", "256", "--repeats", "2", "--workers", str(min(opts.workers, 8))]
        command += ["--top1-tolerance", "0.05"]
    result = run_logged(command, opts.work / "eval.log", budget.left("eval") + 20)
    return {**result, "result": json.loads(out.read_text()) if out.exists() else None}


# ---- the report ----------------------------------------------------------------------------------


def pair_rows(train_rows: list[dict]) -> list[dict]:
    """One line per (arch, batch, compile): clip_train's model-only and pipeline rates, OpenCLIP's."""
    cells: dict[tuple, dict] = {}
    for row in train_rows:
        key = (row["arch"], row["batch"], row["compile"])
        cell = cells.setdefault(key, {"arch": key[0], "batch": key[1], "compile": key[2]})
        name = "open_clip" if row["side"] == "open_clip" else row.get("mode", "clip_train")
        cell[name] = row.get("samples_per_s")
        cell[f"{name}_status"] = row.get("status")
        if row["side"] == "clip_train" and row.get("mfu") is not None:
            cell[f"{name}_mfu"] = row["mfu"]
    for cell in cells.values():
        if cell.get("pipeline") and cell.get("open_clip"):
            cell["ratio"] = cell["pipeline"] / cell["open_clip"]
    return list(cells.values())


def loss_against_inf_cl(loss_rows: list[dict]) -> dict | None:
    """Tiled InfoNCE against Inf-CL at the largest N both measured."""
    ok = {(row["impl"], row["n"]): row for row in loss_rows if row.get("status") == "ok"}
    both = [n for impl, n in ok if impl == "tiled" and ("inf_cl", n) in ok]
    if not both:
        return None
    n = max(both)
    tiled, inf_cl = ok[("tiled", n)], ok[("inf_cl", n)]
    return {
        "n": n,
        "time_ratio": inf_cl["total_s"] / tiled["total_s"],
        "memory_ratio": inf_cl["peak_mib"] / tiled["peak_mib"],
    }


def goals(lines: list[dict], loss_rows: list[dict]) -> dict:
    ratios = [line["ratio"] for line in lines if "ratio" in line]
    b16 = [line.get("model_only_mfu") or 0 for line in lines if line["arch"] == "ViT-B-16"]
    tiled_1m = [
        row
        for row in loss_rows
        if row["impl"] == "tiled" and row["n"] == 1048576 and row.get("status") == "ok"
    ]
    gib = tiled_1m[0]["peak_mib"] / 1024 if tiled_1m else None
    peer = loss_against_inf_cl(loss_rows)
    return {
        "train_ratio_min": min(ratios) if ratios else None,
        "train_ratio_reached": bool(ratios) and min(ratios) >= GOALS["train_ratio"],
        "b16_mfu_best": max(b16) if b16 else None,
        "b16_mfu_reached": bool(b16) and max(b16) >= GOALS["b16_mfu"],
        "loss_1m_gib": gib,
        "loss_vs_inf_cl": peer,  # Inf-CL's time / tiled's at the largest N both ran
        "loss_1m_reached": gib is not None
        and gib <= GOALS["loss_1m_gib"]
        and peer is not None
        and peer["time_ratio"] >= 1,
    }


def fmt(value, spec: str = ".0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def reached(flag: bool) -> str:
    return "reached" if flag else "not reached"


def train_lines(table: list[dict]) -> list[str]:
    out = ["training, samples/s per GPU (MFU of the model-only step)"]
    head = ("arch", "batch", "compile", "model-only", "pipeline", "OpenCLIP", "ratio")
    out.append("{:9} {:>5} {:>7} {:>16} {:>9} {:>9} {:>6}".format(*head))
    for line in table:
        model_only = f"{fmt(line.get('model_only'))} ({fmt(line.get('model_only_mfu'), '.0%')})"
        cells = (line["arch"], line["batch"], str(line["compile"]), model_only, fmt(line.get("pipeline")))
        cells += (fmt(line.get("open_clip")), fmt(line.get("ratio"), ".2f"))
        out.append("{:9} {:5} {:>7} {:>16} {:>9} {:>9} {:>6}".format(*cells))
    return out


def loss_lines(rows: list[dict]) -> list[str]:
    out = ["loss, forward + backward (d = 512)", f"{'N':>8} {'impl':10} {'peak GiB':>9} {'s':>8}  status"]
    for row in rows:
        gib = row["peak_mib"] / 1024 if "peak_mib" in row else None
        cells = (row["n"], row["impl"], fmt(gib, ".2f"), fmt(row.get("total_s"), ".3f"), row["status"])
        out.append("{:8} {:10} {:>9} {:>8}  {}".format(*cells))
    return out


def format_report(result: dict) -> str:
    out = train_lines(result["train_table"]) + [""] + loss_lines(result["loss"]["rows"])
    evaluation = (result["eval"] or {}).get("result") or {}
    rates = ", ".join(f"{k} {v['images_per_s']:.0f}" for k, v in evaluation.get("sides", {}).items())
    out += ["", f"zero-shot evaluation, images/s: {rates}"]
    if evaluation.get("ratio"):
        out.append(
            "  clip_train / OpenCLIP: " + ", ".join(f"{k} {v:.2f}x" for k, v in evaluation["ratio"].items())
        )
    g = result["goals"]
    versus = g["loss_vs_inf_cl"]
    peer = f"{versus['time_ratio']:.2f}x at N = {versus['n']}" if versus else "not compared"
    out += [
        "",
        f"goals: training >= {GOALS['train_ratio']}x OpenCLIP: {fmt(g['train_ratio_min'], '.2f')} (lowest) "
        f"{reached(g['train_ratio_reached'])}; ViT-B/16 MFU >= {GOALS['b16_mfu']:.0%}: "
        f"{fmt(g['b16_mfu_best'], '.1%')} {reached(g['b16_mfu_reached'])}; loss at 1M <= "
        f"{GOALS['loss_1m_gib']} GiB and no slower than Inf-CL: {fmt(g['loss_1m_gib'], '.2f')} GiB, "
        f"Inf-CL / tiled time {peer}: {reached(g['loss_1m_reached'])}",
    ]
    return "\n".join(out)


def environment() -> dict:
    import importlib.metadata

    versions = {}
    for name in ("torch", "timm", "transformers", "accelerate", "webdataset", "open_clip_torch", "inf-cl"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True,
    ).stdout.strip() if shutil.which("nvidia-smi") else None  # fmt: skip
    return {"gpu": gpu, "python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions}


# ---- main ----------------------------------------------------------------------------------------


def openclip_child(argv: list[str]) -> int:
    """OpenCLIP's trainer in this process, after the dry mode's timm model is registered."""
    bench_train.register_timm_models()
    backend = os.environ.get(COMPILE_BACKEND_ENV)
    if backend:  # --dry: OpenCLIP's --torchcompile with clip_train's dry backend, not inductor's C++ build
        import functools

        import torch

        torch.compile = functools.partial(torch.compile, backend=backend)
    from open_clip_train.main import main as openclip_main

    return 1 if openclip_main(argv) not in (None, 0) else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="every stage at tiny size on the CPU")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole script")
    parser.add_argument("--stages", default="loss,eager,eval,compiled")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clip_train_gpu"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.json")
    parser.add_argument("--openclip-python", default=sys.executable, help="a python with open_clip_train")
    parser.add_argument("--openclip-pythonpath", default="", help="its PYTHONPATH (OpenCLIP's webdataset)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per trainer")
    parser.add_argument("--peak-flops", type=float, default=PEAK_BF16_FLOPS)
    opts = parser.parse_args(argv)
    unknown = set(opts.stages.split(",")) - set(STAGE_END)
    if unknown or opts.budget <= 0:
        parser.error(f"--stages: some of {','.join(STAGE_END)} (not {sorted(unknown)}); --budget > 0")
    opts.cpus = os.cpu_count() or 1
    opts.workers = opts.workers or (DRY["workers"] if opts.dry else max(1, min(12, opts.cpus - 4)))
    opts.precision = "fp32" if opts.dry else "bf16"
    return opts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--openclip-child"]:
        return openclip_child(argv[1:])
    opts = parse_args(argv)
    stages = opts.stages.split(",")
    budget = Budget(opts.budget)
    shutil.rmtree(opts.work, ignore_errors=True)
    opts.work.mkdir(parents=True)
    result = {"dry": opts.dry, "budget_s": opts.budget, "environment": environment(), "goals_set": GOALS}
    shards = start_shards(opts)
    result["loss"] = loss_stage(opts, budget) if "loss" in stages else {"rows": []}
    print(f"loss stage: {result['loss'].get('status', 'not run')}", flush=True)
    if shards.wait() != 0:
        print(
            f"gpu.py: error: the shards could not be written: {tail(opts.work / 'shards.log')}",
            file=sys.stderr,
        )
        return 1
    result["shards"] = json.loads((opts.work / "shards.log").read_text().strip().splitlines()[-1])
    opts.shards = result["shards"]["pattern"]
    models = model_sections(opts)
    batches = (DRY["batch"],) if opts.dry else BATCHES
    eager = [(arch, batch, False) for batch in batches for arch in models]
    compiled = (
        [(a, DRY["batch"], True) for a in models] if opts.dry else [(a, b, True) for a, b in COMPILED_ORDER]
    )
    train_rows = train_cells(opts, budget, "eager", eager, models) if "eager" in stages else []
    result["eval"] = eval_stage(opts, budget) if "eval" in stages else None
    print(f"eval stage: {(result['eval'] or {}).get('status', 'not run')}", flush=True)
    if "compiled" in stages:
        train_rows += train_cells(opts, budget, "compiled", compiled, models)
    result["train_rows"] = train_rows
    result["train_table"] = pair_rows(train_rows)
    result["goals"] = goals(result["train_table"], result["loss"]["rows"])
    result["wall_s"] = time.time() - budget.start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    print()
    print(format_report(result))
    print(f"\nwrote {opts.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
