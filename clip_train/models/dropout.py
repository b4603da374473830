"""Dropout that draws its mask with torch.rand on the CPU: the same distribution, a cheaper draw.

    swap_dropout(model)   # every nn.Dropout with p > 0 becomes a MaskDropout, in place

Why: on the CPU, torch's dropout draws its mask with bernoulli_, which costs more per element than
rand + compare, and the text tower draws a mask over every activation of every layer (what it buys:
docs/performance.md). Each element is still kept with probability 1 - p (rand is uniform on [0, 1)
in steps of 2^-24) and scaled by 1 / (1 - p); the mask comes from torch's default generator, so runs
stay reproducible under torch.manual_seed and activation checkpointing (which replays the CPU RNG
state) recomputes the same masks. The masks differ from bernoulli_'s for the same seed. Other
devices keep F.dropout (cpu_tunings.mask_dropout decides): there it is one fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.models import cpu_tunings


class MaskDropout(nn.Dropout):
    """nn.Dropout whose CPU training path multiplies by a rand-drawn, pre-scaled mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or not cpu_tunings.mask_dropout(x.device) or self.p >= 1.0:
            return F.dropout(x, self.p, self.training, self.inplace)
        # the float mask (0 or 1/(1-p)) is what autograd keeps for the backward: one multiply
        scale = torch.rand(x.shape, dtype=torch.float32).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        scale = scale.to(x.dtype)
        return x.mul_(scale) if self.inplace else x * scale


def swap_dropout(model: nn.Module) -> int:
    """Turn every nn.Dropout (exactly that class, p > 0) inside model into a MaskDropout. Returns how
    many; dropout modules hold no weights, so state dicts are unchanged."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                replacement = MaskDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(module, name, replacement)
                swapped += 1
    return swapped
