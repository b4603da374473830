"""Helpers of the tests that run clip-train as a user would: in a subprocess, on the tiny data."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clip_train.tracking import read_metrics

REPO = str(Path(__file__).resolve().parents[1])


FAULT_RUN = str(Path(REPO) / "tests" / "fault_run.py")


def entry(faults=()) -> list[str]:
    """What follows python (or a launcher) to run clip-train: the package itself, or
    tests/fault_run.py with faults such as ("--kill-at-step", "6") installed as trainer hooks."""
    return [FAULT_RUN, *faults] if faults else ["-m", "clip_train", "train"]


def train_args(run_dir, tiny_data, *extra) -> list[str]:
    """clip-train's arguments for a run on the tiny data."""
    shards = tiny_data["shards"]
    return [
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-000000.tar",
        f"eval.zeroshot=[{{dataset: {tiny_data['classes']}, templates: ['a {{c}}', 'a {{c}} shape']}}]",
        *extra,
    ]  # fmt: skip


def train_command(run_dir, tiny_data, *extra, faults=()) -> list[str]:
    return [sys.executable, *entry(faults), *train_args(run_dir, tiny_data, *extra)]


def run_train(run_dir, tiny_data, *extra, env=None, faults=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(run_dir, tiny_data, *extra, faults=faults),
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=REPO,
    )  # fmt: skip


def losses(run_dir) -> dict[int, float]:
    # a resumed run appends: the last record of each step is the one that counts
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def start_in_own_group(cmd: list[str], **kwargs) -> subprocess.Popen:
    """A job in a process group of its own, as a scheduler starts one (killpg reaches all of it)."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, **pipes, **kwargs)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended before printing {prefix!r}: {proc.stderr.read()[-2000:]}")


def handles_signal(pid: int, signum: int) -> bool:
    """Whether the process has a handler of its own for signum (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def wait_until_handled(pid: int, signum: int = signal.SIGTERM, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not handles_signal(pid, signum):
        assert time.time() < deadline, f"process {pid} never installed a handler for signal {signum}"
        time.sleep(0.01)
