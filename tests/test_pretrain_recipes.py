"""OpenCLIP's architectures by name (model.arch, models/arch.py) and the pretraining recipes
(configs/pretrain/*.yaml) that use them."""

import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from runs import REPO, losses

from clip_train.config import ARCHITECTURES, ConfigError, ModelConfig, load_config
from clip_train.models.arch import arch_model_config, siglip_style_difference
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.tokenizer import build_tokenizer

RECIPES = sorted((Path(REPO) / "configs" / "pretrain").glob("*.yaml"))
CAPTIONS = ["a photo of a dog.", "Two cats   on a sofa!", "an émoji &amp; a café, 2024"]


def _load(recipe: Path, run_dir: Path, *overrides: str):
    return load_config([recipe], [f"run_dir={run_dir}", "data.train_shards=x", *overrides])


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_has_open_clips_parameter_count_up_to_the_documented_rows(name):
    base = ModelConfig(arch=f"openclip:{name}")
    if "SigLIP" in name:
        base.init_logit_bias = -10.0  # as loss.kind=siglip fills it in; OpenCLIP's SigLIP has one too
    cfg = arch_model_config(base)
    with torch.device("meta"):  # structure only: no memory, no init
        ours = ClipModel(cfg)
    theirs = open_clip.create_model(name, device="meta")
    width = cfg.text.hf_config["hidden_size"]
    # the pad token's embedding row (write_clip_tokenizer), and for SigLIP-style what arch.py lists
    expected = siglip_style_difference(width, cfg.embed_dim) if "SigLIP" in name else width
    assert _param_count(ours) - _param_count(theirs) == expected
    # the image tower alone is OpenCLIP's exactly (its projection aside)
    theirs_visual = _param_count(theirs.visual) - (theirs.visual.proj.numel() if "SigLIP" not in name else 0)
    assert _param_count(ours.visual) == theirs_visual
    assert cfg.image.channels_last is False and cfg.text.tokenizer == "builtin:clip-bpe"


def test_the_clip_bpe_tokenizer_gives_open_clips_ids_and_pads_with_its_own_token():
    ours = build_tokenizer(arch_model_config(ModelConfig(arch="openclip:ViT-B-32")).text)
    theirs = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    ids = ours(CAPTIONS)
    assert ids.shape == theirs.shape == (3, 77)
    pad = ids.eq(ours.pad_token_id)
    assert pad.any() and not theirs[~pad].eq(0).any()  # padding exactly where OpenCLIP pads
    assert torch.equal(ids[~pad], theirs[~pad])


def test_architecture_config_errors_are_one_line_and_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"model.arch=openclip:ViT-B-23 .* did you mean openclip:ViT-B-32"):
        _load(RECIPES[0], tmp_path, "model.arch=openclip:ViT-B-23")
    with pytest.raises(ConfigError, match="both give the architecture: drop one"):
        _load(RECIPES[0], tmp_path, f"model.init_from={tmp_path}")
    with pytest.raises(ConfigError, match="drop model.text.pretrained"):
        _load(RECIPES[0], tmp_path, "model.text.pretrained=x")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_is_openclips_laion_400m_setting_on_8_gpus(recipe, tmp_path):
    cfg = _load(recipe, tmp_path)
    assert cfg.model.arch.removeprefix("openclip:") in ARCHITECTURES
    assert 8 * cfg.data.batch_size * cfg.train.accum_steps == 32768
    optim = cfg.optim
    assert (optim.lr, optim.weight_decay, optim.beta1, optim.beta2, optim.eps) == (5e-4, 0.2, 0.9, 0.98, 1e-6)
    assert cfg.train.precision == "bf16" and optim.warmup_steps == 2000
    siglip = "siglip" in recipe.stem
    assert cfg.loss.kind == ("siglip" if siglip else "infonce")
    assert cfg.model.init_logit_bias == (-10.0 if siglip else None)
    assert math.isclose(cfg.model.init_logit_scale, math.log(10) if siglip else math.log(1 / 0.07))


@pytest.mark.slow
def test_the_vit_b_32_recipe_trains_at_toy_size_on_the_cpu_and_saves_a_model_that_loads(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    shards = tiny_data["shards"]
    done = subprocess.run(
        [
            sys.executable, "-m", "clip_train", "train", "configs/pretrain/vit-b-32.yaml",
            f"run_dir={run_dir}", f"data.train_shards={shards}/train-*.tar",
            f"data.val_shards={shards}/val-000000.tar", "eval.retrieval_limit=8",
            "train.steps=2", "data.batch_size=2", "train.accum_steps=1", "data.num_workers=0",
            "optim.warmup_steps=1", "train.ckpt_every=0", "train.keep_last=1",
        ],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(run_dir)) == [2] and all(math.isfinite(v) for v in losses(run_dir).values())
    # the public folder needs neither open_clip nor the arch key: the resolved towers are stored
    model = ClipModel.from_pretrained(run_dir / "model")
    assert model.cfg.arch == "" and model.cfg.image.name == "vit_base_patch32_clip_224"
    tokens = load_tokenizer(run_dir / "model")(CAPTIONS)
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (3, 512)
