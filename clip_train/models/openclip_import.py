"""Import an OpenCLIP model (architecture + checkpoint) as a clip_train model folder, to fine-tune it here.

    path = import_openclip("ViT-B-32", "logs/run/checkpoints/epoch_32.pt", "models/vit-b-32")
    model = ClipModel.from_pretrained(path)      # OpenCLIP's normalised embeddings, to fp32 rounding
    tokenize = load_tokenizer(path)              # open_clip.get_tokenizer("ViT-B-32")'s token ids

    python -m clip_train.models.openclip_import --model ViT-B-32 --checkpoint epoch_32.pt --out models/b32

`model` is a bundled OpenCLIP architecture name (open_clip.list_models(), read offline from the package)
or an OpenCLIP model config .json (plain, or an open_clip_config.json with model_cfg/preprocess_cfg).
The folder is exactly what ClipModel.save_pretrained writes. How the towers map:

  image  OpenCLIP's own VisionTransformer -> the registered timm CLIP ViT with the same modules (found by
         building the candidates on the meta device and comparing them with the ViT the config describes),
         weights renamed by timm's own OpenAI-CLIP converter; visual.proj -> image_proj (transposed).
         A timm trunk (vision_cfg.timm_model_name) -> the same timm model; its bias-free linear head, or
         no head, -> image_proj; its mlp head (timm_proj mlp) -> image_proj with model.image_proj=mlp.
  text   OpenCLIP's own text transformer -> transformers' CLIPTextModel (fused q/k/v split), eos pooling;
         the CLIP BPE tokenizer -> a CLIPTokenizer folder plus one pad token (see write_clip_tokenizer).
         A Hugging Face text tower (text_cfg.hf_model_name, a local folder) -> the same model, with mean
         or cls pooling and its own tokenizer.

Features without an exact counterpart here (CoCa, attention pooling, layer scale, bidirectional or
last-token text pooling, projection biases, ...) are refused with one line that names them. Before the
folder appears (it is written under a temporary name, then renamed), the written model is reloaded and
compared with the OpenCLIP model on random images and fixed captions; an import that is not exact to
TOLERANCE is refused too. Nothing is downloaded: hub names are refused, and every model is built offline.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from clip_train.config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.towers import TextTower

# Largest |difference| of normalised embeddings (fp32, CPU) at which an import counts as exact. The
# towers compute the same functions with other kernels (fused vs separate q/k/v, SDPA vs
# MultiheadAttention), so differences of ~1e-7 are expected; a wrong mapping gives ~1e-1.
TOLERANCE = 1e-4

# Captions the import checks token ids and text embeddings on: case, punctuation, contractions,
# digits, accents, runs of whitespace, what OpenCLIP's cleaning changes (clip_train's tokenizer cleans
# the same way: towers.clean_text) and one caption longer than any context length.
CAPTIONS = (
    "a photo of a cat.",
    "Two DOGS playing in the snow!!!",
    "it's a sunny day, isn't it?",
    "The Eiffel Tower (Paris) at night -- 2019",
    "a red   car parked\tnear a tree\n",
    "Café au lait & croissants",
    "e-mail: someone@example.com",
    "50% off!!! buy now :)",
    "naïve résumé, déjà vu",
    "\u201cquoted\u201d fish &amp; chips, \ufb01ne caf\u00c3\u00a9",
    "a diagram of a 3-layer MLP with ReLU",
    "",
    "a very long caption that keeps going " * 12,
)

# The CLIP BPE vocabulary's special tokens, under the names transformers' CLIPTokenizer uses (OpenCLIP
# calls them <start_of_text>/<end_of_text>; the ids are what matters).
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CLIP_BPE_SIZE = 49408


class OpenClipImportError(ValueError):
    """An OpenCLIP model or file that cannot be imported exactly; the one-line message names the reason."""


@dataclass
class ImportReport:
    path: Path
    timm_name: str  # the image tower clip_train builds
    text_model: str  # the transformers model_type of the text tower
    image_diff: float  # max |difference| of the normalised image embeddings against OpenCLIP's
    text_diff: float
    mean: list[float]  # the image normalisation stored in the config
    std: list[float]
    notes: list[str]  # what the folder cannot say (e.g. OpenCLIP's resize mode for the weights)


# ----------------------------------------------------------------------------------------------
# OpenCLIP config


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
# Building the OpenCLIP model and its tokenizer


def build_openclip_model(cfg: dict, checkpoint: str | Path | None) -> nn.Module:
    """The OpenCLIP model of a config, in fp32 eval mode, with the checkpoint loaded as open_clip loads it
    (state_dict wrappers, DDP "module." prefixes, its own format conversions), strictly."""
    open_clip = _open_clip()
    cfg = copy.deepcopy(cfg)
    # base weights of the towers would come from a hub; the checkpoint replaces them anyway
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    if cfg["text_cfg"].get("hf_model_name"):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or bool(cfg["text_cfg"].get("hf_model_name"))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        if checkpoint is None:
            # OpenCLIP's own initialisation, seeded so an import is reproducible
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = cls(**cfg)
        else:
            model = cls(**cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise OpenClipImportError(f"OpenCLIP cannot build this config: {_one_line(e)}") from None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        try:
            result = open_clip.load_checkpoint(model, str(path), strict=False)
        except Exception as e:  # an unreadable file fails in pickle, zip or safetensors code alike
            if isinstance(e, RuntimeError) and "size mismatch" in str(e):
                raise OpenClipImportError(
                    f"checkpoint {path} does not fit this architecture: {_shape_error(e)}"
                ) from None
            raise OpenClipImportError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
        missing, unexpected = getattr(result, "missing_keys", []), getattr(result, "unexpected_keys", [])
        if missing or unexpected:
            problems = _key_problems(missing, unexpected)
            raise OpenClipImportError(f"checkpoint {path} does not fit this architecture: {problems}")
    return model.float().eval()


def openclip_tokenizer(name: str, cfg: dict, bundled: bool):
    """The tokenizer open_clip.get_tokenizer gives for the architecture (built from the config for files)."""
    open_clip = _open_clip()
    if bundled:
        return open_clip.get_tokenizer(name)
    text = cfg["text_cfg"]
    context_length = text.get("context_length", 77)
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text["hf_tokenizer_name"],
            context_length=context_length,
            tokenizer_mode=text.get("tokenizer_mode"),
            **kwargs,
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length, **kwargs)


def write_clip_tokenizer(simple_tokenizer, folder: Path, context_length: int) -> None:
    """A transformers CLIPTokenizer folder with the ids of OpenCLIP's SimpleTokenizer, plus a pad token.

    vocab.json and merges.txt come from the SimpleTokenizer's own tables (built from the BPE file in the
    open_clip package: 256 byte symbols, the same with the end-of-word mark, one token per merge in
    rank order, then start and end of text). OpenCLIP pads with id 0, which is also the token "!"; its
    causal text transformer never looks past the end of text, so the pad id does not matter there. clip_train
    finds padding by id (attention mask, eos pooling), so the pad must be a token no text produces: one
    new token at id 49408, whose embedding row the import adds (zeros; no real token ever attends to it).
    """
    from transformers import AutoTokenizer

    rename = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
    vocab = {rename.get(token, token): i for token, i in simple_tokenizer.encoder.items()}
    if (
        len(vocab) != CLIP_BPE_SIZE
        or vocab.get(SOT_TOKEN) != CLIP_BPE_SIZE - 2
        or vocab.get(EOT_TOKEN) != CLIP_BPE_SIZE - 1
    ):
        _refuse(
            "a CLIP BPE tokenizer with extra special tokens",
            f"the mapped vocabulary has {CLIP_BPE_SIZE} tokens",
        )
    vocab[PAD_TOKEN] = CLIP_BPE_SIZE
    merges = [" ".join(pair) for pair, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": context_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    # Loading the files and saving again adds tokenizer.json (what transformers loads fastest) and
    # proves the folder loads.
    AutoTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# Image tower


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    """The same modules with the same settings and parameter shapes, and the same pooling choice (a
    plain attribute in timm ViTs, so not part of repr)."""
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    attrs = ("global_pool", "num_prefix_tokens", "no_embed_class", "pool_include_prefix")
    return shapes_a == shapes_b and all(_setting(a, n) == _setting(b, n) for n in attrs)


def _setting(module: nn.Module, name: str):
    # timm CNNs hold global_pool as a module: nn.Module compares by identity, so compare its structure
    value = getattr(module, name, None)
    return (type(value), repr(value)) if isinstance(value, nn.Module) else value


def _timm_on_meta(name: str, image_size: int | None = None, **kwargs) -> nn.Module | None:
    """timm.create_model on the meta device without weight init (structure only: fast, no memory), or
    None if the model cannot be built so. With image_size, as build_image_tower builds clip_train's
    tower: img_size is passed to fixed-size models only."""
    import timm
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    if image_size is not None and pcfg is not None and pcfg.fixed_input_size:
        kwargs["img_size"] = image_size
    with torch.device("meta"):
        for skip in ({"weight_init": "skip"}, {}):  # not every timm model takes weight_init
            try:
                return timm.create_model(name, pretrained=False, **kwargs, **skip)
            except TypeError:
                continue
            except Exception:  # e.g. a candidate that cannot take this image size: not a match
                return None
    return None


def find_timm_vit(vision: dict, quick_gelu: bool) -> str:
    """The registered timm model whose clip_train tower is OpenCLIP's VisionTransformer for this config."""
    import timm
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    size = _square(vision.get("image_size", 224), "vision_cfg.image_size")
    patch = _square(vision.get("patch_size", 16), "vision_cfg.patch_size")
    width, layers = int(vision.get("width", 768)), int(vision.get("layers", 12))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise OpenClipImportError(f"vision_cfg.width={width} is no multiple of head_width={head_width}")
    heads = width // head_width
    eps = (vision.get("norm_kwargs") or {}).get("eps", 1e-5)
    kwargs = dict(
        img_size=size,
        patch_size=patch,
        embed_dim=width,
        depth=layers,
        num_heads=heads,
        mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
        pre_norm=not vision.get("no_ln_pre", False),
        norm_layer=partial(LayerNorm, eps=eps),
        num_classes=0,
    )
    if quick_gelu:
        kwargs["act_layer"] = "quick_gelu"  # as timm's *_quickgelu models say it (plain GELU is the default)
    with torch.device("meta"):
        wanted = VisionTransformer(**kwargs)
    names = [
        n
        for n in timm.list_models(["*clip*", "test_vit*"])
        if f"patch{patch}_" in n or n.startswith("test_vit")
    ]
    # equal architectures differ only in their default size: prefer the one made for this size
    for name in sorted(names, key=lambda n: (not n.endswith(f"_{size}"), n)):
        tower = _timm_on_meta(name, size, num_classes=0)
        if tower is not None and _same_structure(tower, wanted):
            return name
    act = "QuickGELU" if quick_gelu else "GELU"
    raise OpenClipImportError(
        f"no registered timm model has this ViT (width {width}, {layers} layers, {heads} heads, "
        f"patch {patch}, MLP ratio {kwargs['mlp_ratio']:g}, {act}, LayerNorm eps {eps:g}, "
        f"ln_pre {kwargs['pre_norm']}): clip_train builds image towers by timm name"
    )


