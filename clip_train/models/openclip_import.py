"""Import an OpenCLIP model (architecture + checkpoint) as a clip_train model folder, to fine-tune it here.

    path = import_openclip("ViT-B-32", "logs/run/checkpoints/epoch_32.pt", "models/vit-b-32")
    model = ClipModel.from_pretrained(path)      # OpenCLIP's normalised embeddings, to fp32 rounding
    tokenize = load_tokenizer(path)              # open_clip.get_tokenizer("ViT-B-32")'s token ids

    clip-import --model ViT-B-32 --checkpoint epoch_32.pt --out models/b32

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
The checks of the config are in openclip_config.py, the towers' and tokenizer's conversions in
openclip_convert.py.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clip_train.atomic import temporary_folder
from clip_train.config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig
from clip_train.errors import fail, one_line
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.openclip_config import (
    OpenClipImportError,
    _check_config,
    _key_problems,
    _open_clip,
    _shape_error,
    _square,
    openclip_preprocess,
    resolve_openclip_config,
)
from clip_train.models.openclip_convert import (
    check_timm_trunk,
    convert_native_text,
    convert_timm_trunk,
    convert_vit,
    find_timm_vit,
    hf_text_parts,
    native_text_hf_config,
    write_clip_tokenizer,
)

# Largest |difference| of normalised embeddings (fp32, CPU) at which an import counts as exact. The
# towers compute the same functions with other kernels (fused vs separate q/k/v, SDPA vs
# MultiheadAttention), so differences of ~1e-7 are expected; a wrong mapping gives ~1e-1.
TOLERANCE = 1e-4

# Captions the import checks token ids and text embeddings on: case, punctuation, contractions,
# digits, accents, runs of whitespace, what OpenCLIP's cleaning changes (clip_train's tokenizer cleans
# the same way: tokenizer.clean_text) and one caption longer than any context length.
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
        raise OpenClipImportError(f"OpenCLIP cannot build this config: {one_line(e)}") from None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        try:
            result = open_clip.load_checkpoint(model, str(path), strict=False)
        except Exception as e:  # an unreadable file fails in pickle, zip or safetensors code alike
            if isinstance(e, RuntimeError) and "size mismatch" in str(e):
                raise OpenClipImportError(
                    f"checkpoint {path} does not fit this architecture: {_shape_error(e)}"
                ) from None
            raise OpenClipImportError(f"cannot read checkpoint {path}: {one_line(e)}") from None
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


# ----------------------------------------------------------------------------------------------
# The import


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


def _check_before_building(name: str, cfg: dict, bundled: bool, out_dir: Path, checkpoint) -> str:
    """Refuse what cannot be imported, from the config and the paths alone (before OpenCLIP builds the
    model); return the timm name of clip_train's image tower."""
    try:
        _check_config(cfg, name, bundled)
    except OpenClipImportError as e:
        raise OpenClipImportError(f"{name}: {e}") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OpenClipImportError(f"{out_dir} already exists: choose a new output folder")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise OpenClipImportError(f"checkpoint {Path(checkpoint).expanduser()} does not exist")
    vision = cfg["vision_cfg"]
    quick_gelu = bool(cfg.get("quick_gelu", False))
    native_vit = not vision.get("timm_model_name")
    try:
        return find_timm_vit(vision, quick_gelu) if native_vit else check_timm_trunk(vision)
    except OpenClipImportError as e:
        raise OpenClipImportError(f"{name}: {e}") from None


def _normalisation(
    name: str, bundled: bool, preprocess: dict, image_mean: list[float] | None, image_std: list[float] | None
) -> tuple[list[float], list[float], list[str]]:
    """The image mean and std to store, and notes on what the folder cannot say about preprocessing."""
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
    return mean, std, notes


