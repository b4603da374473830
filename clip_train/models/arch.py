"""OpenCLIP's standard architectures, built directly from their names (model.arch).

    model:
      arch: openclip:ViT-B-32      # or ViT-B-16, ViT-L-14, ViT-B-16-SigLIP (config.ARCHITECTURES)

At start-up the trainer replaces the run's architecture keys (image and text tower, embed_dim,
projection) with the named architecture's, read from the OpenCLIP package's own model config, as
the OpenCLIP importer maps it (openclip_import.py): the timm ViT that computes OpenCLIP's
VisionTransformer, a transformers CLIPTextModel for its text transformer and the CLIP BPE
tokenizer (model.text.tokenizer=builtin:clip-bpe). What trains (locks, unlocked layers) and the
loss's temperature and bias stay the run's. Weights start from timm's and transformers' own random
initialisation, not OpenCLIP's (the initial distributions differ; the architecture does not).

Parameter counts equal open_clip.create_model(name)'s, except for documented rows:
  - every architecture: one more token-embedding row (the pad token, see write_clip_tokenizer);
  - ViT-B-16-SigLIP: "SigLIP-style". The image tower is SigLIP's exactly (timm
    vit_base_patch16_siglip_224, attention-pool head). Its text tower is a CLIP text transformer at
    SigLIP's width, depth and context length with the CLIP BPE vocabulary: SigLIP's own
    SentencePiece vocabulary is a hub download (nothing is downloaded here) and its bidirectional
    text attention has no CLIPTextModel equivalent. So the token embedding has 49,409 rows instead
    of 32,000, the text projection has no bias, and the image side has a 768 x 768 projection
    where SigLIP uses the pooled features as they are (see SIGLIP_STYLE_DIFFERENCE).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

from clip_train.config import ARCH_PREFIX, ConfigError, ImageTowerConfig, ModelConfig, check_arch
from clip_train.models.openclip_config import (
    CLIP_BPE_SIZE,
    OpenClipImportError,
    _check_config,
    _open_clip,
    openclip_preprocess,
    resolve_openclip_config,
)
from clip_train.models.openclip_convert import (
    check_timm_trunk,
    find_timm_vit,
    native_text_hf_config,
    write_clip_tokenizer,
)

CLIP_BPE_TOKENIZER = "builtin:clip-bpe"
SIGLIP_VOCAB_SIZE = 32_000


def siglip_style_difference(width: int, embed_dim: int) -> int:
    """clip_train's parameters minus open_clip's for ViT-B-16-SigLIP (see the module docstring)."""
    vocab_rows = (CLIP_BPE_SIZE + 1 - SIGLIP_VOCAB_SIZE) * width
    text_proj_bias = embed_dim
    image_proj = width * embed_dim
    return vocab_rows - text_proj_bias + image_proj


def _siglip_style_text(text: dict) -> dict:
    """The SigLIP text config as the CLIP text transformer clip_train builds in its place."""
    dropped = ("no_causal_mask", "proj_bias", "pool_type", "hf_tokenizer_name", "tokenizer_kwargs")
    return {k: v for k, v in text.items() if k not in dropped} | {"vocab_size": CLIP_BPE_SIZE}


def arch_model_config(base: ModelConfig) -> ModelConfig:
    """base with its architecture replaced by the one base.arch names (see the module docstring)."""
    check_arch(base)
    name = base.arch.removeprefix(ARCH_PREFIX)
    try:
        name, cfg, preprocess, bundled = resolve_openclip_config(name)
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        quick_gelu = bool(cfg.get("quick_gelu", False))
        if "siglip" in name.lower():
            text = _siglip_style_text(text)
            timm_name = check_timm_trunk(vision)
        else:
            _check_config(cfg, name, bundled)
            timm_name = find_timm_vit(vision, quick_gelu)
        preprocess = openclip_preprocess(name, bundled, preprocess)
    except OpenClipImportError as e:
        raise ConfigError(f"model.arch={base.arch}: {e}") from None
    image = ImageTowerConfig(
        name=timm_name,
        pretrained=base.image.pretrained,
        weights_remap=base.image.weights_remap,
        image_size=int(vision.get("image_size", 224)),
        lock=base.image.lock,
        unlocked_groups=base.image.unlocked_groups,
        freeze_bn_stats=base.image.freeze_bn_stats,
        patch_dropout=base.image.patch_dropout,
        lora=base.image.lora,
        mean=[float(m) for m in preprocess["mean"]],
        std=[float(s) for s in preprocess["std"]],
        # NHWC slows a ViT's one patchifying convolution
        channels_last=False,
    )
    context_length = int(text.get("context_length", 77))
    text_tower = dataclasses.replace(
        base.text,
        pretrained="",
        hf_config=native_text_hf_config(text, quick_gelu),
        tokenizer=CLIP_BPE_TOKENIZER,
        pooling="eos",
        context_length=context_length,
    )
    return dataclasses.replace(
        base, image=image, text=text_tower, embed_dim=int(cfg["embed_dim"]), image_proj="linear"
    )


@functools.cache
def _clip_bpe_folder() -> Path:
    """A transformers tokenizer folder of OpenCLIP's CLIP BPE vocabulary, written once per process
    (from the vocabulary file inside the open_clip package) into a folder removed at exit."""
    holder = tempfile.TemporaryDirectory(prefix="clip_train-clip-bpe-")
    folder = Path(holder.name) / "tokenizer"
    _clip_bpe_folder.holders.append(holder)  # the folder lives as long as the process
    write_clip_tokenizer(_open_clip().tokenizer.SimpleTokenizer(), folder, 77)
    return folder


_clip_bpe_folder.holders = []


def clip_bpe_tokenizer():
    """OpenCLIP's CLIP BPE tokenizer as a transformers tokenizer, padding with its own pad token."""
    from transformers import AutoTokenizer

    try:
        folder = _clip_bpe_folder()
    except OpenClipImportError as e:
        raise ConfigError(f"model.text.tokenizer={CLIP_BPE_TOKENIZER}: {e}") from None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