def convert_vit(visual: nn.Module, no_ln_pre: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(timm ViT state dict, image_proj weight) from OpenCLIP's VisionTransformer, by timm's own converter."""
    try:
        from timm.models.vision_transformer import _convert_openai_clip
    except ImportError:
        raise OpenClipImportError(
            "this timm version has no OpenAI-CLIP weight converter: pip install 'timm>=1.0'"
        ) from None
    state = {f"visual.{k}": v.detach() for k, v in visual.state_dict().items()}
    converted = _convert_openai_clip(state, None, prefix="visual.")
    # the converter turns visual.proj into a classifier (weight = proj transposed, zero bias); clip_train
    # keeps the tower headless and the projection as image_proj
    proj = converted.pop("head.weight")
    converted.pop("head.bias")
    if no_ln_pre:
        # timm gives the patch embedding a bias unless the ViT has a pre-norm (as CLIP's has); OpenCLIP's
        # conv1 never has one, and a zero bias computes the same
        weight = converted["patch_embed.proj.weight"]
        converted["patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])
    return converted, proj


def _identity(n: int) -> torch.Tensor:
    return torch.eye(n)


def check_timm_trunk(vision: dict) -> str:
    """The timm name of OpenCLIP's TimmModel trunk, if clip_train's tower for that name is the same model
    (pooling and input size included)."""
    name = vision["timm_model_name"]
    size = _square(vision.get("image_size", 224), "vision_cfg.image_size")
    pool = vision.get("timm_pool", "avg")
    # the trunk as TimmModel builds it (at the model's default size: TimmModel passes none), without
    # drop rates (training-only, and they change the modules)
    if vision.get("timm_proj", "linear") in ("linear", "mlp"):
        reference = _timm_on_meta(name)
        if reference is not None:
            reference.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    else:
        reference = _timm_on_meta(name, num_classes=0, global_pool=pool)
    tower = _timm_on_meta(name, size, num_classes=0)
    if tower is None or reference is None or not _same_structure(tower, reference):
        raise OpenClipImportError(
            f"vision_cfg.timm_pool={pool!r} with timm model {name} at {size} px is not supported: "
            f"clip_train's tower (timm.create_model({name!r}, num_classes=0)) pools or sizes it otherwise"
        )
    return name


def convert_timm_trunk(visual: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | dict]:
    """(tower state dict, image_proj weight) from OpenCLIP's TimmModel (trunk + head); for an mlp
    head, the image_proj state dict (fc1.weight, fc1.bias, fc2.weight) instead of a weight."""
    trunk = visual.trunk
    state = {k: v.detach() for k, v in trunk.state_dict().items()}
    head = trunk.get_classifier() if hasattr(trunk, "get_classifier") else None
    if isinstance(head, nn.Linear):
        # timm_proj none/null with an embed_dim: the trunk's own classifier is the projection
        if head.bias is not None and head.bias.detach().abs().max() > 0:
            _refuse(f"timm model {name}'s classifier as the projection (timm_proj=null)", "it has a bias")
        prefix = next(n for n, m in trunk.named_modules() if m is head) + "."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        return state, head.weight.detach()
    linear = getattr(visual.head, "proj", None)
    if isinstance(linear, nn.Linear):
        return state, linear.weight.detach()
    mlp = getattr(visual.head, "mlp", None)
    if mlp is not None:  # timm_proj mlp: clip_train's model.image_proj=mlp has the same layers and names
        return state, {"fc1.weight": mlp.fc1.weight, "fc1.bias": mlp.fc1.bias, "fc2.weight": mlp.fc2.weight}
    return state, _identity(trunk.num_features)


# ----------------------------------------------------------------------------------------------
# Text tower


def _native_text_modules(model: nn.Module):
    # CLIP keeps the text modules on the model itself; CustomTextCLIP in .text (a TextTransformer)
    src = model.text if hasattr(model, "text") else model
    return src.token_embedding, src.positional_embedding, src.transformer, src.ln_final, src.text_projection


def native_text_hf_config(text: dict, quick_gelu: bool) -> dict:
    """AutoConfig kwargs of the CLIPTextModel that computes OpenCLIP's text transformer."""
    width = int(text.get("width", 512))
    return {
        "model_type": "clip_text_model",
        "vocab_size": CLIP_BPE_SIZE + 1,  # + the pad token (write_clip_tokenizer)
        "hidden_size": width,
        # int(), as OpenCLIP sizes its MLP
        "intermediate_size": int(width * float(text.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text.get("layers", 12)),
        "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        # OpenCLIP: QuickGELU with quick_gelu, else nn.GELU (exact erf), which is transformers' "gelu"
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": float((text.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "attention_dropout": 0.0,
        "pad_token_id": CLIP_BPE_SIZE,
        "bos_token_id": CLIP_BPE_SIZE - 2,
        "eos_token_id": CLIP_BPE_SIZE - 1,
    }


def convert_native_text(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(CLIPTextModel state dict, text_proj weight) from OpenCLIP's text transformer."""
    token_embedding, positional, transformer, ln_final, projection = _native_text_modules(model)
    tokens = token_embedding.weight.detach()
    out = {
        "embeddings.token_embedding.weight": torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])]),
        "embeddings.position_embedding.weight": positional.detach(),
        "final_layer_norm.weight": ln_final.weight.detach(),
        "final_layer_norm.bias": ln_final.bias.detach(),
    }
    for i, block in enumerate(transformer.resblocks):
        p = f"encoder.layers.{i}."
        attn = block.attn
        # nn.MultiheadAttention stacks the q, k and v projections in one in_proj, in that order
        for part, w, b in zip(
            ("q", "k", "v"), attn.in_proj_weight.detach().chunk(3), attn.in_proj_bias.detach().chunk(3)
        ):
            out[f"{p}self_attn.{part}_proj.weight"] = w
            out[f"{p}self_attn.{part}_proj.bias"] = b
        pairs = {
            "self_attn.out_proj": attn.out_proj,
            "layer_norm1": block.ln_1,
            "mlp.fc1": block.mlp.c_fc,
            "mlp.fc2": block.mlp.c_proj,
            "layer_norm2": block.ln_2,
        }
        for ours, module in pairs.items():
            out[f"{p}{ours}.weight"] = module.weight.detach()
            out[f"{p}{ours}.bias"] = module.bias.detach()
    if projection is None:
        proj = _identity(tokens.shape[1])
    else:
        proj = projection.detach().T  # x @ text_projection == Linear with weight text_projection.T
    return out, proj


