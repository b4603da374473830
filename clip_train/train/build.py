"""The parts of a run, built from its config: what the trainer and benchmarks/ both use.

Order matters for reproducibility: build_model seeds torch itself, so the initial weights depend
on train.seed alone, whatever was built before.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from clip_train.config import ConfigError, RunConfig, check_run_dir, validate
from clip_train.data.pipeline import check_readers, config_sources, expand_urls
from clip_train.flops import FlopMetrics, count_training_flops
from clip_train.loss.contrastive import ContrastiveLoss
from clip_train.models.arch import arch_model_config
from clip_train.models.clip import ClipModel, config_from_saved, load_saved_weights
from clip_train.models.lora import add_lora
from clip_train.models.transforms import build_image_transforms
from clip_train.optim import build_optimizer, build_scheduler
from clip_train.paths import resolve_model_folder
from clip_train.train.teacher import check_distill_inputs

ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def check_before_start(cfg: RunConfig) -> None:
    """What a wrong path or setting costs nothing to refuse: before a model is built or a process
    group waits, and with nothing written."""
    check_run_dir(Path(cfg.run_dir))
    validate(cfg)
    # Missing shards, or readers left without a shard (WORLD_SIZE: set by torchrun / accelerate
    # launch before we start).
    sources = config_sources(cfg.data)
    for source in sources:
        expand_urls(source.shards, split="train")
    check_readers(
        sources,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        num_workers=cfg.data.num_workers,
        resampled=cfg.data.resampled,
    )
    if cfg.data.val_shards:
        expand_urls(cfg.data.val_shards)
    check_distill_inputs(cfg)


def build_accelerator(cfg: RunConfig) -> Accelerator:
    # Without a GPU, Accelerate must be told it runs on the CPU: otherwise under torchrun it sets
    # up no DDP (each process would train alone) while torch.distributed is initialised.
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=ACCELERATE_PRECISION[cfg.train.precision], cpu=use_cpu)
    if cfg.finetune.wise_alphas and accelerator.distributed_type == DistributedType.FSDP:
        # the sweep interpolates the unwrapped module's weights in place, which FSDP holds as shards
        raise ConfigError(
            "finetune.wise_alphas is not supported under FSDP: launch with DDP or drop the sweep"
        )
    if cfg.train.ema.decay > 0 and accelerator.distributed_type == DistributedType.FSDP:
        # the average copies and reads the unwrapped module's full weights, which FSDP holds as shards
        raise ConfigError("train.ema is not supported under FSDP: launch with DDP or set train.ema.decay=0")
    if accelerator.distributed_type == DistributedType.FSDP and (
        cfg.model.image.lora.rank > 0 or cfg.model.text.lora.rank > 0
    ):
        # the merged export reads each wrapped layer's full weight, which FSDP holds as shards
        raise ConfigError("model.*.lora is not supported under FSDP: launch with DDP or set lora.rank=0")
    return accelerator


def resolve_model_config(cfg: RunConfig) -> Path | None:
    """Replace cfg.model's references (model.arch, model.init_from) by the architecture they name;
    returns the saved model folder to start from, if any. Done before the checkpoint fingerprint,
    so that the saved config.yaml (which holds the resolved architecture) resumes the run too."""
    if cfg.model.arch:  # an OpenCLIP architecture by name
        cfg.model = arch_model_config(cfg.model)
    if not cfg.model.init_from:
        return None
    # fine-tuning: the saved model's architecture, this run's locks
    folder = resolve_model_folder(cfg.model.init_from, setting="model.init_from")
    cfg.model = config_from_saved(folder, cfg.model)
    validate(cfg)  # the saved architecture against what trains
    return folder


def build_model(cfg: RunConfig, init_folder: Path | None, world_size: int) -> tuple[ClipModel, FlopMetrics]:
    """The model, seeded with train.seed (the same initial weights on every rank), and its FLOPs
    per pair, counted before gradient checkpointing and compile change how it runs."""
    set_seed(cfg.train.seed)
    model = ClipModel(cfg.model)
    flop_metrics = FlopMetrics(count_training_flops(model).per_sample, world_size, cfg.train.peak_flops)
    if init_folder is not None:
        load_saved_weights(model, init_folder)
    add_lora(model)  # after the weights: the adapters start as a no-op on them (models/lora.py)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.compile:
        model.compile(backend=cfg.train.compile_backend)
    return model, flop_metrics


def training_transforms(model: ClipModel, cfg: RunConfig) -> tuple:
    """(augmented train, fixed eval view, float eval) image transforms of a run.

    The training loader's workers stop at uint8 images; the trainer normalises the batch on the
    device (see BatchNormalize). Evaluation keeps the float transform.
    """
    train, fixed_view = build_image_transforms(
        model.visual,
        cfg.model.image,
        crop_scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
        uint8=True,
    )
    _, evaluate = build_image_transforms(model.visual, cfg.model.image)
    return train, fixed_view, evaluate


def build_optimization(model: ClipModel, cfg: RunConfig) -> tuple:
    """(loss, optimizer, schedule) of a run."""
    loss_fn = ContrastiveLoss(cfg.loss.kind, cfg.loss.impl, cfg.loss.block_size)
    optimizer = build_optimizer(model, cfg.optim)
    return loss_fn, optimizer, build_scheduler(optimizer, cfg.train.steps, cfg.optim)
