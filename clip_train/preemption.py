"""Preemption: a scheduler's SIGTERM or SIGUSR1 becomes a checkpoint at the next step boundary,
then exit code 75 (EX_TEMPFAIL), which launch scripts turn into a requeue.

The handler only sets a flag; the trainer reads it at each step boundary (agreed across ranks).
clip-train installs it before anything heavy is imported, so a signal during start-up is not lost.

Loader workers ignore both signals. Schedulers stop a job by signalling every process of it
(`timeout`, systemd and SLURM's scancel signal the group or cgroup; torchrun signals each rank's
process group), and a worker that died of it would take the run down before the main process could
checkpoint. The main process still ends its workers itself, through the loader's shutdown.
"""

from __future__ import annotations

import os
import signal

EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []  # names of the signals received by this process, in order


class Preempted(Exception):
    """The run stopped after a preemption signal (checkpointed); resume: auto continues it."""


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if not _received:
        rank = os.environ.get("RANK", "0")
        print(f"rank {rank}: got {name}: checkpointing at the next step boundary", flush=True)
    _received.append(name)


def install() -> None:
    """Route the preemption signals to the flag (idempotent; main thread only, as any handler)."""
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def requested() -> bool:
    return bool(_received)


def signal_name() -> str:
    return _received[0] if _received else ""


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave the preemption signals to the main process."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