def hf_text_parts(model: nn.Module, text: dict) -> tuple[str, dict, dict[str, torch.Tensor], torch.Tensor]:
    """(pooling, hf_config, transformer state dict, text_proj weight) from OpenCLIP's HFTextEncoder."""
    encoder = model.text
    transformer = encoder.transformer
    if getattr(transformer.config, "is_encoder_decoder", False):
        _refuse(
            f"an encoder-decoder text model ({transformer.config.model_type})",
            "clip_train runs AutoModel whole",
        )
    pooler = text.get("hf_pooler_type", "mean_pooler")
    if pooler == "cls_pooler" and getattr(transformer, "pooler", None) is not None:
        _refuse(
            "text_cfg.hf_pooler_type=cls_pooler",
            "it uses the model's pooler layer (dense + tanh), not the token",
        )
    pooling = "mean" if pooler == "mean_pooler" else "cls"
    pad = transformer.config.pad_token_id
    hf_config = TextTower(transformer, pooling, pad).hf_config_dict()
    hf_config = {"model_type": hf_config.pop("model_type"), **hf_config}
    state = {k: v.detach() for k, v in transformer.state_dict().items()}
    proj = encoder.proj
    weight = (
        proj.weight.detach()
        if isinstance(proj, nn.Linear)
        else _identity(transformer.get_input_embeddings().embedding_dim)
    )
    return pooling, hf_config, state, weight


