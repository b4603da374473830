"""OpenCLIP import: tiny OpenCLIP models with random weights, written as checkpoints the way open_clip and
open_clip_train save them, imported, and compared with OpenCLIP itself (embeddings and token ids)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
open_clip = pytest.importorskip("open_clip")

from clip_train.models.clip import ClipModel, load_tokenizer  # noqa: E402
from clip_train.models.openclip_config import (  # noqa: E402
    OpenClipImportError,
    openclip_preprocess,
    resolve_openclip_config,
)
from clip_train.models.openclip_convert import check_timm_trunk, find_timm_vit  # noqa: E402
from clip_train.models.openclip_import import import_openclip, main  # noqa: E402
from clip_train.models.tokenizer import tiny_tokenizer  # noqa: E402

# Other captions than the import's own check, with what a tokenizer can get wrong: case, punctuation,
# contractions, digits, accents, whitespace, and truncation at the context length.
CAPTIONS = [
    "A Photo of a DOG.",
    "what's that?! a bird, a plane...",
    "3 apples & 2 pears; 100% fresh",
    "  leading and trailing spaces  ",
    "crème brûlée at the café",
    "a picture with a very long caption that does not fit into the context length at all, really",
    "x",
]

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
# A native OpenCLIP ViT with the layout of timm's vit_xsmall_patch16_clip_224 (width 256, 10 layers,
# 4 heads, ln_pre), at 64 px so it runs fast.
CLIP_VIT = {"image_size": 64, "layers": 10, "width": 256, "head_width": 64, "patch_size": 16}
# ... and with the layout of timm's test_vit: no ln_pre, LayerNorm eps 1e-6, 2 heads of 32, MLP ratio 3.
TEST_VIT = {
    "image_size": 64,
    "layers": 6,
    "width": 64,
    "head_width": 32,
    "mlp_ratio": 3,
    "patch_size": 16,
    "no_ln_pre": True,
    "norm_kwargs": {"eps": 1e-6},
}
# A timm trunk (timm's test_vit at its own 160 px) with OpenCLIP's linear projection head.
TIMM_TRUNK = {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "", "timm_proj": "linear"}


def _openclip_model(cfg: dict, seed: int):
    """An OpenCLIP model with every parameter random (LayerNorms and biases too, so that any mapping
    error shows in the embeddings)."""
    cfg = json.loads(json.dumps(cfg))
    hf_text = "hf_model_name" in cfg["text_cfg"]
    if hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = False  # random weights, set below
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) or hf_text else open_clip.CLIP
    model = cls(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise * p.shape[-1] ** -0.5)
            elif "logit" in name:
                p.fill_(2.5)
            else:  # LayerNorm weights around 1, biases around 0
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return model


def _write(tmp_path, cfg: dict, seed: int, style: str):
    """(config path, checkpoint path, OpenCLIP model) for a checkpoint saved in `style`."""
    model = _openclip_model(cfg, seed)
    config = tmp_path / "model_cfg.json"
    config.write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if style == "safetensors":
        checkpoint = tmp_path / "open_clip_model.safetensors"
        save_file(state, str(checkpoint))
    elif style == "plain":
        checkpoint = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, checkpoint)
    else:  # as open_clip_train saves it: wrapped, with the DDP "module." prefix
        checkpoint = tmp_path / "epoch_3.pt"
        wrapped = {"module." + k: v for k, v in state.items()}
        torch.save({"epoch": 3, "name": "test", "state_dict": wrapped, "optimizer": {}}, checkpoint)
    return config, checkpoint, model


def _openclip_tokenizer(cfg: dict):
    text = cfg["text_cfg"]
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text["hf_tokenizer_name"], context_length=text["context_length"]
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=text["context_length"])


def _assert_same_as_openclip(folder, openclip_model, cfg, openclip_pad: int = 0):
    model = ClipModel.from_pretrained(folder).eval()
    tokenize = load_tokenizer(folder)
    ours, theirs = tokenize(CAPTIONS), _openclip_tokenizer(cfg)(CAPTIONS)
    # OpenCLIP's CLIP tokenizer pads with 0 (a real token); clip_train's with a token of its own
    assert torch.equal(ours.masked_fill(ours == tokenize.pad_token_id, openclip_pad), theirs)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = model.encode_image(images), openclip_model.encode_image(images, normalize=True)
        text = model.encode_text(ours), openclip_model.encode_text(theirs, normalize=True)
    image_diff = (image[0] - image[1]).abs().max().item()
    text_diff = (text[0] - text[1]).abs().max().item()
    assert image_diff < 1e-5 and text_diff < 1e-5, (image_diff, text_diff)
    # distinct inputs give distinct embeddings (a degenerate tower would match trivially)
    assert torch.cdist(text[0], text[0]).fill_diagonal_(1).min() > 1e-3
    assert torch.cdist(image[0], image[0]).fill_diagonal_(1).min() > 1e-3
    assert model.logit_scale.item() == pytest.approx(2.5)
    return model


def test_native_vit_and_text_from_a_safetensors_checkpoint(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": CLIP_VIT, "text_cfg": TEXT}
    config, checkpoint, openclip_model = _write(tmp_path, cfg, seed=0, style="safetensors")
    out = import_openclip(config, checkpoint, tmp_path / "imported")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    model = _assert_same_as_openclip(out, openclip_model, cfg)
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["image"]["name"] == "vit_xsmall_patch16_clip_224" and saved["image"]["image_size"] == 64
    assert saved["image"]["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert saved["text"]["pooling"] == "eos" and saved["text"]["hf_config"]["model_type"] == "clip_text_model"
    assert saved["text"]["hf_config"]["hidden_act"] == "gelu" and saved["embed_dim"] == 32
    assert model.logit_bias is None
    # the tokenizer folder is a CLIPTokenizer with the BPE files, as transformers reads it
    names = {p.name for p in (out / "tokenizer").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= names
    assert (
        json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "CLIPTokenizer"
    )


def test_training_checkpoint_through_the_command_line(tmp_path, capsys):
    # open_clip_train's {"state_dict": {"module.…"}} file, the test_vit layout (no ln_pre, eps 1e-6), a
    # SigLIP-style logit bias, and a normalisation given on the command line
    text = dict(TEXT, norm_kwargs={"eps": 1e-6})
    cfg = {"embed_dim": 48, "init_logit_bias": -10.0, "vision_cfg": TEST_VIT, "text_cfg": text}
    config, checkpoint, openclip_model = _write(tmp_path, cfg, seed=1, style="train")
    out = tmp_path / "nested" / "imported"
    argv = ["--model", str(config), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5"]) == 0
    assert "test_vit" in capsys.readouterr().out
    model = _assert_same_as_openclip(out, openclip_model, cfg)
    assert model.logit_bias is not None and model.logit_bias.item() == pytest.approx(
        openclip_model.logit_bias.item()
    )
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["image"]["mean"] == [0.5] * 3 and saved["image"]["std"] == [0.5] * 3
    assert saved["text"]["hf_config"]["layer_norm_eps"] == 1e-6
    assert [p.name for p in out.parent.iterdir()] == ["imported"]  # no temporary folder left behind

    # an existing folder is never overwritten
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1


def test_timm_trunk_with_quickgelu_text_from_a_plain_checkpoint(tmp_path):
    # a timm vision tower (its own classifier replaced by OpenCLIP's linear head) and a QuickGELU text
    # transformer: OpenCLIP's quick_gelu reaches only its own towers, never timm's
    cfg = {
        "embed_dim": 40,
        "quick_gelu": True,
        "custom_text": True,
        "vision_cfg": TIMM_TRUNK,
        "text_cfg": TEXT,
    }
    config, checkpoint, openclip_model = _write(tmp_path, cfg, seed=2, style="plain")
    out = import_openclip(config, checkpoint, tmp_path / "imported")
    _assert_same_as_openclip(out, openclip_model, cfg)
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["image"]["name"] == "test_vit" and saved["text"]["hf_config"]["hidden_act"] == "quick_gelu"


def test_timm_trunk_with_an_mlp_projection_head(tmp_path):
    # timm_proj mlp: OpenCLIP's head is timm's Mlp (fc1 with bias, GELU, bias-free fc2), as is
    # clip_train's model.image_proj=mlp
    cfg = {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": {**TIMM_TRUNK, "timm_proj": "mlp"},
        "text_cfg": TEXT,
    }
    config, checkpoint, openclip_model = _write(tmp_path, cfg, seed=5, style="safetensors")
    out = import_openclip(config, checkpoint, tmp_path / "imported")
    model = _assert_same_as_openclip(out, openclip_model, cfg)
    assert model.cfg.image_proj == "mlp" and model.image_proj.fc1.out_features == 48

    biased = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "timm_proj_bias": True}}
    (tmp_path / "biased_src").mkdir()
    config, checkpoint, _ = _write(tmp_path / "biased_src", biased, seed=5, style="plain")
    with pytest.raises(OpenClipImportError, match="timm_proj_bias is not supported"):
        import_openclip(config, checkpoint, tmp_path / "biased")


def test_hugging_face_text_tower_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = {
        "context_length": 16,
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
    }
    cfg = {"embed_dim": 24, "vision_cfg": CLIP_VIT, "text_cfg": text}
    config_path, checkpoint, openclip_model = _write(tmp_path, cfg, seed=3, style="safetensors")
    out = import_openclip(config_path, checkpoint, tmp_path / "imported")
    _assert_same_as_openclip(out, openclip_model, cfg, openclip_pad=tokenizer.pad_token_id)
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["text"]["pooling"] == "mean" and saved["text"]["hf_config"]["model_type"] == "bert"


@pytest.mark.parametrize(
    "name, timm_name",
    [
        ("ViT-B-32", "vit_base_patch32_clip_224"),
        ("ViT-B-32-quickgelu", "vit_base_patch32_clip_quickgelu_224"),
        ("ViT-B-16", "vit_base_patch16_clip_224"),
        ("ViT-L-14-336", "vit_large_patch14_clip_336"),
    ],
)
def test_bundled_architectures_map_to_timm_clip_vits(name, timm_name):
    # structure only (meta device): building these models for real is too slow for a unit test
    _, cfg, _, bundled = resolve_openclip_config(name)
    assert bundled and find_timm_vit(cfg["vision_cfg"], cfg.get("quick_gelu", False)) == timm_name


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "resnet18"])
def test_timm_trunks_whose_pooling_is_a_module_are_accepted_unless_they_pool_otherwise(name):
    # EfficientNet and ResNet hold global_pool as a module: compared by its structure, not identity
    # (structure only, on the meta device)
    assert check_timm_trunk({"timm_model_name": name, "image_size": 224, "timm_pool": ""}) == name
    with pytest.raises(OpenClipImportError, match="timm_pool='max'"):
        check_timm_trunk({"timm_model_name": name, "image_size": 224, "timm_pool": "max"})


def test_normalisation_follows_the_pretrained_tags_of_a_bundled_architecture():
    # all MobileCLIP-B tags feed [0, 1] pixels; ViT-B-32's tags use OpenAI's statistics, OpenCLIP's default
    mobile = openclip_preprocess("MobileCLIP-B", True, {})
    assert (
        mobile["mean"] == [0.0] * 3 and mobile["std"] == [1.0] * 3 and mobile["interpolation"] == "bilinear"
    )
    assert openclip_preprocess("ViT-B-32", True, {})["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    # an open_clip_config.json's own preprocess_cfg wins
    assert openclip_preprocess("MobileCLIP-B", True, {"mean": [0.5] * 3})["mean"] == [0.5] * 3


@pytest.mark.parametrize(
    "model, feature",
    [
        ("coca_ViT-B-32", "CoCa (multimodal_cfg)"),
        ("RN50", "ModifiedResNet"),
        ("ViT-B-16-SigLIP", "text_cfg.pool_type=last"),
        ("ViT-H-14-CLIPA", "vision_cfg.pool_type=avg"),
        ("roberta-ViT-B-32", "not a local Hugging Face folder"),
        ("hf-hub:timm/ViT-B-16-SigLIP", "nothing is downloaded"),
        ("ViT-B-33", "did you mean ViT-B-32?"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(tmp_path, model, feature):
    with pytest.raises(OpenClipImportError) as info:
        import_openclip(model, None, tmp_path / "out")
    assert feature in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_command_line_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cfg = {"embed_dim": 32, "vision_cfg": dict(CLIP_VIT, width=320), "text_cfg": TEXT}
    (tmp_path / "odd.json").write_text(json.dumps(cfg))
    cases = {
        "no registered timm model has this ViT": [
            "--model",
            str(tmp_path / "odd.json"),
            "--out",
            str(tmp_path / "a"),
        ],
        "does not exist": [
            "--model",
            "ViT-B-32",
            "--checkpoint",
            str(tmp_path / "no.pt"),
            "--out",
            str(tmp_path / "b"),
        ],
    }
    for message, argv in cases.items():
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    with pytest.raises(SystemExit) as info:  # a usage error, from argparse
        main(["--model", "ViT-B-32"])
    assert info.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0
    assert not list(tmp_path.glob("[ab]")) and not list(tmp_path.glob(".*"))


def test_the_clip_import_command_reports_a_bad_architecture_in_one_line(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "clip_train", "import", "--model", "no-such-arch", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-import: error:") and "no-such-arch" in lines[0]
    assert not (tmp_path / "o").exists()
