"""The points where code outside the trainer may act on a run: fault injection in the tests
(tests/fault_run.py), and extensions that must see every step.

    class Stop(TrainHooks):
        def on_step_end(self, trainer, step):
            ...

    clip_train.train.main(cfg, hooks=Stop())

The default does nothing; the loop calls each hook at the same point whatever the settings
(accumulated or not, one process or many).
"""

from __future__ import annotations

import torch


class TrainHooks:
    def on_step_start(self, trainer, step: int) -> None:
        """Before the batches of `step` (counted from 1) are read."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of `step` before its backward pass; what it returns is
        backpropagated. Accumulated steps call it once, on the loss over the whole batch."""
        return loss

    def on_step_end(self, trainer, step: int) -> None:
        """After `step` is counted, evaluated and checkpointed (when due), before a preemption stop."""