# ----------------------------------------------------------------------------------------------
# The import


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _shape_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
    return lines[0].rstrip(".") if lines else _one_line(error)


def _key_problems(missing, unexpected) -> str:
    problems = [
        f"{len(k)} {what} ({_examples(k)})" for k, what in ((missing, "missing"), (unexpected, "unexpected"))
    ]
    return ", ".join(p for p, k in zip(problems, (missing, unexpected)) if k)


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _new_folder(out_dir: Path) -> Path:
    """A temporary sibling of out_dir, renamed onto it when complete: no half-written model is ever seen."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def verify(
    openclip_model, openclip_tok, folder: Path, image_size: int, openclip_pad: int
) -> tuple[float, float]:
    """Reload the written folder and compare it with the OpenCLIP model: token ids of CAPTIONS, and the
    normalised image and text embeddings. Returns the largest image and text differences."""
    model = ClipModel.from_pretrained(folder).eval()
    tokenize = load_tokenizer(folder)
    ours, theirs = tokenize(list(CAPTIONS)), openclip_tok(list(CAPTIONS))
    if ours.shape != theirs.shape:
        raise OpenClipImportError(
            f"the tokenizer gives {ours.shape[1]} positions, OpenCLIP's {theirs.shape[1]}"
        )
    # the same ids where clip_train's tokenizer has text, OpenCLIP's padding where it pads
    wrong = ours.masked_fill(ours.eq(tokenize.pad_token_id), openclip_pad).ne(theirs).any(dim=1)
    if wrong.any():
        caption = CAPTIONS[int(wrong.nonzero()[0])]
        raise OpenClipImportError(f"the tokenizer gives other ids than OpenCLIP's for {caption!r}")
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    image_diff = _max_diff(model.encode_image(images), openclip_model.encode_image(images, normalize=True))
    text_diff = _max_diff(model.encode_text(ours), openclip_model.encode_text(theirs, normalize=True))
    return image_diff, text_diff


def import_openclip_report(
    model: str | Path,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> ImportReport:
    """import_openclip, also returning which towers were chosen and how close the result is."""
    name, cfg, preprocess, bundled = resolve_openclip_config(model)
    try:
        _check_config(cfg, name, bundled)
    except OpenClipImportError as e:
        raise OpenClipImportError(f"{name}: {e}") from None
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OpenClipImportError(f"{out_dir} already exists: choose a new output folder")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise OpenClipImportError(f"checkpoint {Path(checkpoint).expanduser()} does not exist")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    quick_gelu = bool(cfg.get("quick_gelu", False))
    native_vit = not vision.get("timm_model_name")
    try:
        timm_name = find_timm_vit(vision, quick_gelu) if native_vit else check_timm_trunk(vision)
    except OpenClipImportError as e:
        raise OpenClipImportError(f"{name}: {e}") from None

    openclip_model = build_openclip_model(cfg, checkpoint)
    openclip_tok = openclip_tokenizer(name, cfg, bundled)
    image_size = _square(openclip_model.visual.image_size, "vision_cfg.image_size")
    preprocess = openclip_preprocess(name, bundled, preprocess)
    mean, std = list(image_mean or preprocess["mean"]), list(image_std or preprocess["std"])
    if len(mean) != 3 or len(std) != 3:
        raise OpenClipImportError(f"image mean {mean} and std {std} need 3 values each (RGB)")
    notes = []
    if {"mean", "std"} & set(preprocess["disagree"]) and not (image_mean and image_std):
        notes.append(
            f"the pretrained tags of {name} normalise differently; OpenCLIP's default was stored: give "
            "--image-mean/--image-std if the checkpoint descends from a tag that differs"
        )
    if (preprocess["interpolation"], preprocess["resize_mode"]) != ("bicubic", "shortest"):
        # clip_train resizes the shorter side and centre-crops, with the timm model's interpolation
        notes.append(
            f"OpenCLIP resizes images for these weights with {preprocess['interpolation']} interpolation "
            f"and resize_mode={preprocess['resize_mode']}; clip_train's evaluation resizes the shorter side"
        )

    try:
        if native_vit:
            image_state, image_proj = convert_vit(openclip_model.visual, bool(vision.get("no_ln_pre")))
        else:
            image_state, image_proj = convert_timm_trunk(openclip_model.visual, timm_name)
        if text.get("hf_model_name"):
            pooling, hf_config, text_state, text_proj = hf_text_parts(openclip_model, text)
            openclip_pad = int(hf_config["pad_token_id"])
        else:
            pooling, hf_config = "eos", native_text_hf_config(text, quick_gelu)
            text_state, text_proj = convert_native_text(openclip_model)
            openclip_pad = 0  # SimpleTokenizer pads with zeros
    except OpenClipImportError as e:
        raise OpenClipImportError(f"{name}: {e}") from None
    image_proj_kind = "mlp" if isinstance(image_proj, dict) else "linear"
    image_proj = image_proj if isinstance(image_proj, dict) else {"weight": image_proj}
    embed_dim = image_proj["fc2.weight" if image_proj_kind == "mlp" else "weight"].shape[0]
    if embed_dim != text_proj.shape[0]:
        raise OpenClipImportError(
            f"{name}: the image embedding has {embed_dim} dims, the text embedding {text_proj.shape[0]}"
        )

    logit_scale = openclip_model.logit_scale.detach().reshape(())
    logit_bias = getattr(openclip_model, "logit_bias", None)
    logit_bias = None if logit_bias is None else logit_bias.detach().reshape(())
    tmp = _new_folder(out_dir)
    try:
        tokenizer_dir = tmp / "tokenizer"
        if text.get("hf_model_name"):
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(
                str(Path(text["hf_tokenizer_name"]).expanduser()), local_files_only=True
            )
            hf_tok.save_pretrained(str(tokenizer_dir))
        else:
            write_clip_tokenizer(openclip_tok, tokenizer_dir, int(text.get("context_length", 77)))
        model_cfg = ModelConfig(
            image=ImageTowerConfig(
                name=timm_name,
                image_size=image_size,
                mean=[float(m) for m in mean],
                std=[float(s) for s in std],
                # NHWC pays off for convolution stacks; for a ViT-style tower (one patchifying
                # convolution) it makes that convolution slower on CPU (45 -> 53 ms fwd+bwd, 64 x 224 px)
                channels_last=not (native_vit or hasattr(openclip_model.visual.trunk, "patch_embed")),
            ),
            text=TextTowerConfig(
                hf_config=hf_config,
                tokenizer=str(tokenizer_dir),
                pooling=pooling,
                context_length=int(text.get("context_length", 77)),
            ),
            embed_dim=int(embed_dim),
            image_proj=image_proj_kind,
            init_logit_scale=float(logit_scale),
            init_logit_bias=None if logit_bias is None else float(logit_bias),
        )
        # Built on the meta device and given the converted tensors (assign): random init of a large
        # model costs more than the rest of the import. Its non-persistent buffers stay on meta, which
        # is fine: this copy is only saved; verify() loads the folder as every user will.
        with torch.device("meta"):
            clip_model = ClipModel(model_cfg)
        state = {f"visual.{k}": v for k, v in image_state.items()}
        state.update({f"text.transformer.{k}": v for k, v in text_state.items()})
        state.update({f"image_proj.{k}": v.detach() for k, v in image_proj.items()})
        state.update({"text_proj.weight": text_proj, "logit_scale": logit_scale})
        if logit_bias is not None:
            state["logit_bias"] = logit_bias
        # own contiguous copies: q/k/v chunks and transposes are views that share (or misorder) storage
        state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
        try:
            result = clip_model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise OpenClipImportError(
                f"{name}: the converted weights do not fit clip_train's model: {_shape_error(e)}"
            ) from None
        if result.missing_keys or result.unexpected_keys:  # strict, with a one-line message
            raise OpenClipImportError(
                f"{name}: the converted weights do not fit clip_train's model: "
                + _key_problems(result.missing_keys, result.unexpected_keys)
            )
        clip_model.save_pretrained(tmp)  # the tokenizer is already in tmp/tokenizer
        del clip_model, state, image_state, text_state
        image_diff, text_diff = verify(openclip_model, openclip_tok, tmp, image_size, openclip_pad)
        if max(image_diff, text_diff) > TOLERANCE:
            raise OpenClipImportError(
                f"{name}: the imported model differs from OpenCLIP's (image embeddings by {image_diff:.1e}, "
                f"text by {text_diff:.1e}, more than {TOLERANCE:.0e}): this architecture does not map exactly"
            )
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): rename onto it
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportReport(out_dir, timm_name, hf_config["model_type"], image_diff, text_diff, mean, std, notes)


def import_openclip(
    model: str | Path,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> Path:
    """Write OpenCLIP `model` (architecture name or config .json) with `checkpoint` (a state dict file as
    open_clip or open_clip_train save it; None = OpenCLIP's own random initialisation, seed 0) as a
    clip_train model folder `out_dir` (which must not exist, or be empty). image_mean/std override the
    normalisation stored for evaluation (default: see openclip_preprocess)."""
    return import_openclip_report(model, checkpoint, out_dir, image_mean=image_mean, image_std=image_std).path


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other clip_train error
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, prog: str = "python -m clip_train.models.openclip_import") -> int:
    parser = _Parser(
        prog=prog,
        description="Write an OpenCLIP model and checkpoint as a clip_train model folder (to fine-tune it).",
    )
    parser.add_argument(
        "--model", required=True, help="OpenCLIP architecture (e.g. ViT-B-32) or model config .json"
    )
    parser.add_argument(
        "--checkpoint",
        help="OpenCLIP checkpoint (.pt/.pth/.bin/.safetensors); omit for OpenCLIP's random init",
    )
    parser.add_argument("--out", required=True, help="the new model folder")
    parser.add_argument(
        "--image-mean", type=float, nargs=3, metavar="M", help="override the normalisation mean"
    )
    parser.add_argument(
        "--image-std", type=float, nargs=3, metavar="S", help="override the normalisation std"
    )
    args = parser.parse_args(argv)
    try:
        report = import_openclip_report(
            args.model, args.checkpoint, args.out, image_mean=args.image_mean, image_std=args.image_std
        )
    except (OpenClipImportError, ConfigError, FileNotFoundError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.path}: image tower {report.timm_name}, text tower {report.text_model}; normalised "
        f"embeddings within {report.image_diff:.1e} (image) and {report.text_diff:.1e} (text) of OpenCLIP's"
    )
    print(
        f"image normalisation: mean {report.mean}, std {report.std} (override with --image-mean/--image-std)"
    )
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
