"""The text tower: a transformers encoder with pooling, input_ids [B, L] -> pooled features.

    text = build_text_tower(cfg.model.text)   # input_ids [B, L] -> [B, text.num_features]

Weights come only from local folders (models/pretrained.py); nothing here can reach a model hub.
The tokenizer that feeds it is in models/tokenizer.py.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from clip_train.config import ConfigError, TextTowerConfig
from clip_train.models.pretrained import resolve_text_folder
from clip_train.models.tokenizer import build_tokenizer

POOLINGS = ("mean", "cls", "eos")
# TextTower.length_multiple of a compiled model: caption widths fall into a few buckets (at most 5
# for OpenCLIP's 77-token context) instead of one new shape, and compilation, per batch.
COMPILED_LENGTH_MULTIPLE = 16


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
