"""Export a saved clip_train model to OpenCLIP or to a Hugging Face VisionTextDualEncoderModel.

    clip-export runs/demo --to openclip --out exports/demo-openclip
    clip-export runs/demo/model --to hf --out exports/demo-hf
    python -m clip_train export runs/demo/checkpoints/step-300 --to openclip --out exports/step-300

SOURCE is what clip-eval takes: a model folder (ClipModel.save_pretrained), a checkpoint or a run
directory. The export is written into a hidden temporary folder beside --out, loaded back with the
target library and compared with clip_train on random images and a few captions (the same token
ids, normalised embeddings within 1e-5); only then is it renamed to --out. A model the target
cannot reproduce exactly is refused with one line naming the setting, and nothing is written. This
module decides what each target can express; the files and the comparison are export_formats.py's.

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
    tokenizer does the same for every model, in training and evaluation (tokenizer.clean_text), so
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
        # clip_train's (and OpenCLIP's) text cleaning, clip_train.models.tokenizer.clean_text
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

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models import get_pretrained_cfg

from clip_train.atomic import temporary_folder
from clip_train.export_formats import (
    HF_CLIP_LEGACY_EOS,
    OPENCLIP_CONFIG,
    OPENCLIP_POOLERS,
    ExportError,
    _closing_token,
    _load_hf,
    _load_openclip,
    _openclip_preprocess,
    _quiet_transformers,
    _verify,
    _write_hf,
    _write_openclip,
    _write_openclip_config,
)
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.tokenizer import TextTokenizer

TARGETS = ("openclip", "hf")


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

    # Written beside `out` (so the final rename stays on one file system), renamed onto it once verified.
    with temporary_folder(out, suffix=".partial") as tmp:
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