@dataclass
class _Converted:
    """What clip_train's model config needs to hold OpenCLIP's converted weights."""

    image_proj_kind: str  # linear or mlp
    embed_dim: int
    pooling: str
    hf_config: dict  # the text tower's transformers config
    openclip_pad: int  # the id OpenCLIP's tokenizer pads with
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def _convert(openclip_model: nn.Module, name: str, cfg: dict, timm_name: str) -> tuple[_Converted, dict]:
    """OpenCLIP's weights under clip_train's state dict names, and what the model config needs for them."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    quick_gelu = bool(cfg.get("quick_gelu", False))
    native_vit = not vision.get("timm_model_name")
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
    state = {f"visual.{k}": v for k, v in image_state.items()}
    state.update({f"text.transformer.{k}": v for k, v in text_state.items()})
    state.update({f"image_proj.{k}": v.detach() for k, v in image_proj.items()})
    state.update({"text_proj.weight": text_proj, "logit_scale": logit_scale})
    if logit_bias is not None:
        state["logit_bias"] = logit_bias
    parts = (image_proj_kind, embed_dim, pooling, hf_config, openclip_pad, logit_scale, logit_bias)
    return _Converted(*parts), state


def _write_tokenizer(text: dict, openclip_tok, tokenizer_dir: Path) -> None:
    if text.get("hf_model_name"):
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(
            str(Path(text["hf_tokenizer_name"]).expanduser()), local_files_only=True
        )
        hf_tok.save_pretrained(str(tokenizer_dir))
    else:
        write_clip_tokenizer(openclip_tok, tokenizer_dir, int(text.get("context_length", 77)))


def _save_model(folder: Path, model_cfg: ModelConfig, state: dict[str, torch.Tensor], name: str) -> None:
    """ClipModel.save_pretrained of model_cfg with the converted weights, strictly loaded."""
    # Built on the meta device and given the converted tensors (assign): random init of a large
    # model costs more than the rest of the import. Its non-persistent buffers stay on meta, which
    # is fine: this copy is only saved; verify() loads the folder as every user will.
    with torch.device("meta"):
        clip_model = ClipModel(model_cfg)
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
    clip_model.save_pretrained(folder)


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
    out_dir = Path(out_dir).expanduser()
    timm_name = _check_before_building(name, cfg, bundled, out_dir, checkpoint)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    native_vit = not vision.get("timm_model_name")

    openclip_model = build_openclip_model(cfg, checkpoint)
    openclip_tok = openclip_tokenizer(name, cfg, bundled)
    image_size = _square(openclip_model.visual.image_size, "vision_cfg.image_size")
    mean, std, notes = _normalisation(name, bundled, preprocess, image_mean, image_std)
    converted, state = _convert(openclip_model, name, cfg, timm_name)
    # written under a temporary sibling name, renamed onto out_dir only once verified
    with temporary_folder(out_dir) as tmp:
        tokenizer_dir = tmp / "tokenizer"
        _write_tokenizer(text, openclip_tok, tokenizer_dir)
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
                hf_config=converted.hf_config,
                tokenizer=str(tokenizer_dir),
                pooling=converted.pooling,
                context_length=int(text.get("context_length", 77)),
            ),
            embed_dim=int(converted.embed_dim),
            image_proj=converted.image_proj_kind,
            init_logit_scale=float(converted.logit_scale),
            init_logit_bias=None if converted.logit_bias is None else float(converted.logit_bias),
        )
        _save_model(tmp, model_cfg, state, name)  # the tokenizer is already in tmp/tokenizer
        del state
        image_diff, text_diff = verify(openclip_model, openclip_tok, tmp, image_size, converted.openclip_pad)
        if max(image_diff, text_diff) > TOLERANCE:
            raise OpenClipImportError(
                f"{name}: the imported model differs from OpenCLIP's (image embeddings by {image_diff:.1e}, "
                f"text by {text_diff:.1e}, more than {TOLERANCE:.0e}): this architecture does not map exactly"
            )
    model_type = converted.hf_config["model_type"]
    return ImportReport(out_dir, timm_name, model_type, image_diff, text_diff, mean, std, notes)


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


def main(argv: list[str] | None = None, prog: str = "clip-import") -> int:
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
        return fail(prog, e)
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
