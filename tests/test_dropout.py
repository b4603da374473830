"""MaskDropout: the same dropout as nn.Dropout (keep rate, scaling, gradient, seeding), drawn faster."""

import pytest
import torch
from torch import nn

from clip_train.config import load_config
from clip_train.models.clip import ClipModel
from clip_train.models.dropout import MaskDropout, swap_dropout

TINY = ["run_dir=unused", "data.train_shards=unused", "model.text.hf_config.hidden_dropout_prob=0.2"]


def test_keeps_one_minus_p_of_the_elements_scaled_by_its_inverse():
    torch.manual_seed(0)
    drop = MaskDropout(0.1)
    x = torch.ones(400_000)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)  # 6 sigma at n = 4e5
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert y.mean().item() == pytest.approx(1.0, abs=0.004)  # unbiased, as nn.Dropout


def test_gradient_is_the_same_mask_and_eval_is_identity():
    torch.manual_seed(1)
    drop = MaskDropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    # d(out)/d(x) is the mask that made the output: 0 where dropped, 1/(1-p) where kept
    assert torch.allclose(x.grad, (y != 0).float() / 0.7)
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)


def test_masks_follow_torch_manual_seed():
    drop = MaskDropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    torch.manual_seed(4)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_swap_replaces_the_text_towers_dropouts_and_leaves_weights_alone():
    cfg = load_config(["configs/tiny.yaml"], TINY)
    model = ClipModel(cfg.model)  # ClipModel swaps them as it builds
    masks = [m for m in model.modules() if isinstance(m, MaskDropout)]
    assert masks and not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    assert {m.p for m in masks} >= {0.2}
    plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert swap_dropout(plain) == 1  # p = 0 stays a plain no-op
    assert isinstance(plain[1], MaskDropout) and type(plain[2]) is nn.Dropout
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


def test_a_model_in_train_mode_still_drops_out():
    cfg = load_config(["configs/tiny.yaml"], TINY)
    torch.manual_seed(0)
    model = ClipModel(cfg.model)
    tokens = torch.randint(5, 50, (4, 8))
    model.train()
    first, second = model.encode_text(tokens), model.encode_text(tokens)
    assert not torch.allclose(first, second)  # different masks each call
    model.eval()
    assert torch.allclose(model.encode_text(tokens), model.encode_text(tokens))
