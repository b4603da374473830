"""ClipModel: an image tower and a text tower projected into one embedding space.

model = ClipModel(cfg.model)                     # towers from timm / transformers
img = model.encode_image(images)                 # [B, model.output_dim], L2-normalised
txt = model.encode_text(tokens)                  # [B, model.output_dim], L2-normalised

model.save_pretrained("out/model", tokenizer)    # config.json + model.safetensors + tokenizer/
model = ClipModel.from_pretrained("out/model")   # needs no package, no hub, no original folder
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from torch import nn

from clip_train.config import ConfigError, ModelConfig, build_dataclass, concat_entry
from clip_train.models.dropout import swap_dropout
from clip_train.models.image_tower import build_image_tower
from clip_train.models.lora import plain_state_dict, without_lora
from clip_train.models.pretrained import WeightsMismatchError
from clip_train.models.text_tower import COMPILED_LENGTH_MULTIPLE, TextTower, build_text_tower
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import image_normalization

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class ClipModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        # New projections (no bias, as in CLIP) map both towers' features into the shared space.
        if cfg.image_proj == "mlp":
            # timm's Mlp, as OpenCLIP's TimmModel builds its "mlp" head (same names: fc1, fc2)
            self.image_proj = Mlp(
                self.visual.num_features, 2 * cfg.embed_dim, cfg.embed_dim, bias=(True, False)
            )
        else:
            self.image_proj = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=self.visual.num_features**-0.5)
        self.text_proj = nn.Linear(self.text.num_features, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_proj.weight, std=self.text.num_features**-0.5)
        # Learnable log inverse temperature; the logits use exp(logit_scale). A learnable logit
        # bias exists only when configured (SigLIP); InfoNCE is invariant to it.
        init_scale = cfg.init_logit_scale if cfg.init_logit_scale is not None else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        self.output_dim = cfg.embed_dim
        if cfg.image.channels_last:
            self.visual.to(memory_format=torch.channels_last)
        swap_dropout(self)  # the same dropout, faster masks on the CPU (models/dropout.py)

    def compile(self, *args, **kwargs) -> None:
        """nn.Module.compile (in place: state dict keys unchanged), with the text towers' padding
        trimmed to multiples of COMPILED_LENGTH_MULTIPLE: to the exact longest caption, each batch
        would be a new shape, recompiled. Uncompiled models keep the exact trim."""
        for module in self.modules():
            if isinstance(module, TextTower):
                module.length_multiple = COMPILED_LENGTH_MULTIPLE
        super().compile(*args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' activations in the backward instead of storing them (less memory,
        about a third more compute): timm's and transformers' own switches, with the non-reentrant
        checkpoint so that frozen (locked) inputs and dropout (RNG replayed) stay exact."""
        try:
            self.visual.set_grad_checkpointing(enable)
        except (AttributeError, NotImplementedError, AssertionError):
            raise ConfigError(
                f"timm model {self.cfg.image.name} does not support gradient checkpointing: "
                "set train.grad_checkpointing=false"
            ) from None
        transformer = self.text.transformer
        if not transformer.supports_gradient_checkpointing:
            raise ConfigError(
                f"the text model ({transformer.config.model_type}) does not support gradient checkpointing: "
                "set train.grad_checkpointing=false"
            )
        reentrant = {"use_reentrant": False}
        if enable and hasattr(transformer, "activation_checkpointing_enable"):
            # transformers 5.x renamed it (the old name warns of its removal in v6)
            transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
        elif enable:
            transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
        else:
            transformer.gradient_checkpointing_disable()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.image_features_to_embedding(self.image_tower_features(images), normalize)

    def image_tower_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.image.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.visual(images)

    def image_features_to_embedding(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project image-tower outputs (e.g. cached ones of a locked tower) into the shared space."""
        projected = self.image_proj(features)
        return F.normalize(projected, dim=-1) if normalize else projected

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.text_features_to_embedding(self.text(tokens), normalize)

    def text_features_to_embedding(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project text-tower outputs into the shared space."""
        projected = self.text_proj(features)
        return F.normalize(projected, dim=-1) if normalize else projected

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor, image_features=None):
        """(image_emb, text_emb, exp(logit_scale), logit_bias or None): what the loss takes.
        image_features (outputs of a locked image tower) replace images when given."""
        if image_features is not None:
            image_emb = self.image_features_to_embedding(image_features)
        else:
            image_emb = self.encode_image(images)
        return image_emb, self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        # Without the cap the temperature keeps growing and training turns unstable (CLIP paper).
        self.logit_scale.clamp_(0, self.cfg.max_logit_scale)

    # ------------------------------------------------------------------------------------------
    # Public format: a folder that rebuilds the model without the packages or folders it was
    # first made from (the towers' architectures are stored, their pretrained sources dropped).

    def portable_config(self) -> ModelConfig:
        mean, std = image_normalization(self.visual, self.cfg.image)
        # the extra towers keep their architectures; their weights are in the safetensors
        concat = [concat_entry(spec)[0] for spec in self.cfg.image.concat]
        image = dataclasses.replace(
            self.cfg.image, pretrained="", lock=False, mean=mean, std=std, concat=concat
        )
        text = dataclasses.replace(
            self.cfg.text,
            pretrained="",
            hf_config=self.text.hf_config_dict(),
            tokenizer=TOKENIZER_DIR,
            lock=False,
        )
        return without_lora(dataclasses.replace(self.cfg, image=image, text=text, init_from="", arch=""))

    def save_pretrained(self, folder: str | Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """state_dict: the weights to write instead of this module's own (e.g. gathered from FSDP shards)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        portable = self.portable_config()
        config = {"format": "clip_train", "model": dataclasses.asdict(portable)}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        # contiguous(): channels_last weights are not contiguous, and safetensors stores plain layout.
        # adapters (models/lora.py) are merged: the folder holds a plain model
        weights = plain_state_dict(self) if state_dict is None else state_dict
        state = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipModel:
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved clip_train model: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(pass a folder written by save_pretrained, a checkpoint or a run directory)"
            )
        cfg = load_model_config(folder)
        model = cls(cfg)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return model


def load_model_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    if raw.get("format") != "clip_train":
        raise ConfigError(f"{folder / CONFIG_NAME} is not a clip_train model config")
    model = dict(raw["model"])
    # Models saved before the label prior was removed record it: off, it changes nothing
    legacy_prior = model.pop("label_prior", None) or {}
    if legacy_prior.get("weight", 0) > 0:
        raise ConfigError(
            f"{folder / CONFIG_NAME} uses model.label_prior, which clip_train no longer has (it measured no "
            "gain, docs/demo-experiments.md): load it with a clip_train checkout before commit "
            "'Remove model.label_prior'"
        )
    cfg = build_dataclass(ModelConfig, model, prefix="model.")
    if cfg.text.tokenizer == TOKENIZER_DIR:
        cfg.text.tokenizer = str(folder / TOKENIZER_DIR)
    return cfg


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside a model by save_pretrained."""
    return build_tokenizer(load_model_config(folder).text)


# ----------------------------------------------------------------------------------------------
# Starting a run from a saved model (model.init_from)


def config_from_saved(folder: str | Path, trainable: ModelConfig) -> ModelConfig:
    """The saved model's architecture, with what trains (locks, unlocked layers, frozen BatchNorm
    statistics, patch dropout, LoRA adapters, the logit-scale cap, the memory layout) taken from
    `trainable`, the run's config."""
    saved = load_model_config(folder)
    image = dataclasses.replace(
        saved.image,
        lock=trainable.image.lock,
        unlocked_groups=trainable.image.unlocked_groups,
        freeze_bn_stats=trainable.image.freeze_bn_stats,
        channels_last=trainable.image.channels_last,
        patch_dropout=trainable.image.patch_dropout,
        lora=trainable.image.lora,
    )
    text = dataclasses.replace(
        saved.text,
        lock=trainable.text.lock,
        unlocked_layers=trainable.text.unlocked_layers,
        lora=trainable.text.lora,
    )
    return dataclasses.replace(
        saved,
        image=image,
        text=text,
        max_logit_scale=trainable.max_logit_scale,
        init_from=str(folder),
    )


def load_saved_weights(model: ClipModel, folder: str | Path) -> None:
    """Load a saved model's weights into a model of the same architecture (some of whose BatchNorm
    layers may be frozen, which keep no num_batches_tracked counter)."""
    state = load_file(str(Path(folder) / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{folder}/{WEIGHTS_NAME} does not fit its own config ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): re-save the model"
        )
