"""Memory and time of the contrastive loss: clip_train's dense and tiled InfoNCE against OpenCLIP
(and Inf-CL).

    python benchmarks/loss.py                  # N = 1,024 ... 65,536, d = 512, fp32 on the CPU
    python benchmarks/loss.py --quick          # seconds: N = 256, 512, one run each (used by the tests)
    python benchmarks/loss.py --device cuda --tf32 --impls tiled,open_clip,inf_cl --block 8192 \
        --sizes 32768,131072,524288,1048576    # what benchmarks/gpu.sh runs

Each (implementation, N) runs in a fresh process, so one size's allocations cannot flatter the
next. In that process: inputs are made (image and text embeddings [N, d] with requires_grad, and a
learnable temperature), the kernel's peak-RSS counter is reset (/proc/self/clear_refs), then
forward and backward run `--repeats` times. Reported: peak resident memory above the inputs (the
gradients included: they are part of what a loss costs), and the median forward and backward times.
A child is given an address-space limit a little under the free memory, so a size that does not
fit fails with an allocation error ("oom") instead of waking the kernel's OOM killer; once an
implementation has failed at some N, larger N are not attempted. The table's last column is the
loss value: every implementation computes the same number.

inf_cl: Inf-CL (the `inf-cl` package, Cheng et al. 2024: a Triton kernel that never holds the
logits), one direction per call, so the symmetric loss is (cal_inf_loss(s * image, text) +
cal_inf_loss(s * text, image)) / 2 with the temperature folded into the rows (its own `scale`
argument all-reduces in its backward, which needs a process group). Not importable: "not
installed". Its kernel computes the logits in TF32; --tf32 lets the others' matmuls do the same
(torch.backends.cuda.matmul.allow_tf32), so that the comparison is of the algorithms, not of the
matmul precision. On a CPU (gpu.sh --dry) it runs in Triton's interpreter (TRITON_INTERPRET=1),
with the kernel's CUDA assertions stripped (python -O) and its inline-PTX TF32 rounding as the
identity: a check of the call, not a speed.

On a GPU (--device cuda): one process per implementation runs every size, smallest first, after
an untimed warm-up at a small N (Triton's compile, cuBLAS's start-up); between sizes its cached
blocks are released, and the peak is torch.cuda.max_memory_allocated above the inputs (gradients
included). An out-of-memory error is "oom" and ends that implementation's sizes. --deadline (a
Unix time) skips a size whose run, extrapolated from the last one by N^2, would end after it, and
--max-repeat-s stops repeating a size once its runs took that long.

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

IMPLS = ("dense", "tiled", "open_clip", "inf_cl")
DEFAULT_IMPLS = "dense,tiled,open_clip"
WARMUP_N = 4096  # the untimed first run of a GPU child
NOT_INSTALLED = "not installed"
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


class _InlineAsmCall:
    """What the interpreter's builder returns for an inline-asm op: its results, by index."""

    def __init__(self, handles):
        self.handles = handles

    def get_result(self, index: int):
        return self.handles[index]


def _interpret_tf32_rounding() -> None:
    """Let Triton's interpreter run Inf-CL's kernels: their only inline PTX rounds fp32 to TF32
    (cvt.rna.tf32.f32), which the interpreter cannot execute; here it is the identity."""
    from triton.runtime import interpreter

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        if "tf32" not in asm:
            raise NotImplementedError(f"inline asm {asm!r} in Triton's interpreter")
        return _InlineAsmCall(values)

    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm


def inf_cl_loss(device_type: str):
    """Inf-CL's symmetric InfoNCE as loss(image, text, scale), or None when it is not importable."""
    if device_type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None
    if device_type == "cpu":
        _interpret_tf32_rounding()

    def loss(image, text, scale):
        # scale folded into the rows: cal_inf_loss's own scale argument all-reduces in its backward
        return (cal_inf_loss(image * scale, text) + cal_inf_loss(text * scale, image)) / 2

    return loss


def build_loss(impl: str, block: int, device_type: str):
    if impl == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss()
    if impl == "inf_cl":
        return inf_cl_loss(device_type)
    from clip_train.loss.contrastive import ContrastiveLoss

    return ContrastiveLoss("infonce", impl, block_size=block)


