"""clip-train with faults injected through the trainer's hooks: what the fault tests run.

    python tests/fault_run.py [--kill-at-step N] [--signal-at STEP:RANK] [--nan-at-steps 2,3] \
        configs/tiny.yaml key=value ...
    accelerate launch --config_file ... tests/fault_run.py --signal-at 3:1 configs/tiny.yaml ...

Everything after the fault options is clip-train's own command line. The faults act where they
would happen for real: SIGKILL right after a step (an unannounced death: no handler runs, nothing
beyond what was written survives), SIGUSR1 to one rank as it starts a step (a preemption warning
that reaches one process only), a NaN loss (the non-finite step skip, accumulated or not).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from clip_train import cli
from clip_train.train import TrainHooks


class FaultHooks(TrainHooks):
    def __init__(
        self, kill_at: int = 0, signal_at: tuple[int, int] | None = None, nan_at: set[int] = frozenset()
    ):
        self.kill_at, self.signal_at, self.nan_at = kill_at, signal_at, set(nan_at)

    def on_step_start(self, trainer, step: int) -> None:
        if self.signal_at == (step, trainer.rank):
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_loss(self, step: int, loss):
        return loss * float("nan") if step in self.nan_at else loss

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-at-step", type=int, default=0, help="SIGKILL after finishing this step")
    parser.add_argument("--signal-at", help="STEP:RANK: that rank sends itself SIGUSR1 as it starts STEP")
    parser.add_argument("--nan-at-steps", default="", help="comma-separated steps whose loss is NaN")
    faults, train_argv = parser.parse_known_args()
    signal_at = tuple(int(x) for x in faults.signal_at.split(":")) if faults.signal_at else None
    nan_at = {int(s) for s in faults.nan_at_steps.split(",") if s.strip()}
    return cli.train_main(train_argv, hooks=FaultHooks(faults.kill_at_step, signal_at, nan_at))


if __name__ == "__main__":
    sys.exit(main())
