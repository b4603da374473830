"""OpenCLIP's towers as clip_train's (openclip_import.py): the timm model that is OpenCLIP's image tower,
the state dicts of both towers converted to clip_train's names, and OpenCLIP's CLIP BPE tokenizer as a
transformers CLIPTokenizer folder."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from clip_train.models.openclip_config import CLIP_BPE_SIZE, OpenClipImportError, _refuse, _square
from clip_train.models.text_tower import TextTower

# The CLIP BPE vocabulary's special tokens, under the names transformers' CLIPTokenizer uses (OpenCLIP
# calls them <start_of_text>/<end_of_text>; the ids are what matters).
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


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
# The tokenizer


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
