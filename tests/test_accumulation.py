"""GradCache accumulation: k micro-batches give exactly the gradients of one k * m batch."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip_train import accumulation
from clip_train.accumulation import accumulated_backward
from clip_train.loss.contrastive import ContrastiveLoss


class TwoTowers(nn.Module):
    """A stand-in for ClipModel with the same outputs, dropout in both towers and LayerNorm."""

    def __init__(self, dropout: float, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(
            nn.Linear(12, 32), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(32), nn.Linear(32, 8)
        )
        self.text = nn.Sequential(nn.Linear(10, 32), nn.Dropout(dropout), nn.Tanh(), nn.Linear(32, 8))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if bias else None

    def forward(self, images, tokens):
        image_emb = F.normalize(self.image(images), dim=-1)
        text_emb = F.normalize(self.text(tokens), dim=-1)
        return image_emb, text_emb, self.logit_scale.exp(), self.logit_bias


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)


def _micro_batches(images, tokens, k):
    return list(zip(images.chunk(k), tokens.chunk(k)))


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_grads(got: dict, want: dict, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=1e-5), f"gradient of {name} differs"


def _reference_micro_forwards(model, micro_batches, loss_fn):
    """The full batch with the same dropout masks: each micro-batch forwarded once, with autograd,
    in order from the same RNG state (what GradCache's first pass draws), one loss, one backward."""
    outputs = [model(*mb) for mb in micro_batches]
    image = torch.cat([o[0] for o in outputs])
    text = torch.cat([o[1] for o in outputs])
    loss = loss_fn(image, text, outputs[-1][2], outputs[-1][3])
    loss.backward()
    return loss


@pytest.mark.parametrize("kind, impl", [("infonce", "local"), ("infonce", "tiled"), ("siglip", "tiled")])
def test_four_micro_batches_with_dropout_equal_the_full_batch(kind, impl):
    images, tokens = _batch(12, seed=1)
    loss_fn = ContrastiveLoss(kind, impl, block_size=5)
    model = TwoTowers(dropout=0.3, bias=kind == "siglip")
    micro = _micro_batches(images, tokens, 4)

    torch.manual_seed(123)
    want_loss = _reference_micro_forwards(model, micro, loss_fn)
    want, want_rng = _grads(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    got_loss = accumulated_backward(model, micro, loss_fn)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_same_grads(_grads(model), want)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the random stream continues as if run once
    assert model.logit_scale.grad.abs() > 0  # the temperature did get its (single) gradient


def test_without_rng_replay_dropout_makes_the_gradients_differ(monkeypatch):
    """The check above can fail: replaying with fresh dropout masks gives other gradients."""
    images, tokens = _batch(12, seed=1)
    loss_fn = ContrastiveLoss()
    model = TwoTowers(dropout=0.3)
    micro = _micro_batches(images, tokens, 4)
    torch.manual_seed(123)
    _reference_micro_forwards(model, micro, loss_fn)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(accumulation, "restore_rng", lambda state: None)
    torch.manual_seed(123)
    accumulated_backward(model, micro, loss_fn)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_grads(_grads(model), want)


def test_without_dropout_four_micro_batches_equal_one_forward_of_the_whole_batch():
    images, tokens = _batch(16, seed=2)
    loss_fn = ContrastiveLoss()
    model = TwoTowers(dropout=0.0)
    loss = loss_fn(*model(images, tokens))
    loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got_loss = accumulated_backward(model, _micro_batches(images, tokens, 4), loss_fn)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    _assert_same_grads(_grads(model), want)


def test_batchnorm_running_statistics_are_updated_once_per_micro_batch():
    model = nn.Module()
    model.bn = nn.BatchNorm1d(12)
    model.head = TwoTowers(dropout=0.0)
    model.forward = lambda images, tokens: model.head(model.bn(images), tokens)
    images, tokens = _batch(8, seed=3)
    accumulated_backward(model, _micro_batches(images, tokens, 2), ContrastiveLoss())
    assert model.bn.num_batches_tracked.item() == 2  # the replay's updates only, not 4


# ------------------------------------------------------------------------------------------------
# Under DDP: micro-batches before the last run under no_sync; the last reduces every gradient,
# the temperature's included. Two ranks x two micro-batches equal one process on the global batch.

M, K, WORLD = 3, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, tokens = _batch(M * K * world, seed=4)
        per_rank = M * K
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        model = DistributedDataParallel(TwoTowers(dropout=0.0, bias=True))
        loss = accumulated_backward(
            model,
            _micro_batches(images[mine], tokens[mine], K),
            ContrastiveLoss("siglip", "tiled", block_size=4),
            no_sync=model.no_sync,
        )
        out[rank] = (loss.item(), _grads(model.module))
    finally:
        dist.destroy_process_group()


def test_two_processes_with_accumulation_equal_one_process_on_the_global_batch():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    images, tokens = _batch(M * K * WORLD, seed=4)
    model = TwoTowers(dropout=0.0, bias=True)
    loss = ContrastiveLoss("siglip", "dense")(*model(images, tokens))
    loss.backward()
    want = _grads(model)
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(loss.item(), rel=1e-6)
    for rank in range(WORLD):
        _assert_same_grads(out[rank][1], want)  # DDP averaged: every rank holds the global gradient


def test_batchnorm_that_trains_is_listed_and_frozen_batchnorm_is_not():
    from clip_train.accumulation import batch_statistics_layers
    from clip_train.config import ImageTowerConfig
    from clip_train.models.image_tower import build_image_tower

    training = build_image_tower(ImageTowerConfig(name="test_efficientnet"))
    locked = build_image_tower(ImageTowerConfig(name="test_efficientnet", lock=True, freeze_bn_stats=True))
    assert len(batch_statistics_layers(training)) > 0
    assert batch_statistics_layers(locked) == []
    assert batch_statistics_layers(build_image_tower(ImageTowerConfig(name="test_vit"))) == []  # LayerNorm
