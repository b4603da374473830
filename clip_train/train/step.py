"""One optimizer step's gradient, as a function of its inputs: plain or accumulated backward, the
gradient norm, and the guard that skips steps whose loss or gradient is not finite."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from clip_train.accumulation import accumulated_backward


@dataclass
class Gradients:
    loss: torch.Tensor  # the contrastive loss over the step's whole batch
    grad_norm: torch.Tensor  # before clipping
    finite: bool  # this process's loss and gradient (fp16: the loss only, see compute_gradients)


def compute_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[tuple],
    loss_fn: Callable[..., torch.Tensor],
    accelerator: Accelerator,
    *,
    grad_clip: float,
    precision: str,
) -> Gradients:
    """Fill the parameters' .grad with the gradient of loss_fn over all micro-batches joined
    (one micro-batch: an ordinary backward; several: accumulated_backward, exactly one big batch),
    then clip it to grad_clip (0 = no clipping)."""
    if len(micro_batches) == 1:
        with accelerator.autocast():
            loss = loss_fn(*model(*micro_batches[0]))
        accelerator.backward(loss)
    else:
        loss = accumulated_backward(
            model,
            micro_batches,
            loss_fn,
            autocast=accelerator.autocast,
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
        )
    # The norm is needed to see a non-finite gradient even without clipping (max_norm inf).
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    # Under fp16 the GradScaler itself skips steps with non-finite gradients and lowers its
    # scale (optimizer.step must still run for that); only a non-finite loss is ours to skip.
    bad_grad = precision != "fp16" and not torch.isfinite(grad_norm).item()
    return Gradients(loss, grad_norm, torch.isfinite(loss).item() and not bad_grad)


class NonFiniteGuard:
    """Counts consecutive skipped steps and stops the run when there are too many in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def passed(self) -> None:
        self.consecutive = 0

    def skipped(self, step: int) -> None:
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite steps up to step {step}: lower "
                "optim.lr or use train.precision=fp32 (resume: auto restarts from the last checkpoint)"
            )


def apply_update(optimizer, scheduler, model) -> None:
    """The optimizer and schedule step of a step whose gradient is finite on every rank."""
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()
