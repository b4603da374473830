"""The files of the two exports (export.py) and the check that they are exact: clip_train's weight
names mapped to OpenCLIP's and transformers', the folders each target reads, and the export loaded
back the way a user would and compared with clip_train."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from clip_train.config import ConfigError
from clip_train.models.clip import ClipModel
from clip_train.models.tokenizer import TextTokenizer
from clip_train.models.transforms import image_normalization

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"  # the first name OpenCLIP's local-dir: looks for
HF_PREPROCESSOR = "preprocessor_config.json"
VERIFY_ATOL = 1e-5
# Short, long (truncated at context_length), capitals and punctuation: what token ids can differ on.
PROBE_TEXTS = [
    "a photo of a cat",
    "Two red squares and a blue circle on a white table, drawn as clip art with thick black outlines",
    "x",
    "an emoji: smiling face, with sunglasses!",
]
# Texts that OpenCLIP's cleaning changes (clip_train's tokenizer cleans the same way, tokenizer.clean_text):
# whitespace runs, an HTML entity, curly quotes, a ligature, full-width letters, mojibake.
CLEANING_PROBES = [
    "  two  spaces ",
    "fish &amp; chips",
    "\u201ca cat\u201d",
    "a \ufb01sh",
    "\uff43\uff41\uff54",
    "caf\u00c3\u00a9",
]
OPENCLIP_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
# The legacy eos_token_id with which CLIPTextModel pools at the largest token id instead.
HF_CLIP_LEGACY_EOS = 2


class ExportError(ConfigError):
    """A model the target cannot reproduce exactly, or an --out in the way: the message says which."""


def _closing_token(tokenizer: TextTokenizer) -> int:
    """The id every tokenized text ends with (before padding), e.g. [SEP]; refused if there is none."""
    ids = tokenizer(PROBE_TEXTS)
    real = ids.ne(tokenizer.pad_token_id)
    last = (real * torch.arange(ids.shape[1])).argmax(dim=1)
    closing = ids[torch.arange(len(ids)), last].unique()
    if len(closing) != 1:
        raise ExportError(
            "--to hf cannot pool at the last token: the tokenizer ends texts with different tokens "
            f"{closing.tolist()}, and CLIPTextModel pools at one eos_token_id"
        )
    return int(closing)


# ----------------------------------------------------------------------------------------------
# Key names: clip_train's -> the target's. A key that matches no rule stops the export, so a new
# parameter in ClipModel cannot be dropped silently.

OPENCLIP_KEYS = (
    ("visual.", "visual.trunk."),  # TimmModel keeps the timm model as .trunk
    ("image_proj.", "visual.head.proj."),
    ("text.transformer.", "text.transformer."),  # HFTextEncoder uses the same name
    ("text_proj.", "text.proj."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
)
HF_KEYS = (
    ("visual.", "vision_model.timm_model."),
    ("image_proj.", "visual_projection."),
    ("text.transformer.", "text_model."),
    ("text_proj.", "text_projection."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", None),  # VisionTextDualEncoderModel has none (see _check_hf)
)


def rename_state_dict(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        rule = next(((old, new) for old, new in rules if key.startswith(old)), None)
        if rule is None:
            raise ExportError(f"the weight {key} has no place in the export")
        if rule[1] is not None:
            # contiguous(): channels_last weights are strided, and safetensors stores plain layout
            renamed[rule[1] + key[len(rule[0]) :]] = value.detach().contiguous()
    return renamed


def openclip_state_dict(model: ClipModel) -> dict[str, torch.Tensor]:
    rules = OPENCLIP_KEYS
    if model.cfg.image_proj == "mlp":  # TimmModel's head holds it as .mlp (fc1, fc2: the same names)
        rules = tuple(
            ("image_proj.", "visual.head.mlp.") if old == "image_proj." else (old, new) for old, new in rules
        )
    return rename_state_dict(model.state_dict(), rules)


def hf_state_dict(model: ClipModel) -> dict[str, torch.Tensor]:
    return rename_state_dict(model.state_dict(), HF_KEYS)


# ----------------------------------------------------------------------------------------------
# Writers


def _eval_resize(model: ClipModel) -> dict:
    """The parts of clip_train's evaluation transform that come from the timm model's defaults
    (build_image_transforms: crop_pct=1, size and mean/std from the config)."""
    data = resolve_data_config({}, model=model.visual)
    mean, std = image_normalization(model.visual, model.cfg.image)
    return {"interpolation": data["interpolation"], "crop_mode": data["crop_mode"], "mean": mean, "std": std}


def _openclip_preprocess(model: ClipModel) -> dict:
    resize = _eval_resize(model)
    # With crop_pct=1, timm's centre crop is OpenCLIP's shortest-side resize and its squash the same.
    modes = {"center": "shortest", "squash": "squash"}
    if resize["interpolation"] not in ("bicubic", "bilinear") or resize["crop_mode"] not in modes:
        raise ExportError(
            f"--to openclip cannot reproduce the evaluation transform of {model.cfg.image.name} "
            f"({resize['interpolation']} resize, {resize['crop_mode']} crop)"
        )
    return {
        "size": model.cfg.image.image_size,
        "mean": resize["mean"],
        "std": resize["std"],
        "interpolation": resize["interpolation"],
        "resize_mode": modes[resize["crop_mode"]],
    }


def _text_config(model: ClipModel):
    config = copy.deepcopy(model.text.transformer.config)
    # The tower may have taken its pad id from the tokenizer; the exported model finds padding by it.
    config.pad_token_id = model.text.pad_token_id
    return config


def _save_tokenizer(tokenizer: TextTokenizer, folder: Path) -> None:
    # Plain tokenizer(texts, truncation=True) then cuts where clip_train does.
    tokenizer.tokenizer.model_max_length = tokenizer.context_length
    tokenizer.save_pretrained(folder)


def _write_openclip_config(model: ClipModel, folder: Path, hf_folder: Path) -> None:
    image, text = model.cfg.image, model.cfg.text
    model_cfg = {
        "embed_dim": model.cfg.embed_dim,
        "init_logit_scale": model.logit_scale.item(),
        "vision_cfg": {
            "timm_model_name": image.name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": model.cfg.image_proj,  # linear or mlp (OpenCLIP's hidden 2 x embed_dim)
            "timm_proj_bias": False,
            "image_size": image.image_size,
        },
        "text_cfg": {
            "hf_model_name": str(hf_folder),
            "hf_tokenizer_name": str(hf_folder),
            "hf_model_pretrained": False,
            "hf_pooler_type": OPENCLIP_POOLERS[text.pooling],
            "hf_proj_type": "linear",
            "context_length": text.context_length,
        },
    }
    if model.logit_bias is not None:  # the parameter must exist for the checkpoint to load into it
        model_cfg["init_logit_bias"] = model.logit_bias.item()
    config = {"model_cfg": model_cfg, "preprocess_cfg": _openclip_preprocess(model)}
    (folder / OPENCLIP_CONFIG).write_text(json.dumps(config, indent=1))


def _write_openclip(model: ClipModel, tokenizer: TextTokenizer, folder: Path, hf_folder: Path) -> None:
    _text_config(model).save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    save_file(openclip_state_dict(model), str(folder / OPENCLIP_WEIGHTS), metadata={"format": "pt"})
    _write_openclip_config(model, folder, hf_folder)


def _hf_model(model: ClipModel, tokenizer: TextTokenizer):
    from transformers import TimmWrapperConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    image = model.cfg.image
    pcfg = get_pretrained_cfg(image.name)
    # The same timm arguments as build_image_tower: ViT-style models are sized at build time.
    model_args = {"img_size": image.image_size} if pcfg is not None and pcfg.fixed_input_size else {}
    vision = TimmWrapperConfig(
        architecture=image.name,
        model_args=model_args,
        num_labels=0,
        hidden_size=model.image_proj.in_features,  # VisionTextDualEncoderModel sizes its projection by it
    )
    text = _text_config(model)
    text.eos_token_id = _closing_token(tokenizer)  # where CLIPTextModel pools (see _check_hf)
    # Unused by CLIPTextModel, but a default outside the vocabulary makes transformers warn on every load.
    hf_tok = tokenizer.tokenizer
    text.bos_token_id = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.cls_token_id
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=model.cfg.embed_dim, logit_scale_init_value=model.logit_scale.item()
    )
    hf = VisionTextDualEncoderModel(config)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()


def _write_hf(model: ClipModel, tokenizer: TextTokenizer, folder: Path) -> None:
    _hf_model(model, tokenizer).save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    resize = _eval_resize(model)
    size = model.cfg.image.image_size
    # TimmWrapperImageProcessor resolves this through timm's own resolve_data_config/create_transform,
    # the functions clip_train's build_image_transforms uses.
    processor = {
        "image_processor_type": "TimmWrapperImageProcessor",
        "architecture": model.cfg.image.name,
        "pretrained_cfg": {"input_size": [3, size, size], "crop_pct": 1.0, **resize},
    }
    (folder / HF_PREPROCESSOR).write_text(json.dumps(processor, indent=1))


# ----------------------------------------------------------------------------------------------
# Loading back the way a user would, and comparing


@dataclass
class _Loaded:
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # pixels -> normalised embeddings
    encode_texts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts -> (ids, embeddings)
    cleans_text: bool  # whether the target's tokenizer cleans text as clip_train's does (clean_text)


def _load_openclip(folder: Path) -> _Loaded:
    import open_clip

    name = f"local-dir:{folder}"
    try:
        model = open_clip.create_model(name).eval()
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # whatever OpenCLIP fails on, the export is not usable
        raise ExportError(f"OpenCLIP cannot load the export: {_first_line(e)}") from e

    def encode_texts(texts):
        ids = tokenizer(texts)
        return ids, model.encode_text(ids, normalize=True)

    return _Loaded(lambda x: model.encode_image(x, normalize=True), encode_texts, cleans_text=True)


def _load_hf(folder: Path) -> _Loaded:
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    try:
        model = VisionTextDualEncoderModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ExportError(f"transformers cannot load the export: {_first_line(e)}") from e

    def pooled(out) -> torch.Tensor:
        # transformers 5 returns the model output with the projection in pooler_output, 4.x a tensor
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    def encode_texts(texts):
        tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        return tokens["input_ids"], pooled(model.get_text_features(**tokens))

    return _Loaded(
        lambda x: pooled(model.get_image_features(pixel_values=x)), encode_texts, cleans_text=False
    )


def _verify(
    model: ClipModel, tokenizer: TextTokenizer, loaded: _Loaded, target: str
) -> tuple[dict[str, float], list[str]]:
    """Max |difference| of the normalised embeddings, and notes; refuses what is not exact."""
    size = model.cfg.image.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = PROBE_TEXTS + (CLEANING_PROBES if loaded.cleans_text else [])
    ids = tokenizer(texts)
    their_ids, their_text = loaded.encode_texts(texts)
    if not torch.equal(ids, their_ids):
        bad = next(t for t, a, b in zip(texts, ids, their_ids, strict=True) if not torch.equal(a, b))
        raise ExportError(f"{target}'s tokenizer gives other token ids than clip_train's for {bad!r}")
    diffs = {
        "image": (model.encode_image(images) - loaded.encode_image(images)).abs().max().item(),
        "text": (model.encode_text(ids) - their_text).abs().max().item(),
    }
    for kind, diff in diffs.items():
        if not diff <= VERIFY_ATOL:  # also catches NaN
            raise ExportError(
                f"the {target} export's {kind} embeddings differ from clip_train's by {diff:.2g} "
                f"(more than {VERIFY_ATOL:g})"
            )
    notes = []
    if not loaded.cleans_text and not torch.equal(
        loaded.encode_texts(CLEANING_PROBES)[0], tokenizer(CLEANING_PROBES)
    ):
        # The model is exact; only texts that the cleaning changes are tokenized differently.
        notes.append(
            f"the exported tokenizer ({target}) does not clean text as clip_train's does (ftfy, HTML "
            "entities, whitespace): pass texts through clip_train.models.tokenizer.clean_text first for "
            "the same ids"
        )
    return diffs, notes


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def _quiet_transformers():
    # transformers draws progress bars for saving and loading even one small file.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
