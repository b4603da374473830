"""Export a saved clip_train model to OpenCLIP or to a Hugging Face VisionTextDualEncoderModel.

    clip-export runs/demo --to openclip --out exports/demo-openclip
    clip-export runs/demo/model --to hf --out exports/demo-hf
    python -m clip_train export runs/demo/checkpoints/step-300 --to openclip --out exports/step-300

SOURCE is what clip-eval takes: a model folder (ClipModel.save_pretrained), a checkpoint or a run
directory. The export is written into a hidden temporary folder beside --out, loaded back with the
target library and compared with clip_train on random images and a few captions (the same token
ids, normalised embeddings within 1e-5); only then is it renamed to --out. A model the target
cannot reproduce exactly is refused with one line naming the setting, and nothing is written.

OpenCLIP (--to openclip)
    The folder holds open_clip_config.json (OpenCLIP's model_cfg and preprocess_cfg),
    open_clip_model.safetensors (every weight, in OpenCLIP's key names) and the text model's
    transformers config.json and tokenizer files. OpenCLIP's `local-dir:` scheme reads all of it:

        import open_clip, torch
        folder = "exports/demo-openclip"
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")  # the HF tokenizer in the folder
        model.eval()
        with torch.no_grad():
            image_emb = model.encode_image(preprocess(pil_image).unsqueeze(0), normalize=True)
            text_emb = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)

    `preprocess` is clip_train's evaluation transform: resize the short side to
    model.image.image_size with the timm model's interpolation, centre crop, normalise with the
    model's mean/std (all stored in preprocess_cfg). The tokenizer pads to model.text.context_length.
    Mapping: the timm tower is OpenCLIP's TimmModel with timm_pool "" (the model's own pooling,
    which is what timm's num_classes=0 gives) and a bias-free linear timm_proj; the text tower is
    HFTextEncoder with hf_proj_type linear and hf_pooler_type mean_pooler (mean) or
    cls_last_hidden_state_pooler (cls; OpenCLIP's cls_pooler would use BERT's dense+tanh pooler).
    HFTextEncoder builds the transformer from the config only (hf_model_pretrained is false when a
    checkpoint is loaded), so the transformer's weights travel in open_clip_model.safetensors.
    hf_model_name is the folder's absolute path (HFTextEncoder resolves it against the working
    directory otherwise): after moving the folder, edit it in open_clip_config.json or re-export.
    (local-dir: is the route that also brings preprocess_cfg and the tokenizer; add_model_config
    with pretrained=<file> would need a flat config and falls back to OpenAI's mean/std.)

    Refused: pooling=eos (no OpenCLIP pooler takes the last real token); text models other than
    the encoders HFTextEncoder knows (bert, roberta, xlm-roberta; of mt5 and m2m_100 it keeps only
    the encoder, which clip_train does not); a timm model with a fixed input size (ViT) at another
    model.image.image_size than timm's default, because TimmModel cannot pass img_size.
    Exact but worth knowing: OpenCLIP's mean pooler divides by the mask sum without clamping, which
    differs only for a text of padding alone (no tokenizer makes one). OpenCLIP's tokenizer cleans
    text first (ftfy.fix_text, HTML entities unescaped twice, whitespace runs collapsed); clip_train's
    tokenizer does the same for every model, in training and evaluation (towers.clean_text), so
    curly quotes, `&amp;`, ligatures, full-width letters and mojibake get the same ids in both (the
    export checks texts of each kind and refuses otherwise). OpenCLIP's preprocess drops an alpha
    channel (transparent areas keep their hidden colour, usually black) where clip_train composites
    transparency on white (data.shards.to_rgb): the export notes it; composite such images first.

Hugging Face (--to hf)
    A VisionTextDualEncoderModel folder: config.json, model.safetensors, the tokenizer and
    preprocessor_config.json for timm's evaluation transform.

        import html, ftfy, torch.nn.functional as F
        from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel
        folder = "exports/demo-hf"
        model = VisionTextDualEncoderModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)  # model_max_length = context_length
        processor = AutoImageProcessor.from_pretrained(f"{folder}/preprocessor_config.json")
        # clip_train's (and OpenCLIP's) text cleaning, clip_train.models.towers.clean_text
        texts = [" ".join(html.unescape(html.unescape(ftfy.fix_text(t))).split()) for t in texts]
        tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        text_emb = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        image_emb = F.normalize(model.get_image_features(**processor(images)).pooler_output, dim=-1)

    (The processor is loaded from its file: given the folder, TimmWrapperImageProcessor reads
    config.json, which here is the dual encoder's. transformers' tokenizers do not clean text as
    clip_train's does, hence the cleaning line; the export notes it.) The image tower is
    transformers' TimmWrapperModel, whose pooler_output is timm's forward_head on forward_features
    with num_classes=0, exactly clip_train's tower. VisionTextDualEncoderModel pools text with the
    text model's pooler_output, and that decides what can be exported:
      - exact: a clip_text_model tower (CLIPTextModel, pooler_output = the final-norm hidden state
        at the first eos_token_id) with model.text.pooling=eos; the export sets eos_token_id to the
        token the tokenizer ends every text with ([SEP] for BERT tokenizers), so the first
        occurrence is the last real token (a caption that spells out that special token itself
        would end early). Refused when that id is 2: transformers then falls back to its legacy
        rule, the position of the largest token id.
      - refused: every BERT-style tower (bert, roberta, MiniLM, ...), whatever the pooling: their
        pooler_output is tanh(dense(first token)), not mean, cls or eos pooling, and no weights make
        a tanh layer the identity; any other pooling or model type.
    VisionTextDualEncoderModel has no logit bias: a SigLIP model exports with exact embeddings but
    its logits_per_image lack the bias (a note says so).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from clip_train.config import ConfigError
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.towers import TextTokenizer, image_normalization

TARGETS = ("openclip", "hf")
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
# Texts that OpenCLIP's cleaning changes (clip_train's tokenizer cleans the same way, towers.clean_text):
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


@dataclass
class ExportResult:
    folder: Path
    max_diff: dict[str, float]  # image / text: max |clip_train - export| of the normalised embeddings
    notes: list[str] = field(default_factory=list)


def export_model(model_dir: str | Path, to: str, out: str | Path) -> ExportResult:
    """Write the model in model_dir for `to` ("openclip" or "hf") into the new folder `out`."""
    if to not in TARGETS:
        raise ExportError(f"--to {to} is unknown: choose one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty: choose a new folder or remove it")
    model = ClipModel.from_pretrained(model_dir).eval()
    if model.cfg.image.concat:
        raise ExportError(
            f"--to {to} cannot express model.image.concat (several image towers side by side): "
            "neither OpenCLIP nor transformers has a concatenated image tower"
        )
    tokenizer = load_tokenizer(model_dir)
    notes = _check_openclip(model) if to == "openclip" else _check_hf(model, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out` so that the final rename stays on one file system (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with torch.no_grad(), _quiet_transformers():
            if to == "openclip":
                _write_openclip(model, tokenizer, tmp, hf_folder=tmp)
                max_diff, more_notes = _verify(model, tokenizer, _load_openclip(tmp), "OpenCLIP")
                # Verified with the text tower read from tmp; point it at where it will live.
                _write_openclip_config(model, tmp, hf_folder=out.resolve())
            else:
                _write_hf(model, tokenizer, tmp)
                max_diff, more_notes = _verify(model, tokenizer, _load_hf(tmp), "transformers")
        _make_ordinary(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder portably
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ExportResult(out, max_diff, notes + more_notes)


def _make_ordinary(folder: Path) -> None:
    """Modes as the umask gives new files: mkdtemp makes the folder private and safetensors writes
    its file 0600, but the export is an ordinary folder for others to read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ----------------------------------------------------------------------------------------------
