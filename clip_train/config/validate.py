"""The rules between keys, checked once for a whole run config (load_config calls validate).

Single keys (types, choices, ranges) are checked as they are read (load.py); what is here needs
two or more keys together. Code below the config can trust a config that passed both.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from clip_train.config.schema import (
    ARCH_PREFIX,
    ARCHITECTURES,
    CAPTION_JSON,
    CAPTION_SOURCES,
    ConfigError,
    DataConfig,
    EmaConfig,
    ModelConfig,
    RunConfig,
    concat_entry,
)

FULLY_LOCKED_IMAGE = (
    "model.image.lock=true, model.image.unlocked_groups=0 and model.image.freeze_bn_stats=true"
)


def validate(cfg: RunConfig) -> None:
    """Every rule between keys of a run config; raises ConfigError naming the keys and the fix."""
    check_data_sources(cfg.data)
    check_captions(cfg.data.captions, "data.captions")
    for i, task in enumerate(cfg.eval.retrieval_tasks):
        check_captions(task.captions, f"eval.retrieval_tasks[{i}].captions")
    if cfg.data.caption_sampling == "weighted" and not cfg.data.captions.startswith(CAPTION_JSON):
        raise ConfigError(
            f"data.caption_sampling=weighted needs caption weights, which only a json member holds: "
            f"set data.captions=json:<field> (a list of {{text, weight}}) or data.caption_sampling=uniform, "
            f"not data.captions={cfg.data.captions}"
        )
    if cfg.data.crop_scale_min > cfg.data.crop_scale_max:
        raise ConfigError(
            f"data.crop_scale_min={cfg.data.crop_scale_min} is above data.crop_scale_max="
            f"{cfg.data.crop_scale_max}: the crop scale range must be min <= max"
        )
    if cfg.finetune.wise_alphas and not (cfg.eval.zeroshot or cfg.data.val_shards):
        raise ConfigError("finetune.wise_alphas needs evaluation tasks: set eval.zeroshot or data.val_shards")
    _check_feature_cache(cfg)
    check_distill(cfg)
    _check_ema(cfg)
    image = cfg.model.image
    bare = [spec for spec in image.concat if not concat_entry(spec)[1]]
    if bare and not cfg.model.init_from:
        # a name alone is how a saved model records its extra towers (their weights are in its file);
        # in a new run it would be a randomly initialised frozen tower
        raise ConfigError(
            f"model.image.concat entry {bare[0]} has no weights: write it as {bare[0]}=WEIGHTS "
            "(a file or package:...), or start from a saved model with model.init_from"
        )
    check_arch(cfg.model)
    check_lora(cfg.model)


def check_lora(model: ModelConfig) -> None:
    """LoRA adapters replace a tower's lock (they freeze its weights themselves); targets are names
    or one regex. Whether the targets exist in the tower is checked when it is built (models/lora.py)."""
    for tower, lock_keys in (("image", "lock / unlocked_groups"), ("text", "lock / unlocked_layers")):
        tower_cfg = getattr(model, tower)
        lora = tower_cfg.lora
        if lora.rank == 0:
            continue
        if tower_cfg.lock:
            raise ConfigError(
                f"model.{tower}.lora.rank={lora.rank} with model.{tower}.lock=true: the adapters already "
                f"freeze the tower's own weights; drop model.{tower}.{lock_keys} or set lora.rank=0"
            )
        regexes = [t for t in lora.target_modules if t.startswith("re:")]
        if regexes and len(lora.target_modules) > 1:
            raise ConfigError(
                f"model.{tower}.lora.target_modules mixes a regex ({regexes[0]}) with names: give either "
                "module names or a single re:PATTERN"
            )


def check_arch(model: ModelConfig) -> None:
    """model.arch names a known architecture and is the only source of the architecture."""
    if not model.arch:
        return
    name = model.arch.removeprefix(ARCH_PREFIX)
    if not model.arch.startswith(ARCH_PREFIX) or name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=1)
        known = ", ".join(ARCHITECTURES)
        hint = f"did you mean {ARCH_PREFIX}{close[0]}?" if close else f"choose one of {known}"
        raise ConfigError(f"model.arch={model.arch} is not a known architecture: {hint}")
    if model.init_from:
        raise ConfigError(
            f"model.arch={model.arch} and model.init_from={model.init_from} both give the architecture: "
            "drop one of them"
        )
    if model.text.pretrained:
        raise ConfigError(
            f"model.arch={model.arch} builds its own text tower from scratch: drop model.text.pretrained"
        )
    if model.image.concat:
        raise ConfigError(f"model.arch={model.arch} builds OpenCLIP's towers alone: drop model.image.concat")


def _image_fully_locked(cfg: RunConfig) -> bool:
    image = cfg.model.image
    return image.lock and image.unlocked_groups == 0 and image.freeze_bn_stats


def _check_feature_cache(cfg: RunConfig) -> None:
    train = cfg.train
    if train.cache_image_features and not _image_fully_locked(cfg):
        raise ConfigError(
            f"train.cache_image_features needs a fully locked image tower: set {FULLY_LOCKED_IMAGE}"
        )


def check_captions(spec: str, key: str) -> None:
    """A caption source: one of CAPTION_SOURCES or json:<field> with a field named."""
    if spec in CAPTION_SOURCES or (spec.startswith(CAPTION_JSON) and spec[len(CAPTION_JSON) :].strip()):
        return
    close = difflib.get_close_matches(spec, CAPTION_SOURCES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        f"{key}={spec!r} is not a caption source: {hint}choose one of {', '.join(CAPTION_SOURCES)} "
        "or json:<field> (e.g. json:captions)"
    )


def check_distill(cfg: RunConfig) -> None:
    """distill.*: a teacher exactly when it runs online, and the inputs it needs (the paths
    themselves are checked before start, see train/teacher.py)."""
    distill = cfg.distill
    if distill.mode == "none":
        if distill.teacher:
            raise ConfigError(
                f"distill.teacher={distill.teacher} is set but distill.mode=none: set distill.mode=online "
                "(or drop distill.teacher)"
            )
        return
    if distill.mode == "online" and not distill.teacher:
        raise ConfigError(
            "distill.mode=online needs distill.teacher: a model folder, checkpoint or run directory "
            "(clip-import turns an OpenCLIP checkpoint into one)"
        )
    if distill.mode == "offline" and distill.teacher:
        raise ConfigError(
            f"distill.mode=offline reads the teacher's embeddings from the shards (their teacher.json "
            f"names it): drop distill.teacher={distill.teacher}, or set distill.mode=online"
        )
    if distill.mode == "offline" and cfg.data.captions != "whole":
        raise ConfigError(
            f"distill.mode=offline reads one teacher text embedding per sample, made from its whole "
            f"caption text, so data.captions={cfg.data.captions} would pair the student's caption with "
            "another one's: set data.captions=whole, or distill.mode=online (the teacher embeds the "
            "caption each step picks)"
        )
    if distill.mode == "online" and cfg.train.cache_image_features:
        raise ConfigError(
            "distill.mode=online needs the training images, which train.cache_image_features replaces "
            "by cached features: write the teacher's embeddings once (clip-data teacher) and set "
            "distill.mode=offline, or set train.cache_image_features=false"
        )


def _check_ema(cfg: RunConfig) -> None:
    ema = cfg.train.ema
    if ema.warmup and ema.decay == 0:
        raise ConfigError(
            "train.ema.warmup=true ramps up an EMA that is off (train.ema.decay=0): set train.ema.decay, "
            "e.g. 0.9999, or drop the warmup"
        )
    default = EmaConfig()
    for key in ("warmup_gamma", "warmup_power"):
        if not ema.warmup and getattr(ema, key) != getattr(default, key):
            raise ConfigError(
                f"train.ema.{key}={getattr(ema, key)} acts only with train.ema.warmup=true: set it, or drop "
                f"train.ema.{key}"
            )


def check_data_sources(data: DataConfig) -> None:
    """Exactly one of train_shards and sources; names filled in and unique (weights: schema)."""
    if bool(data.train_shards) == bool(data.sources):
        raise ConfigError(
            "set exactly one of data.train_shards (one shard spec) and data.sources "
            "(a list of {shards, weight}): "
            + ("both are set" if data.sources else "missing required config value data.train_shards")
        )
    for i, source in enumerate(data.sources):
        source.name = source.name or f"source{i}"
    names = [source.name for source in data.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names must be unique, got {names}: set data.sources[i].name")


def check_run_dir(run_dir: str | Path) -> None:
    """A run directory that can be made and written: not a file, below no file, writable.

    Checked before anything else of a run, so that a wrong path costs no model build and leaves
    nothing behind."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file, not a directory: choose another run_dir")
    existing = path
    while not existing.exists():  # the deepest part that exists must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run_dir={run_dir} lies below {existing}, which is a file: choose another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={run_dir}: {existing} is not writable: choose another run_dir")
