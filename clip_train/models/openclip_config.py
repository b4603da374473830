"""The OpenCLIP side of clip-import (openclip_import.py) before any weights are read: the model config
found by architecture name or file, the refusal of what cannot map exactly, and the preprocessing the
weights most likely expect. Nothing here builds a model."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from clip_train.errors import one_line

# Tokens in OpenCLIP's CLIP BPE vocabulary, its start- and end-of-text tokens (the last two ids) included.
CLIP_BPE_SIZE = 49408


class OpenClipImportError(ValueError):
    """An OpenCLIP model or file that cannot be imported exactly; the one-line message names the reason."""


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise OpenClipImportError(
            "importing OpenCLIP models needs the open_clip_torch package: pip install open_clip_torch"
        ) from None
    return open_clip


def resolve_openclip_config(model: str | Path) -> tuple[str, dict, dict, bool]:
    """(name, model_cfg, preprocess_cfg overrides, bundled) for an architecture name or a config file."""
    open_clip = _open_clip()
    spec = str(model)
    if spec.startswith("hf-hub:"):
        raise OpenClipImportError(
            f"{spec}: nothing is downloaded from a hub: give a bundled architecture or a local config .json"
        )
    path = Path(spec.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        path = path / "open_clip_config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OpenClipImportError(f"cannot read OpenCLIP config {path}: {e}") from None
        # open_clip_config.json (hub folders, open_clip's push_to_hf_hub) nests the model config and
        # carries the preprocessing the weights were trained with; a plain model config is the inner part
        nested = isinstance(raw, dict) and isinstance(raw.get("model_cfg"), dict)
        cfg = raw["model_cfg"] if nested else raw
        preprocess = dict(raw.get("preprocess_cfg") or {}) if nested else {}
        name, bundled = path.stem, False
    elif spec in open_clip.list_models():
        cfg, preprocess, name, bundled = open_clip.get_model_config(spec), {}, spec, True
    else:
        close = difflib.get_close_matches(spec, open_clip.list_models(), n=1)
        hint = f"did you mean {close[0]}?" if close else "see open_clip.list_models()"
        raise OpenClipImportError(
            f"{spec} is neither a bundled OpenCLIP architecture nor a config .json: {hint}"
        )
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise OpenClipImportError(
            f"{path} is not an OpenCLIP model config: it needs embed_dim, vision_cfg, text_cfg"
        )
    return name, copy.deepcopy(cfg), preprocess, bundled


def _refuse(feature: str, reason: str):
    raise OpenClipImportError(f"{feature} is not supported: {reason}")


_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _check_blocks(cfg: dict, where: str) -> None:
    """Residual blocks that a plain pre-norm transformer layer (timm Block, CLIPEncoderLayer) computes."""
    if cfg.get("block_type") == "custom" or any(cfg.get(k) for k in _CUSTOM_BLOCK):
        flags = [k for k in _CUSTOM_BLOCK if cfg.get(k)] or ["block_type=custom"]
        _refuse(
            f"{where}.{flags[0]}", "only plain pre-norm attention blocks map onto timm/transformers layers"
        )
    if cfg.get("ls_init_value") is not None:
        _refuse(f"{where}.ls_init_value (layer scale)", "the mapped layers have no layer scale")
    if cfg.get("act_kwargs"):
        _refuse(f"{where}.act_kwargs={cfg['act_kwargs']}", "only the plain GELU / QuickGELU activations map")
    extra = set(cfg.get("norm_kwargs") or {}) - {"eps"}
    if extra:
        _refuse(f"{where}.norm_kwargs {sorted(extra)}", "only the LayerNorm eps maps")


def _square(size, where: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _refuse(f"{where}={list(size)}", "clip_train's image towers take square images")
        size = size[0]
    return int(size)


def _check_config(cfg: dict, name: str, bundled: bool) -> None:
    """Refuse what cannot map exactly, from the config alone (before any weights are read)."""
    if "multimodal_cfg" in cfg:
        _refuse("CoCa (multimodal_cfg)", "clip_train has no captioning text decoder")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision.get("timm_model_name"):
        if vision.get("timm_pool") in ("abs_attn", "rot_attn"):
            _refuse(
                f"vision_cfg.timm_pool={vision['timm_pool']}",
                "attention pooling heads have no timm tower here",
            )
        if vision.get("timm_proj", "linear") in ("linear", "mlp") and vision.get("timm_proj_bias"):
            _refuse("vision_cfg.timm_proj_bias", "clip_train's projections have no output bias")
    elif isinstance(vision.get("layers"), (list, tuple)):
        _refuse(
            "a ModifiedResNet image tower (vision_cfg.layers is a list, as in RN50)", "no timm mapping here"
        )
    else:
        if vision.get("attentional_pool"):
            _refuse("vision_cfg.attentional_pool", "timm's CLIP ViTs pool the class token")
        if vision.get("pool_type", "tok") != "tok":
            _refuse(f"vision_cfg.pool_type={vision['pool_type']}", "timm's CLIP ViTs pool the class token")
        if vision.get("pos_embed_type", "learnable") != "learnable":
            _refuse(f"vision_cfg.pos_embed_type={vision['pos_embed_type']}", "timm's CLIP ViTs learn it")
        _check_blocks(vision, "vision_cfg")
    _square(vision.get("image_size", 224), "vision_cfg.image_size")

    if text.get("hf_model_name"):
        _check_hf_text(text)
        return
    # the model first, then its tokenizer
    if text.get("embed_cls"):
        _refuse("text_cfg.embed_cls (an appended class token)", "CLIPTextModel has none")
    pool = text.get("pool_type", "argmax")
    # the end-of-text token has the largest id, so argmax finds it; 'eos' finds the first eos_id
    if not (pool == "argmax" or (pool == "eos" and text.get("eos_id", 2) == CLIP_BPE_SIZE - 1)):
        _refuse(
            f"text_cfg.pool_type={pool}",
            "clip_train pools the end-of-text token, the first token or the mean",
        )
    if text.get("no_causal_mask"):
        _refuse("text_cfg.no_causal_mask (bidirectional text attention)", "CLIPTextModel attends causally")
    if text.get("proj_bias"):
        _refuse("text_cfg.proj_bias", "clip_train's projections have no bias")
    _check_blocks(text, "text_cfg")
    if text.get("hf_tokenizer_name"):
        _refuse(
            "text_cfg.hf_tokenizer_name with OpenCLIP's own text transformer",
            "only its CLIP BPE tokenizer maps",
        )
    if bundled and "siglip" in name.lower():
        _refuse(
            "the SigLIP tokenizer (open_clip.get_tokenizer picks it for SigLIP names)", "only CLIP BPE maps"
        )
    if text.get("tokenizer_mode"):
        _refuse(f"text_cfg.tokenizer_mode={text['tokenizer_mode']}", "only plain tokenization maps")
    if (text.get("tokenizer_kwargs") or {}) not in ({}, {"clean": "lower"}):
        _refuse(
            f"text_cfg.tokenizer_kwargs={text['tokenizer_kwargs']}", "only the default cleaning (lower) maps"
        )
    if text.get("vocab_size", CLIP_BPE_SIZE) != CLIP_BPE_SIZE:
        _refuse(
            f"text_cfg.vocab_size={text['vocab_size']}", f"the CLIP BPE tokenizer has {CLIP_BPE_SIZE} tokens"
        )


def _local_folder(name: str | None, key: str) -> Path:
    path = Path(name).expanduser() if name else None
    if path is None or not path.is_dir():
        raise OpenClipImportError(
            f"text_cfg.{key}={name} is not a local Hugging Face folder: nothing is downloaded from a hub, "
            "point it at a local folder"
        )
    return path


def _check_hf_text(text: dict) -> None:
    _local_folder(text["hf_model_name"], "hf_model_name")
    _local_folder(text.get("hf_tokenizer_name"), "hf_tokenizer_name")
    pooler = text.get("hf_pooler_type", "mean_pooler")
    if pooler not in ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"):
        _refuse(f"text_cfg.hf_pooler_type={pooler}", "clip_train pools the mean, the first token or eos")
    if text.get("hf_proj_type", "mlp") == "mlp":
        _refuse("text_cfg.hf_proj_type=mlp", "clip_train projects with one bias-free linear layer")
    if text.get("tokenizer_mode"):
        _refuse(f"text_cfg.tokenizer_mode={text['tokenizer_mode']}", "only plain tokenization maps")
    if (text.get("tokenizer_kwargs") or {}) not in ({}, {"clean": "whitespace"}):
        _refuse(f"text_cfg.tokenizer_kwargs={text['tokenizer_kwargs']}", "only the default cleaning maps")


def openclip_preprocess(name: str, bundled: bool, from_file: dict) -> dict:
    """The preprocessing the weights most likely expect: OpenCLIP's defaults (OpenAI mean/std, bicubic,
    shorter side), overlaid by what all pretrained tags of a bundled architecture agree on (a
    checkpoint of such an architecture usually descends from one of them; open_clip itself applies
    the defaults to a checkpoint file), overlaid by the config file's preprocess_cfg."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    open_clip = _open_clip()
    out = merge_preprocess_dict(PreprocessCfg(), {})
    if bundled:
        tags = [
            merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(name, tag))
            for tag in open_clip.list_pretrained_tags_by_model(name)
        ]
        for key in ("mean", "std", "interpolation", "resize_mode"):
            values = {json.dumps(t[key]) for t in tags}
            if len(values) == 1:
                out[key] = json.loads(values.pop())
            elif len(values) > 1 and key not in from_file:
                out.setdefault("disagree", []).append(key)  # the default stays; the caller says so
    return merge_preprocess_dict(out, from_file) | {"disagree": out.get("disagree", [])}


# ----------------------------------------------------------------------------------------------
# One-line messages


def _shape_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
    return lines[0].rstrip(".") if lines else one_line(error)


def _key_problems(missing, unexpected) -> str:
    problems = [
        f"{len(k)} {what} ({_examples(k)})" for k, what in ((missing, "missing"), (unexpected, "unexpected"))
    ]
    return ", ".join(p for p, k in zip(problems, (missing, unexpected)) if k)


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