# What each target can express


def _check_openclip(model: ClipModel) -> list[str]:
    try:
        from open_clip.hf_configs import arch_dict
    except ImportError:
        raise ExportError("--to openclip needs OpenCLIP: pip install open-clip-torch") from None
    pooling = model.text.pooling
    if pooling not in OPENCLIP_POOLERS:
        raise ExportError(
            f"--to openclip cannot reproduce model.text.pooling={pooling}: OpenCLIP's HFTextEncoder pools "
            "by mean, max or first token, never at the last real token"
        )
    transformer = model.text.transformer
    model_type = transformer.config.model_type
    if model_type not in arch_dict:
        raise ExportError(
            f"--to openclip cannot load a {model_type} text model: OpenCLIP's HFTextEncoder knows only "
            f"{', '.join(arch_dict)}"
        )
    # HFTextEncoder builds AutoModel.from_config(config, add_pooling_layer=...) and, for
    # encoder-decoder models, keeps only the encoder: other models cannot be rebuilt as clip_train ran them.
    takes_pooling_flag = "add_pooling_layer" in inspect.signature(type(transformer).__init__).parameters
    if transformer.config.is_encoder_decoder or not takes_pooling_flag:
        raise ExportError(
            f"--to openclip cannot rebuild the text model {type(transformer).__name__} as clip_train runs "
            "it: OpenCLIP's HFTextEncoder needs an encoder that takes add_pooling_layer"
        )
    image = model.cfg.image
    pcfg = get_pretrained_cfg(image.name)
    if pcfg is not None and pcfg.fixed_input_size and tuple(pcfg.input_size[-2:]) != (image.image_size,) * 2:
        raise ExportError(
            f"--to openclip cannot rebuild model.image.name={image.name} at model.image.image_size="
            f"{image.image_size}: OpenCLIP's TimmModel creates it at timm's {pcfg.input_size[-1]} px "
            "and cannot pass img_size"
        )
    _openclip_preprocess(model)  # refuses a resize OpenCLIP cannot do
    return [
        "the text tower is read from the export folder by absolute path (hf_model_name in "
        f"{OPENCLIP_CONFIG}): edit it there or export again after moving the folder",
        # clip_train's decoding (data.shards.to_rgb) vs open_clip.transform._convert_to_rgb
        "OpenCLIP's preprocess drops the alpha channel (transparent areas keep their hidden colour, "
        "usually black) where clip_train composites transparency on white: composite RGBA images on "
        "white first (clip_train.data.shards.to_rgb) for clip_train's pixels",
    ]


