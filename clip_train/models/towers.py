"""The two encoder towers: a timm image model and a transformers text model, each returning pooled features.

    image = build_image_tower(cfg.model.image)             # images [B, 3, H, W] -> [B, image.num_features]
    train_tf, eval_tf = build_image_transforms(image, cfg.model.image)   # PIL RGB -> float tensor
    normalize = batch_normalizer(image, cfg.model.image)   # for uint8=True transforms: on the device
    text = build_text_tower(cfg.model.text)                # input_ids [B, L] -> [B, text.num_features]
    tokenize = build_tokenizer(cfg.model.text)             # str -> [L], list[str] -> [B, L]

The projections to the shared embedding space live in the CLIP model, not here. Weights come only
from local files or packages (models/pretrained.py); nothing here can reach a model hub.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import inspect
import os
from pathlib import Path

import ftfy
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.layers import freeze_batch_norm_2d
from timm.models import get_pretrained_cfg, group_modules, group_parameters
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertTokenizerFast

from clip_train.config import ConfigError, ImageTowerConfig, TextTowerConfig, concat_entry
from clip_train.models.pretrained import (
    WeightsNotFoundError,
    image_package,
    load_image_weights,
    resolve_image_weights,
    resolve_text_folder,
)

TINY_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "tiny_vocab.txt"
POOLINGS = ("mean", "cls", "eos")
# TextTower.length_multiple of a compiled model: caption widths fall into a few buckets (at most 5
# for OpenCLIP's 77-token context) instead of one new shape, and compilation, per batch.
COMPILED_LENGTH_MULTIPLE = 16

# ----------------------------------------------------------------------------------------------
# Image tower


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
    model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    if cfg.pretrained:
        load_image_weights(model, resolve_image_weights(cfg.pretrained), cfg.weights_remap)
    if cfg.lock:
        model = lock_image_tower(model, cfg.unlocked_groups, cfg.freeze_bn_stats)
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


def _image_data_config(model: nn.Module, cfg: ImageTowerConfig) -> dict:
    args = {"input_size": (3, cfg.image_size, cfg.image_size), "crop_pct": 1.0}
    pkg = image_package(cfg.pretrained) if cfg.pretrained else None
    if cfg.mean and cfg.std:
        args.update(mean=tuple(cfg.mean), std=tuple(cfg.std))
    elif pkg is not None:
        args.update(mean=pkg.mean, std=pkg.std)
    return resolve_data_config(args=args, model=model)


def image_normalization(model: nn.Module, cfg: ImageTowerConfig) -> tuple[list[float], list[float]]:
    """The (mean, std) the transforms use, so a saved model can record them."""
    data_cfg = _image_data_config(model, cfg)
    return [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]


def build_image_transforms(
    model: nn.Module,
    cfg: ImageTowerConfig,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    *,
    uint8: bool = False,
) -> tuple:
    """(train, eval) transforms from PIL RGB images to normalised float tensors [3, S, S].

    train: RandomResizedCrop(scale=crop_scale), as in OpenCLIP: no flip (captions say left and
    right), no colour jitter (captions name colours). eval: resize the short side to S, centre crop
    S, crop_pct=1 as in OpenCLIP, since a caption describes the whole image.
    Mean/std are those the weights expect: from the packaged-weights table for package: specs,
    otherwise timm's pretrained config for the model name.

    uint8=True: both end at uint8 tensors [3, S, S] instead (timm's prefetcher mode), to be turned
    into the same normalised floats a batch at a time by BatchNormalize on the training device.
    """
    data_cfg = _image_data_config(model, cfg)
    train = create_transform(
        **data_cfg,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=0.0,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
        use_prefetcher=uint8,
    )
    evaluate = create_transform(**data_cfg, is_training=False, use_prefetcher=uint8)
    return train, evaluate


class BatchNormalize:
    """uint8 images [B, 3, H, W] -> the normalised floats ToTensor + Normalize give, for a whole batch.

    Why: the loader workers share the CPU with the model. Per image, ToTensor and Normalize cost
    about as much as decoding, and float batches are 4x the bytes to collate, pass between
    processes and copy to the device; done here it is two passes over the batch on the device
    (what timm's PrefetchLoader does). Float input passes through unchanged.

    reuse=k writes the results into k buffers taken in turn, so a returned batch is overwritten by
    the k-th call after it: the caller must be done with it by then (train.py passes the number of
    micro-batches it holds at once). Why: on the CPU a fresh 38 MB batch (64 x 224 px) is fresh
    pages from the OS, and faulting them in costs 10 ms, 4x the arithmetic. reuse=0 allocates, and
    so does any other device (CUDA's caching allocator already hands back memory it holds).
    """

    def __init__(self, mean, std, memory_format=torch.contiguous_format, reuse: int = 0):
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, -1, 1, 1)
        self.inv_std = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.memory_format = memory_format
        self.reuse = reuse
        self._buffers: list[torch.Tensor | None] = [None] * reuse
        self._turn = 0

    def _output_for(self, images: torch.Tensor) -> torch.Tensor:
        """The float tensor to write this batch into: the next of the reused buffers, or a new one."""
        if not self.reuse or images.device.type != "cpu":
            return torch.empty(images.shape, device=images.device, memory_format=self.memory_format)
        slot, self._turn = self._turn, (self._turn + 1) % self.reuse
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape != images.shape or buffer.device != images.device:
            buffer = torch.empty(images.shape, device=images.device, memory_format=self.memory_format)
            self._buffers[slot] = buffer
        return buffer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if self.mean.device != images.device:
            self.mean, self.inv_std = self.mean.to(images.device), self.inv_std.to(images.device)
        # copy_ casts (and changes the layout) in one pass, into memory that is already there
        return self._output_for(images).copy_(images).sub_(self.mean).mul_(self.inv_std)


def batch_normalizer(model: nn.Module, cfg: ImageTowerConfig, reuse: int = 0) -> BatchNormalize:
    """The BatchNormalize matching build_image_transforms(model, cfg, uint8=True)."""
    mean, std = image_normalization(model, cfg)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return BatchNormalize(mean, std, layout, reuse)


# ----------------------------------------------------------------------------------------------
# Text tower


class TextTower(nn.Module):
    """A transformers encoder with pooling: input_ids [B, L] -> features [B, num_features].

    The attention mask is rebuilt from pad_token_id, so the pad id must be a token that never occurs
    in real text (build_tokenizer checks this). Pooling:
      mean: mean of last_hidden_state over real tokens (sentence-transformers' pooling)
      cls:  the hidden state at position 0
      eos:  the hidden state of the last real token ([SEP] for BERT tokenizers)
    """

    def __init__(self, transformer: nn.Module, pooling: str = "mean", pad_token_id: int | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            choices = ", ".join(POOLINGS)
            raise ConfigError(f"model.text.pooling={pooling!r} is not allowed: choose one of {choices}")
        self.transformer = transformer
        self.pooling = pooling
        pad = transformer.config.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise ConfigError("the text model config has no pad_token_id: set it in model.text.hf_config")
        self.pad_token_id = int(pad)
        self.num_features = transformer.get_input_embeddings().embedding_dim
        self.frozen_modules: list[str] = []  # names in self.transformer kept in eval mode (see lock)
        # Padding is trimmed to a multiple of this many columns (capped at the padded width). 1 trims
        # to the longest caption exactly; ClipModel.compile sets COMPILED_LENGTH_MULTIPLE, since
        # under torch.compile every new width is a new shape to compile for.
        self.length_multiple = 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Captions are padded to context_length but are mostly much shorter: dropping the columns
        # that are padding in every row gives the same result (right padding, masked attention)
        # for a fraction of the compute.
        input_ids = input_ids[:, : self.trimmed_width(input_ids)]
        mask = input_ids.ne(self.pad_token_id)
        hidden = self.transformer(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "eos":
            # index of the last real token, wherever the padding is
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (mask * positions).argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def trimmed_width(self, input_ids: torch.Tensor) -> int:
        """The columns to keep: the longest caption's tokens, or with length_multiple > 1 that rounded
        up to a multiple of it and capped at the padded width (more columns give the same features to
        float rounding: they are masked padding)."""
        width = input_ids.ne(self.pad_token_id).sum(dim=1).max().clamp(min=1)
        if self.length_multiple > 1:
            # Rounded while still a tensor: under torch.compile the int() below is a graph break, and
            # the code after it is compiled for each value it returns, so only buckets may reach it.
            step = self.length_multiple
            width = ((width + step - 1) // step * step).clamp(max=input_ids.shape[1])
        return int(width)

    def hf_config_dict(self) -> dict:
        """The transformer's config as plain values, enough to rebuild the architecture offline."""
        config = self.transformer.config.to_dict()
        for key in ("_name_or_path", "architectures", "transformers_version", "_attn_implementation_autoset"):
            config.pop(key, None)
        return config

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the embeddings and all but the last `unlocked_layers` transformer layers.

        Parameters after the layer stack (a final norm, in architectures that have one) stay trainable
        when any layer is unlocked, as in OpenCLIP's HF text lock. Fully frozen sub-modules are also
        kept in eval mode through train(): their dropout would only add noise to features that cannot
        adapt, and it makes a fully locked tower deterministic (so its features can be cached).
        """
        layers = _layer_stack(self.transformer)
        if not 0 <= unlocked_layers <= len(layers):
            raise ConfigError(f"model.text.unlocked_layers={unlocked_layers} must be in 0..{len(layers)}")
        layer_ids = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        first_unlocked = len(layers) - unlocked_layers
        seen_layers = False
        for p in self.transformer.parameters():  # registration order: embeddings, layers, then the rest
            if id(p) in layer_ids:
                seen_layers = True
                p.requires_grad = layer_ids[id(p)] >= first_unlocked
            else:
                p.requires_grad = seen_layers and unlocked_layers > 0
        self.frozen_modules = _fully_frozen_modules(self.transformer)
        for name in self.frozen_modules:
            self.transformer.get_submodule(name).eval()

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        for name in self.frozen_modules:
            self.transformer.get_submodule(name).eval()
        return self


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of layers (encoder.layer for BERT): its largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"cannot find the layer list of {type(model).__name__} to lock it")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _fully_frozen_modules(model: nn.Module) -> list[str]:
    """Names of the outermost sub-modules whose parameters are all frozen ("" for the whole model)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name == n or name.startswith(n + ".") or n == "" for n in names):
            continue  # inside a module already listed
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            names.append(name)
    return names


def _drop_unused_pooler(model: nn.Module) -> None:
    # BERT-style models carry a pooler (dense + tanh on [CLS]) that our pooling never uses; its
    # parameters would get no gradient, which DDP reports as an error. Models whose constructor has
    # add_pooling_layer accept pooler=None in forward.
    if getattr(model, "pooler", None) is not None:
        if "add_pooling_layer" in inspect.signature(type(model).__init__).parameters:
            model.pooler = None


def build_text_tower(cfg: TextTowerConfig) -> TextTower:
    """From a local Hugging Face folder (cfg.pretrained) or from scratch (cfg.hf_config).

    When a tokenizer is configured (cfg.tokenizer or the pretrained folder), it is loaded too, to check
    the contract with the tower: the same pad id, and every token id has an embedding row. From
    scratch, hf_config may leave vocab_size and pad_token_id out: they are taken from the tokenizer.
    """
    tokenizer = build_tokenizer(cfg) if (cfg.tokenizer or cfg.pretrained) else None
    if cfg.pretrained:
        folder = resolve_text_folder(cfg.pretrained)
        transformer = AutoModel.from_pretrained(folder, local_files_only=True)
    else:
        kwargs = dict(cfg.hf_config)
        model_type = kwargs.pop("model_type", None)
        if not model_type:
            raise ConfigError(
                "model.text.hf_config needs a model_type (e.g. bert); or set model.text.pretrained"
            )
        if tokenizer is not None:
            kwargs.setdefault("vocab_size", tokenizer.vocab_size)
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        transformer = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
    _drop_unused_pooler(transformer)
    max_positions = getattr(transformer.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.context_length > max_positions:
        raise ConfigError(
            f"model.text.context_length={cfg.context_length} exceeds the text model's "
            f"max_position_embeddings={max_positions}: lower it"
        )
    pad = transformer.config.pad_token_id
    if tokenizer is not None:
        if pad is None:
            pad = tokenizer.pad_token_id
        elif pad != tokenizer.pad_token_id:
            raise ConfigError(
                f"the tokenizer pads with id {tokenizer.pad_token_id} but the text model with {pad}: "
                "use the tokenizer that belongs to the model (model.text.tokenizer)"
            )
        rows = transformer.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text model only {rows} embeddings: "
                "raise model.text.hf_config.vocab_size or use the model's own tokenizer"
            )
    tower = TextTower(transformer, cfg.pooling, pad)
    if cfg.lock:
        tower.lock(cfg.unlocked_layers)
    return tower


# ----------------------------------------------------------------------------------------------
# Tokenizer


def clean_text(text: str) -> str:
    """OpenCLIP's text cleaning (open_clip.tokenizer basic_clean + whitespace_clean): ftfy.fix_text,
    HTML entities unescaped twice, runs of whitespace collapsed. OpenCLIP's tokenizers all apply it,
    so clip_train's applies it too: an exported or imported model then tokenizes as in OpenCLIP.
    Printable ASCII text without '&', with single spaces and none at either end, comes back unchanged."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class TextTokenizer:
    """str -> LongTensor [L]; list[str] -> LongTensor [B, L]; L = context_length, right-padded.

    A plain class (not a lambda) so that DataLoader workers can pickle it. Too long texts are cut to
    L tokens and keep their closing special token ([SEP]), so eos pooling still sees it. Texts are
    cleaned first as OpenCLIP cleans them (clean_text), for every tokenizer, in training and evaluation.
    """

    def __init__(self, tokenizer, context_length: int):
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path} has no pad token: pick another tokenizer")
        specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id}
        specials.add(tokenizer.eos_token_id)
        if tokenizer.pad_token_id in specials:
            # the towers find padding by its id; a pad id shared with a real token would be masked out
            raise ConfigError(f"tokenizer {tokenizer.name_or_path} pads with a token that also ends texts")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        single = isinstance(texts, str)
        ids = self.tokenizer(
            [clean_text(t) for t in ([texts] if single else texts)],
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]
        return ids[0] if single else ids


def tiny_tokenizer() -> BertTokenizerFast:
    """The WordPiece tokenizer of the shipped tiny vocab: lower-case letters, digits and their ## forms,
    punctuation and a few hundred common words, so any English text tokenizes without [UNK]."""
    path = str(TINY_VOCAB)
    # transformers 5 takes the vocab as `vocab`, 4.x as `vocab_file`; pass both and check it was read
    tokenizer = BertTokenizerFast(vocab=path, vocab_file=path, do_lower_case=True)
    with open(path, encoding="utf-8") as f:
        n_lines = sum(1 for _ in f)
    if len(tokenizer) != n_lines:
        raise RuntimeError(f"the tiny vocab {path} was not loaded ({len(tokenizer)} of {n_lines} tokens)")
    return tokenizer


def build_tokenizer(cfg: TextTowerConfig) -> TextTokenizer:
    """From cfg.tokenizer ("builtin:tiny", "builtin:clip-bpe" or a local folder), else the pretrained
    folder."""
    # The Rust tokenizer's thread pool does not survive DataLoader's fork and would warn in each
    # worker; workers give the parallelism anyway. A user's own setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = cfg.tokenizer or cfg.pretrained
    if not spec:
        raise ConfigError(
            "model.text.tokenizer and model.text.pretrained are both empty: set model.text.tokenizer to "
            "builtin:tiny or a local tokenizer folder"
        )
    if spec == "builtin:tiny":
        tokenizer = tiny_tokenizer()
    elif spec == "builtin:clip-bpe":
        from clip_train.models.arch import clip_bpe_tokenizer  # OpenCLIP's vocabulary, only when asked

        tokenizer = clip_bpe_tokenizer()
    elif spec.startswith("builtin:"):
        raise ConfigError(
            f"model.text.tokenizer={spec} is unknown: the built-in tokenizers are builtin:tiny and "
            "builtin:clip-bpe"
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_text_folder(spec), local_files_only=True)
    return TextTokenizer(tokenizer, cfg.context_length)