class Memory:
    """Peak memory above a baseline: resident set on the CPU, the caching allocator's on a GPU."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch

    def start(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS

    def sync(self) -> None:
        if self.device.type == "cuda":  # kernels are asynchronous: wait before reading a clock
            self.torch.cuda.synchronize(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def is_oom(error: BaseException) -> bool:
    # torch's allocator raises RuntimeError on ENOMEM ("can't allocate"); CUDA's says "out of memory"
    text = str(error).lower()
    return isinstance(error, MemoryError) or "alloc" in text or "out of memory" in text


def time_loss(loss_fn, n: int, args, device) -> dict:
    """Forward + backward `args.repeats` times (fewer past --max-repeat-s) on fresh [n, d] inputs."""
    import torch

    generator = torch.Generator().manual_seed(n)
    image = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=generator), dim=-1)
    image, text = image.to(device).requires_grad_(True), text.to(device).requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    memory = Memory(device)
    memory.start()
    forward_s, backward_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = loss_fn(image, text, log_scale.exp())
        memory.sync()
        middle = time.perf_counter()
        loss.backward()
        memory.sync()
        forward_s.append(middle - start)
        backward_s.append(time.perf_counter() - middle)
        value = loss.item()
        del loss
        image.grad = text.grad = log_scale.grad = None
        if sum(forward_s) + sum(backward_s) > args.max_repeat_s:
            break
    return {
        "status": "ok",
        "peak_mib": memory.peak() / 2**20,
        "forward_s": statistics.median(forward_s),
        "backward_s": statistics.median(backward_s),
        "total_s": statistics.median(f + b for f, b in zip(forward_s, backward_s)),
        "runs": len(forward_s),
        "loss": value,
    }


def run_child(impl: str, sizes: list[int], args) -> None:
    """Measure `sizes` in this process, printing one JSON row per size (see the module docstring)."""
    import torch

    device = torch.device(args.device)
    if device.type == "cpu":
        # Address-space cap: what is mapped now (libraries) plus the memory we may still use.
        limit = _status_kib("VmSize") * 1024 + int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    loss_fn = build_loss(impl, args.block, device.type)
    base = {"impl": impl, "dim": args.dim, "device": device.type, "threads": torch.get_num_threads()}
    if loss_fn is None:
        for n in sizes:
            print(json.dumps({**base, "n": n, "status": NOT_INSTALLED}), flush=True)
        return
    if device.type == "cuda":
        warmup = argparse.Namespace(**{**vars(args), "repeats": 1})
        time_loss(loss_fn, min(WARMUP_N, sizes[0]), warmup, device)
    last = None
    for i, n in enumerate(sizes):
        row = {**base, "n": n}
        needs = last["total_s"] * (n / last["n"]) ** 2 if last else 0.0
        if args.deadline and time.time() + needs > args.deadline:
            print(json.dumps({**row, "status": f"skipped (time budget: needs ~{needs:.0f} s)"}), flush=True)
            continue
        try:
            last = {**row, **time_loss(loss_fn, n, args, device)}
        except (RuntimeError, MemoryError) as error:
            if not is_oom(error):
                raise
            oom = {**row, "status": "oom"}
            if device.type == "cpu":
                oom["cap_gib"] = args.cap_gib
            print(json.dumps(oom), flush=True)
            for later in sizes[i + 1 :]:
                skipped = {**base, "n": later, "status": "skipped (failed at a smaller N)"}
                print(json.dumps(skipped), flush=True)
            return
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next size starts from what its own inputs need
        print(json.dumps(last), flush=True)


def measure(impl: str, sizes: list[int], args) -> list[dict]:
    """Rows of `sizes` from one child process (Inf-CL's on a CPU with asserts stripped: -O)."""
    optimize = ["-O"] if impl == "inf_cl" and args.device == "cpu" else []
    command = [
        sys.executable, *optimize, __file__, "--child", impl, ",".join(map(str, sizes)),
        "--dim", str(args.dim), "--repeats", str(args.repeats), "--block", str(args.block),
        "--cap-gib", str(args.cap_gib), "--device", args.device, "--max-repeat-s", str(args.max_repeat_s),
        "--deadline", str(args.deadline or 0), *(["--tf32"] if args.tf32 else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        # Killed anyway (e.g. by the OOM killer) or crashed: record it, do not abort the table.
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        measured = {r["n"] for r in rows}
        failed = {"impl": impl, "dim": args.dim, "status": f"failed: {tail}"}
        rows += [{**failed, "n": n} for n in sizes if n not in measured]
    return rows


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help=f"some of {','.join(IMPLS)}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=1024, help="tile size of the tiled loss")
    parser.add_argument(
        "--cap-gib", type=float, default=None, help="memory a child may use (default: free - 2 GiB)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (as Inf-CL's kernel), on a GPU")
    parser.add_argument(
        "--max-repeat-s", type=float, default=float("inf"), help="stop repeating a size after this long"
    )
    parser.add_argument(
        "--deadline", type=float, default=0.0, help="a Unix time: skip sizes that would end after it"
    )
    parser.add_argument("--quick", action="store_true", help="N = 256, 512, one repeat: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/loss.json")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SIZES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cap_gib is None:
        args.cap_gib = max(_mem_available() - 2 * GIB, GIB) / GIB
    if args.quick:
        args.sizes, args.repeats = "256,512", 1
    args.impls = [i.strip() for i in args.impls.split(",")]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown --impls {unknown}: choose from {', '.join(IMPLS)}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: comma-separated integers")
    if min(args.sizes) < 1 or args.repeats < 1 or args.block < 1:
        parser.error("--sizes, --repeats and --block must be at least 1")
    return args


def collect_rows(args) -> list[dict]:
    """On a CPU a fresh process per (implementation, N); on a GPU one per implementation."""
    rows: list[dict] = []
    if args.device == "cuda":
        for impl in args.impls:
            for row in measure(impl, args.sizes, args):
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
        rows.sort(key=lambda r: (r["n"], args.impls.index(r["impl"])))
    else:
        failed: dict[str, str] = {}  # implementation -> what later sizes are marked
        for n in args.sizes:
            for impl in args.impls:
                if impl in failed:
                    row = {"impl": impl, "n": n, "dim": args.dim, "status": failed[impl]}
                else:
                    row = measure(impl, [n], args)[0]
                if row["status"] != "ok":
                    absent = row["status"] == NOT_INSTALLED
                    failed[impl] = NOT_INSTALLED if absent else "skipped (failed at a smaller N)"
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
    for row in rows:
        if row["status"] != "ok" and row["status"] != NOT_INSTALLED:
            row["needs_gib_extrapolated"] = extrapolated_gib(rows, row["impl"], row["n"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        impl, sizes = args.child
        run_child(impl, [int(n) for n in sizes.split(",")], args)
        return 0
    rows = collect_rows(args)
    print()
    print(format_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "dim": args.dim,
        "repeats": args.repeats,
        "max_repeat_s": args.max_repeat_s if math.isfinite(args.max_repeat_s) else None,
        "block": args.block,
        "cap_gib": args.cap_gib if args.device == "cpu" else None,
        "dtype": "float32",
        "device": args.device,
        "tf32": args.tf32,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
