import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_train.loss import ClipLoss, reference_clip_loss


def _embeddings(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def test_loss_matches_brute_force_loss_and_gradients():
    image, text = _embeddings(12, 8, seed=0)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(image, text, scale.exp())
    grads = torch.autograd.grad(loss, (image, text, scale))
    ref = reference_clip_loss(image, text, scale.exp())
    ref_grads = torch.autograd.grad(ref, (image, text, scale))
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_perfectly_matched_pairs_have_lower_loss_than_shuffled():
    image, _ = _embeddings(16, 32, seed=1)
    scale = torch.tensor(100.0)
    matched = ClipLoss()(image.float(), image.float(), scale)
    shuffled = ClipLoss()(image.float(), image.float().roll(1, dims=0), scale)
    assert matched < 0.01 < shuffled


def test_logit_bias_enters_the_loss():
    image, text = _embeddings(6, 4, seed=2)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    got = ClipLoss()(image, text, scale, bias)
    # softmax cross-entropy is shift-invariant: a scalar bias must not change the InfoNCE loss
    assert torch.allclose(got.double(), reference_clip_loss(image, text, scale), atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text = _embeddings(8, 6, seed=3)  # the global batch, identical on every rank
        n = image.shape[0] // world
        local_image = image[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        local_text = text[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss = ClipLoss()(local_image, local_text, log_scale.exp())
        loss.backward()
        out[rank] = (loss.item(), local_image.grad.clone(), local_text.grad.clone(), log_scale.grad.clone())
    finally:
        dist.destroy_process_group()


def test_two_process_local_loss_equals_global_batch_loss():
    """Each rank: its rows x gathered columns. Averaged over ranks (as DDP averages gradients) the
    loss and the gradients equal those of one process on the concatenated batch."""
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    image, text = _embeddings(8, 6, seed=3)
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref = reference_clip_loss(image, text, log_scale.exp())
    ref.backward()
    losses = [out[r][0] for r in range(world)]
    assert sum(losses) / world == pytest.approx(ref.item(), abs=1e-6)
    n = 8 // world
    for r in range(world):
        # The gather's backward sums every rank's gradient into the owner; DDP then divides by W.
        assert torch.allclose(out[r][1] / world, image.grad[r * n : (r + 1) * n], atol=1e-6)
        assert torch.allclose(out[r][2] / world, text.grad[r * n : (r + 1) * n], atol=1e-6)
    mean_scale_grad = sum(out[r][3] for r in range(world)) / world
    assert torch.allclose(mean_scale_grad, log_scale.grad, atol=1e-6)
