"""Patch dropout (model.image.patch_dropout): fewer tokens through a ViT's blocks in training, all of
them at evaluation, refused for towers without patch tokens, counted in the FLOPs, exact on resume."""

import pytest
import torch
from runs import losses, run_train

from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clip_train.flops import count_training_flops
from clip_train.models.clip import ClipModel, config_from_saved
from clip_train.models.image_tower import build_image_tower

VIT = {"name": "test_vit", "image_size": 64, "channels_last": False}  # 16 patches of 16 px + a class token
TINY_TEXT = TextTowerConfig(
    tokenizer="builtin:tiny",
    hf_config={
        "model_type": "bert",
        "vocab_size": 1024,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
    context_length=16,
)


def _tokens_into_blocks(tower: torch.nn.Module, images: torch.Tensor) -> int:
    seen = []
    handle = tower.blocks[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[1]))
    try:
        tower(images)
    finally:
        handle.remove()
    return seen[0]


def test_training_drops_that_fraction_of_the_patch_tokens_and_evaluation_keeps_all():
    tower = build_image_tower(ImageTowerConfig(**VIT, patch_dropout=0.5))
    images = torch.randn(2, 3, 64, 64)
    prefix = tower.num_prefix_tokens
    assert _tokens_into_blocks(tower.train(), images) == prefix + 8  # half of the 16 patches
    assert _tokens_into_blocks(tower.eval(), images) == prefix + 16


def test_evaluation_gives_the_features_of_the_same_tower_without_patch_dropout():
    torch.manual_seed(0)
    dropping = build_image_tower(ImageTowerConfig(**VIT, patch_dropout=0.75)).eval()
    plain = build_image_tower(ImageTowerConfig(**VIT)).eval()
    plain.load_state_dict(dropping.state_dict())  # patch dropout adds no parameters
    images = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(dropping(images), plain(images), rtol=0, atol=0)
    dropping.train()
    with torch.no_grad():
        assert not torch.allclose(dropping(images), plain.train()(images))  # it does act in training


def test_a_tower_without_patch_tokens_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"model.image.patch_dropout=0.5 needs a ViT-style timm tower") as e:
        build_image_tower(ImageTowerConfig(name="test_efficientnet", image_size=64, patch_dropout=0.5))
    assert "\n" not in str(e.value) and "set model.image.patch_dropout=0" in str(e.value)


def test_the_flop_count_leaves_out_the_dropped_tokens():
    def image_flops(rate: float) -> int:
        cfg = ModelConfig(image=ImageTowerConfig(**VIT, patch_dropout=rate), text=TINY_TEXT, embed_dim=16)
        return count_training_flops(ClipModel(cfg)).image_forward

    full, half = image_flops(0.0), image_flops(0.5)
    # the patch embedding still sees every patch; the blocks see 9 of 17 tokens
    assert 0.45 * full < half < 0.75 * full


def test_fine_tuning_takes_patch_dropout_from_its_own_config(tmp_path):
    image = ImageTowerConfig(**VIT, patch_dropout=0.5)
    saved = ClipModel(ModelConfig(image=image, text=TINY_TEXT, embed_dim=16))
    saved.save_pretrained(tmp_path / "model")
    run = ModelConfig(image=ImageTowerConfig(**VIT, patch_dropout=0.25), text=TINY_TEXT)
    assert config_from_saved(tmp_path / "model", run).image.patch_dropout == 0.25


@pytest.mark.slow
def test_a_killed_run_with_patch_dropout_resumes_to_the_same_losses(tmp_path, tiny_data):
    vit = [f"model.image.{key}={str(value).lower()}" for key, value in VIT.items()]
    extra = [*vit, "model.image.patch_dropout=0.5"]
    straight = run_train(tmp_path / "straight", tiny_data, *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "resumed", tiny_data, *extra, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9
    resumed = run_train(tmp_path / "resumed", tiny_data, *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    # the tokens each step drops come from the restored RNG: the same after the resume
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]


def test_clip_train_refuses_patch_dropout_on_a_cnn_before_writing_anything(tmp_path, tiny_data):
    proc = run_train(tmp_path / "run", tiny_data, "model.image.patch_dropout=0.5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("clip-train: error: model.image.patch_dropout=0.5")
    assert not (tmp_path / "run").exists()


def test_checkpoints_from_before_patch_dropout_still_fit_a_run_without_it():
    from clip_train.config import to_dict
    from clip_train.train.checkpointing import model_fingerprint

    assert "patch_dropout" not in model_fingerprint(to_dict(ModelConfig()))["image"]  # as older meta.json
    dropping = ModelConfig(image=ImageTowerConfig(**VIT, patch_dropout=0.5))
    assert model_fingerprint(to_dict(dropping))["image"]["patch_dropout"] == 0.5  # a change is refused