def _check_hf(model: ClipModel, tokenizer: TextTokenizer) -> list[str]:
    try:
        from transformers import TimmWrapperConfig, VisionTextDualEncoderModel  # noqa: F401
    except ImportError:
        raise ExportError(
            "--to hf needs transformers with TimmWrapperModel: pip install 'transformers>=4.48'"
        ) from None
    if model.cfg.image_proj != "linear":
        raise ExportError(
            f"--to hf cannot reproduce model.image_proj={model.cfg.image_proj}: "
            "VisionTextDualEncoderModel's visual_projection is one bias-free linear layer; use --to openclip"
        )
    transformer = model.text.transformer
    model_type = transformer.config.model_type
    pooling = model.text.pooling
    if model_type != "clip_text_model" or pooling != "eos":
        if "add_pooling_layer" in inspect.signature(type(transformer).__init__).parameters:
            pooler = "tanh(dense(first token)), BERT's pooler"
        elif model_type == "clip_text_model":
            pooler = "the hidden state at the first eos token"
        else:
            pooler = "not known to be it"
        raise ExportError(
            f"--to hf cannot reproduce model.text.pooling={pooling}: VisionTextDualEncoderModel pools text "
            f"with the text model's pooler_output, which for {model_type} is {pooler}; only clip_text_model "
            "towers with pooling=eos export exactly"
        )
    closing = _closing_token(tokenizer)
    if closing == HF_CLIP_LEGACY_EOS:
        raise ExportError(
            f"--to hf cannot pool at the last token: the tokenizer ends texts with id {closing}, and with "
            f"eos_token_id={HF_CLIP_LEGACY_EOS} CLIPTextModel pools at the largest token id instead"
        )
    notes = []
    if model.logit_bias is not None:
        notes.append(
            f"VisionTextDualEncoderModel has no logit bias: its logits_per_image lack clip_train's "
            f"logit_bias={model.logit_bias.item():.4g} (the embeddings are exact)"
        )
    return notes


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
            "entities, whitespace): pass texts through clip_train.models.towers.clean_text first for "
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
