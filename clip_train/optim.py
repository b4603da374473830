"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_train.config import OptimConfig

TOWER_PREFIXES = ("visual.", "text.")  # parameters of the (possibly pretrained) encoder towers


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm gains/offsets and the temperature are not shrunk towards 0 (as in CLIP and
    # OpenCLIP); weight decay on logit_scale would fight the temperature it is learning.
    # Norm layers' parameters are all 1-d, so ndim < 2 catches them along with every bias.
    return param.ndim < 2 or name.endswith(".bias") or name.startswith("logit_")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups at most: (tower | head) x (decay | no decay); frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (name.startswith(TOWER_PREFIXES), _no_decay(name, param))
        groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": cfg.lr * (cfg.tower_lr_mult if is_tower else 1.0),
            "name": f"{'tower' if is_tower else 'head'}_{'no_decay' if no_decay else 'decay'}",
        }
        for (is_tower, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's base lr at `step` (0-based): linear warmup, then cosine or constant.

    A pure function of the step, so resuming needs no schedule state beyond the step itself.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
