"""Typed run configuration: the schema (schema.py), YAML files and `a.b=v` overrides (load.py),
the rules between keys (validate.py). Imports no torch."""

from clip_train.config.load import (
    all_keys,
    build_dataclass,
    fill_loss_defaults,
    load_config,
    save_config,
    to_dict,
)
from clip_train.config.schema import (
    ARCH_PREFIX,
    ARCHITECTURES,
    LOSS_INIT,
    MISSING,
    ConfigError,
    DataConfig,
    DataSource,
    DistillConfig,
    EmaConfig,
    EvalConfig,
    FinetuneConfig,
    ImageTowerConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RetrievalTask,
    RunConfig,
    TextTowerConfig,
    TrainConfig,
    ZeroShotTask,
    concat_entry,
)
from clip_train.config.validate import check_arch, check_data_sources, check_run_dir, validate

__all__ = [
    "ARCH_PREFIX", "ARCHITECTURES", "LOSS_INIT", "MISSING", "ConfigError", "DataConfig", "DataSource",
    "DistillConfig", "EmaConfig", "EvalConfig", "FinetuneConfig", "ImageTowerConfig", "LogConfig",
    "LoraConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "RetrievalTask", "RunConfig", "TextTowerConfig", "TrainConfig",
    "ZeroShotTask", "all_keys", "build_dataclass", "check_arch", "check_data_sources", "check_run_dir",
    "concat_entry", "fill_loss_defaults", "load_config", "save_config", "to_dict", "validate",
]  # fmt: skip
