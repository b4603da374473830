"""The image tower: a timm model without classifier, images [B, 3, H, W] -> pooled features.

    image = build_image_tower(cfg.model.image)   # [B, 3, H, W] -> [B, image.num_features]

Weights come only from local files or packages (models/pretrained.py); nothing here can reach a
model hub. The transforms that feed it are in models/transforms.py.
"""

from __future__ import annotations

import dataclasses
import difflib

import timm
import torch
from timm.layers import PatchDropout, freeze_batch_norm_2d
from timm.models import get_pretrained_cfg, group_modules, group_parameters
from torch import nn

from clip_train.config import ConfigError, ImageTowerConfig, concat_entry
from clip_train.models.pretrained import (
    WeightsNotFoundError,
    image_package,
    load_image_weights,
    resolve_image_weights,
)
from clip_train.models.transforms import image_normalization


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    """A timm model without classifier (forward gives pooled features), with local weights and locking;
    with cfg.concat, a ConcatImageTowers of it and the locked extra towers."""
    tower = _build_timm_tower(cfg)
    if not cfg.concat:
        return tower
    main_normalisation = image_normalization(tower, cfg)
    extras = []
    for spec in cfg.concat:
        name, weights = concat_entry(spec)
        extra_cfg = dataclasses.replace(
            cfg,
            name=name,
            pretrained=weights,
            weights_remap="",
            lock=True,
            unlocked_groups=0,
            freeze_bn_stats=True,
            concat=[],
            patch_dropout=0.0,  # locked feature extractors: their features stay those of the whole image
        )
        try:
            _check_same_normalisation(main_normalisation, extra_cfg)
            extras.append(_build_timm_tower(extra_cfg))
        except (ConfigError, WeightsNotFoundError) as e:  # they name model.image.*: say which tower
            raise ConfigError(f"model.image.concat entry {spec}: {e}") from None
    return ConcatImageTowers([tower, *extras])


def _check_same_normalisation(main: tuple, extra: ImageTowerConfig) -> None:
    """The extra towers see the main tower's input: refuse packaged weights trained on another one."""
    pkg = image_package(extra.pretrained) if extra.pretrained else None
    mean, std = main
    if pkg is not None and (tuple(mean), tuple(std)) != (pkg.mean, pkg.std):
        raise ConfigError(
            f"its weights expect mean={list(pkg.mean)} std={list(pkg.std)}, but the "
            f"towers share model.image's input (mean={mean} std={std}): concatenate towers trained "
            "with the same normalisation"
        )


class ConcatImageTowers(nn.Module):
    """Several image towers on the same input; forward gives their pooled features side by side.

    The first tower is the configured one (it may train); the others are locked (a frozen feature
    ensemble: two ImageNet towers of different sizes see different things in clip art, and a linear
    projection of both retrieves better than of either). timm-style entry points the rest of the code
    uses (pretrained_cfg for the transforms, set_grad_checkpointing) refer to the first tower.
    """

    def __init__(self, towers: list[nn.Module]):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.num_features = sum(t.num_features for t in towers)
        self.pretrained_cfg = getattr(towers[0], "pretrained_cfg", {})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.towers[0].set_grad_checkpointing(enable)  # the others are frozen: nothing to store

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(images) for tower in self.towers], dim=1)


def _build_timm_tower(cfg: ImageTowerConfig) -> nn.Module:
    pkg = image_package(cfg.pretrained) if cfg.pretrained else None
    if pkg is not None and cfg.name != pkg.timm_name:
        # the keys would load, but padding and BN eps differ, so the features would be silently wrong
        raise ConfigError(
            f"model.image.pretrained={cfg.pretrained} needs model.image.name={pkg.timm_name}, not {cfg.name}"
        )
    pcfg = get_pretrained_cfg(cfg.name)
    if pcfg is None and cfg.name not in timm.list_models():
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=1)
        hint = f"did you mean {close[0]}?" if close else "see timm.list_models()"
        raise ConfigError(f"model.image.name={cfg.name} is not a timm model: {hint}")
    kwargs = {}
    if pcfg is not None and pcfg.fixed_input_size:
        # ViT-style models size their position embeddings at build time; CNNs take any size
        kwargs["img_size"] = cfg.image_size
    model = _create_timm_model(cfg, kwargs)
    if cfg.pretrained:
        load_image_weights(model, resolve_image_weights(cfg.pretrained), cfg.weights_remap)
    if cfg.lock:
        model = lock_image_tower(model, cfg.unlocked_groups, cfg.freeze_bn_stats)
    return model


def _create_timm_model(cfg: ImageTowerConfig, kwargs: dict) -> nn.Module:
    if cfg.patch_dropout == 0:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    refused = ConfigError(
        f"model.image.patch_dropout={cfg.patch_dropout} needs a ViT-style timm tower (one built with "
        f"patch_drop_rate); {cfg.name} has no patch tokens to drop: set model.image.patch_dropout=0"
    )
    try:
        model = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, patch_drop_rate=cfg.patch_dropout, **kwargs
        )
    except TypeError as e:  # the model's constructor has no such argument
        if "patch_drop_rate" not in str(e):
            raise
        raise refused from None
    if not any(isinstance(m, PatchDropout) for m in model.modules()):  # took it and ignored it
        raise refused
    return model


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> nn.Module:
    """Freeze all parameters except those of the last `unlocked_groups` timm parameter groups.

    Groups come from the model's own group_matcher(coarse=False), as in timm's layer-wise lr decay and
    OpenCLIP's lock: for EfficientNet the stem is group 0, each block one group, and the head joins
    the last block. With freeze_bn_stats, the BatchNorm layers of the frozen groups are replaced by
    FrozenBatchNorm2d / FrozenBatchNormAct2d by timm's freeze_batch_norm_2d: they hold their statistics
    as plain buffers and always normalise with them, so no train()/eval() call can make them move, and
    the lock needs no wrapper module around the timm model. Their state dict has no
    num_batches_tracked entries (load_image_weights tolerates that either way).
    Returns the model (the same object, unless the model itself is a single BatchNorm).
    """
    if unlocked_groups < 0:
        raise ConfigError(f"model.image.unlocked_groups={unlocked_groups} must be >= 0")
    if unlocked_groups == 0:
        for p in model.parameters():
            p.requires_grad = False
        return freeze_batch_norm_2d(model) if freeze_bn_stats else model

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"{type(model).__name__} has no timm group_matcher: use unlocked_groups=0")
    matcher = model.group_matcher(coarse=False)
    groups = group_parameters(model, matcher)  # {group id: [parameter names]}, ids 0..n-1 from input side
    if unlocked_groups > len(groups):
        raise ConfigError(f"model.image.unlocked_groups={unlocked_groups} exceeds the {len(groups)} groups")
    last_frozen = max(groups) - unlocked_groups
    frozen = {name for gid, names in groups.items() if gid <= last_frozen for name in names}
    for name, p in model.named_parameters():
        p.requires_grad = name not in frozen
    if freeze_bn_stats:
        module_group = group_modules(model, matcher, reverse=True)  # {module name: group id}
        for name, gid in module_group.items():
            if gid > last_frozen or not name:
                continue
            module = model.get_submodule(name)
            frozen_module = freeze_batch_norm_2d(module)  # returns the module itself if not a BatchNorm
            if frozen_module is not module:
                parent, _, child = name.rpartition(".")
                model.get_submodule(parent).add_module(child, frozen_module)
    return model
