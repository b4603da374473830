"""Memory and time of the contrastive loss: clip_train's dense and tiled InfoNCE against OpenCLIP.

    python benchmarks/loss.py                  # N = 1,024 ... 65,536, d = 512, fp32 on the CPU
    python benchmarks/loss.py --quick          # seconds: N = 256, 512, one run each (used by the tests)

Each (implementation, N) runs in a fresh process, so one size's allocations cannot flatter the
next. In that process: inputs are made (image and text embeddings [N, d] with requires_grad, and a
learnable temperature), the kernel's peak-RSS counter is reset (/proc/self/clear_refs), then
forward and backward run `--repeats` times. Reported: peak resident memory above the inputs (the
gradients included: they are part of what a loss costs), and the median forward and backward times.
A child is given an address-space limit a little under the free memory, so a size that does not
fit fails with an allocation error ("oom") instead of waking the kernel's OOM killer; once an
implementation has failed at some N, larger N are not attempted. The table's last column is the
loss value: every implementation computes the same number.

Writes the table to stdout and everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("dense", "tiled", "open_clip")
GIB = 1024**3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def run_child(impl: str, n: int, dim: int, repeats: int, block: int, cap_bytes: int) -> dict:
    """One measurement, in this (fresh) process. Returns a JSON-able row."""
    import torch

    from clip_train.loss.contrastive import ContrastiveLoss

    # Address-space cap: what is mapped now (libraries) plus the memory we may still use.
    limit = _status_kib("VmSize") * 1024 + cap_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if impl == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        loss_fn = OpenClipLoss()
    else:
        loss_fn = ContrastiveLoss("infonce", impl, block_size=block)
    row = {"impl": impl, "n": n, "dim": dim, "threads": torch.get_num_threads()}
    try:
        generator = torch.Generator().manual_seed(n)
        image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        image.requires_grad_(True)
        text.requires_grad_(True)
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        inputs_rss = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        forward_s, backward_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            loss = loss_fn(image, text, log_scale.exp())
            middle = time.perf_counter()
            loss.backward()
            forward_s.append(middle - start)
            backward_s.append(time.perf_counter() - middle)
            value = loss.item()
            del loss
            image.grad = text.grad = log_scale.grad = None
        peak = _status_kib("VmHWM") * 1024 - inputs_rss
    except (RuntimeError, MemoryError) as error:  # torch's allocator raises RuntimeError on ENOMEM
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        return {**row, "status": "oom", "cap_gib": cap_bytes / GIB}
    return {
        **row,
        "status": "ok",
        "peak_mib": peak / 2**20,
        "forward_s": statistics.median(forward_s),
        "backward_s": statistics.median(backward_s),
        "total_s": statistics.median(f + b for f, b in zip(forward_s, backward_s)),
        "loss": value,
    }


def measure(impl: str, n: int, args) -> dict:
    command = [
        sys.executable, __file__, "--child", impl, str(n),
        "--dim", str(args.dim), "--repeats", str(args.repeats), "--block", str(args.block),
        "--cap-gib", str(args.cap_gib),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        # Killed anyway (e.g. by the OOM killer) or crashed: record it, do not abort the table.
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "n": n, "dim": args.dim, "status": f"failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolated_gib(rows: list[dict], impl: str, n: int) -> float | None:
    """Peak at n by N^2 scaling from the largest size this implementation ran at."""
    ran = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
    if not ran:
        return None
    last = max(ran, key=lambda r: r["n"])
    return last["peak_mib"] / 1024 * (n / last["n"]) ** 2


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'N':>7}  {'impl':<9}  {'peak MiB':>9}  {'forward s':>9}  {'backward s':>10}  {'total s':>8}  loss",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"{r['n']:>7}  {r['impl']:<9}  {r['peak_mib']:>9.1f}  {r['forward_s']:>9.3f}  "
                f"{r['backward_s']:>10.3f}  {r['total_s']:>8.3f}  {r['loss']:.5f}"
            )
        else:
            note = r["status"]
            if r.get("needs_gib_extrapolated"):
                note += f" (needs ~{r['needs_gib_extrapolated']:.1f} GiB by N^2 scaling)"
            lines.append(f"{r['n']:>7}  {r['impl']:<9}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=1024, help="tile size of the tiled loss")
    parser.add_argument(
        "--cap-gib", type=float, default=None, help="memory a child may use (default: free - 2 GiB)"
    )
    parser.add_argument("--quick", action="store_true", help="N = 256, 512, one repeat: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/loss.json")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cap_gib is None:
        args.cap_gib = max(_mem_available() - 2 * GIB, GIB) / GIB
    if args.child:
        impl, n = args.child
        row = run_child(impl, int(n), args.dim, args.repeats, args.block, int(args.cap_gib * GIB))
        print(json.dumps(row))
        return 0
    if args.quick:
        args.sizes, args.repeats = "256,512", 1
    impls = [i.strip() for i in args.impls.split(",")]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown --impls {unknown}: choose from {', '.join(IMPLS)}")
    sizes = [int(s) for s in args.sizes.split(",")]

    rows: list[dict] = []
    failed: set[str] = set()
    for n in sizes:
        for impl in impls:
            if impl in failed:
                row = {"impl": impl, "n": n, "dim": args.dim, "status": "skipped (failed at a smaller N)"}
            else:
                row = measure(impl, n, args)
            if row["status"] != "ok":
                failed.add(impl)
                row["needs_gib_extrapolated"] = extrapolated_gib(rows, impl, n)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)

    print()
    print(format_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "dim": args.dim,
        "repeats": args.repeats,
        "block": args.block,
        "cap_gib": args.cap_gib,
        "dtype": "float32",
        "device": "cpu",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
