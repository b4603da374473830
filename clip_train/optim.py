"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from timm.models import group_parameters
from torch import nn

from clip_train.config import ConfigError, OptimConfig

# parameter prefix -> tower (the rest is the head)
TOWERS = {"visual.": "image", "text.": "text"}


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm gains/offsets and the temperature are not shrunk towards 0 (as in CLIP and
    # OpenCLIP); weight decay on logit_scale would fight the temperature it is learning.
    # Norm layers' parameters are all 1-d, so ndim < 2 catches them along with every bias.
    return param.ndim < 2 or name.endswith(".bias") or name.startswith("logit_")


def _tower_of(name: str) -> str:
    return next((tower for prefix, tower in TOWERS.items() if name.startswith(prefix)), "head")


def _text_layer_stack(text: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in text.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters())) if lists else None


def layer_depths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (depth, top depth of its tower)} for the towers' parameters.

    Image tower: timm's own parameter groups (group_matcher(coarse=False): stem 0, one per block,
    the head with the last), as timm's layer-decay helper uses. Text tower: the embeddings 0, layer
    i is i + 1; the top is the last layer, or, when parameters follow the stack (a final norm), those.
    """
    depths: dict[str, tuple[int, int]] = {}
    visual, prefix = getattr(model, "visual", None), "visual."
    if visual is not None and hasattr(visual, "towers"):
        # model.image.concat (towers.ConcatImageTowers): the extra towers are always frozen, so
        # only the first one's parameters can train and need a depth
        visual, prefix = visual.towers[0], "visual.towers.0."
    if visual is not None:
        if not hasattr(visual, "group_matcher"):
            raise ConfigError(f"{type(visual).__name__} has no timm group_matcher: set optim.layer_decay=1")
        groups = group_parameters(visual, visual.group_matcher(coarse=False))
        top = max(groups)
        for gid, names in groups.items():
            depths.update({f"{prefix}{name}": (gid, top) for name in names})
    text = getattr(model, "text", None)
    stack = _text_layer_stack(text) if text is not None else None
    if stack is not None:
        layer_of = {id(p): i + 1 for i, layer in enumerate(stack) for p in layer.parameters()}
        named = list(text.named_parameters())  # registration order: embeddings, layers, the rest
        layers = [i for i, (_, p) in enumerate(named) if id(p) in layer_of]
        # the top is the last layer, or one above it when parameters follow the stack (a final norm)
        top = len(stack) + (1 if layers and layers[-1] < len(named) - 1 else 0)
        for i, (name, p) in enumerate(named):
            if id(p) in layer_of:
                depths[f"text.{name}"] = (layer_of[id(p)], top)
            else:
                depths[f"text.{name}"] = (top if layers and i > layers[-1] else 0, top)
    return depths


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups by (tower, layer lr scale, decay or not); frozen parameters are left out.

    A tower's lr is lr x its multiplier (image_lr_mult / text_lr_mult, else tower_lr_mult) x
    layer_decay^(top depth - depth); the head (projections, temperature, bias) uses lr itself.
    """
    mults = {
        "image": cfg.tower_lr_mult if cfg.image_lr_mult is None else cfg.image_lr_mult,
        "text": cfg.tower_lr_mult if cfg.text_lr_mult is None else cfg.text_lr_mult,
        "head": 1.0,
    }
    depths = layer_depths(model) if cfg.layer_decay != 1.0 else {}
    groups: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = _tower_of(name)
        scale = mults[tower]
        if name in depths:
            depth, top = depths[name]
            scale *= cfg.layer_decay ** (top - depth)
        groups.setdefault((tower, scale, _no_decay(name, param)), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": cfg.lr * scale,
            "name": f"{tower}_{'no_decay' if no_decay else 'decay'}"
            + (f"_x{scale:.4g}" if depths and tower != "head" else ""),
        }
        for (tower, scale, no_decay), params in sorted(
            groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])
        )
    ]


def trainable_summary(model: nn.Module) -> str:
    """Trainable of all parameters per part, "image 0.00M/3.33M, text 7.10M/22.57M, head 0.43M/0.43M"."""
    counts: dict[str, list[int]] = {"image": [0, 0], "text": [0, 0], "head": [0, 0]}
    for name, param in model.named_parameters():
        entry = counts[_tower_of(name)]
        entry[0] += param.numel() if param.requires_grad else 0
        entry[1] += param.numel()
    return ", ".join(f"{tower} {t / 1e6:.2f}M/{n / 1e6:.2f}M" for tower, (t, n) in counts.items())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # fused=None (not False) when off: torch then picks its default (foreach on GPUs, a loop on CPU)
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=cfg.fused or None,
    )


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
