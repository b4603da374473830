import math
import os
import socket
from contextlib import nullcontext
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_train.loss.blockwise import tiled_infonce
from clip_train.loss.contrastive import ContrastiveLoss
from clip_train.loss.reference import reference_infonce, reference_siglip

REFERENCE = {"infonce": reference_infonce, "siglip": reference_siglip}


def _embeddings(n: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return image, text


def _loss_and_grads(fn, image, text, log_scale: float, bias: float | None, forward_context=nullcontext):
    """fn's value and its gradients w.r.t. image, text, log-temperature and bias. The backward runs
    outside forward_context, as in training (backward under autocast would be autocast too)."""
    image = image.detach().clone().requires_grad_(True)
    text = text.detach().clone().requires_grad_(True)
    scale = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    bias_t = torch.tensor(bias, dtype=torch.float64, requires_grad=True) if bias is not None else None
    with forward_context():
        loss = fn(image, text, scale.exp(), bias_t)
    leaves = [image, text, scale] + ([bias_t] if bias_t is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return loss.double(), [g.double() for g in grads]


def _assert_matches_reference(kind, impl, block, image, text, log_scale, bias, rtol=1e-5):
    got, got_grads = _loss_and_grads(ContrastiveLoss(kind, impl, block), image, text, log_scale, bias)
    want, want_grads = _loss_and_grads(REFERENCE[kind], image, text, log_scale, bias)
    assert got.item() == pytest.approx(want.item(), rel=rtol, abs=1e-6)
    for name, g, w in zip(["image", "text", "scale", "bias"], got_grads, want_grads):
        tolerance = rtol * w.abs().max().item() + 1e-6  # fp32 rounding of sums near 0 (InfoNCE d bias)
        assert (g - w).abs().max().item() <= tolerance, f"{kind}/{impl} block {block}: d{name} differs"


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("impl", ["dense", "local", "tiled"])
@pytest.mark.parametrize(
    "n, d, block",
    [(16, 8, 4), (13, 5, 4), (7, 33, 64), (9, 3, 1), (40, 16, 7)],  # divisible, ragged, one tile, 1x1
)
def test_every_mode_equals_brute_force_loss_and_all_gradients(kind, impl, n, d, block):
    image, text = _embeddings(n, d, seed=n * d + block)
    _assert_matches_reference(kind, impl, block, image, text, log_scale=math.log(10.0), bias=-2.0)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_tiled_is_exact_without_a_bias_and_at_the_largest_temperature(kind):
    # logit scale 100 spreads the logits over [-100, 100]: the online log-sum-exp must not overflow
    image, text = _embeddings(24, 6, seed=5)
    _assert_matches_reference(kind, "tiled", 5, image, text, log_scale=math.log(100.0), bias=None)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("impl", ["dense", "local", "tiled"])
def test_bf16_embeddings_under_autocast_are_scored_in_fp32(kind, impl):
    """Embeddings produced under bf16 autocast: the loss must not compute its logits in bf16."""
    image, text = _embeddings(20, 16, seed=7, dtype=torch.bfloat16)
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    got, got_grads = _loss_and_grads(
        ContrastiveLoss(kind, impl, 6), image, text, math.log(20.0), -1.0, autocast
    )
    want, want_grads = _loss_and_grads(REFERENCE[kind], image.double(), text.double(), math.log(20.0), -1.0)
    # bf16 logits would be off by ~1e-2 relative; fp32 logits of the same bf16 inputs agree to ~1e-6
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(got_grads, want_grads):  # embedding gradients are bf16, like the embeddings
        assert torch.allclose(g, w, rtol=1e-2 if g.numel() > 1 else 1e-5, atol=1e-6)


def test_tiled_gradients_come_back_in_the_input_dtype():
    image, text = _embeddings(10, 8, seed=8, dtype=torch.bfloat16)
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = ContrastiveLoss("infonce", "tiled", 4)(image, text, torch.tensor(10.0))
    loss.backward()
    assert image.grad.dtype == torch.bfloat16 and text.grad.dtype == torch.bfloat16


def test_tiled_keeps_no_n_by_n_tensor_for_the_backward():
    """The point of tiling: autograd saves the inputs and per-row statistics, never the matrix."""
    n, d = 64, 8
    image, text = _embeddings(n, d, seed=9)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)

    def largest_saved(impl):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            ContrastiveLoss("infonce", impl, block_size=16)(image, text, scale)
        return max(sizes)

    assert largest_saved("dense") >= n * n  # the baseline keeps the logits
    assert largest_saved("tiled") <= n * d  # tiled keeps the embeddings themselves, nothing bigger


def test_matched_pairs_score_lower_than_shuffled_ones():
    image, _ = _embeddings(16, 32, seed=1)
    scale = torch.tensor(100.0)
    for kind in ("infonce", "siglip"):
        loss = ContrastiveLoss(kind, "tiled", 5)
        assert loss(image, image, scale, torch.tensor(-10.0)) < loss(
            image, image.roll(1, 0), scale, torch.tensor(-10.0)
        )


def test_infonce_is_invariant_to_a_scalar_bias():
    image, text = _embeddings(6, 4, seed=2)
    scale = torch.tensor(10.0)
    for impl in ("dense", "tiled"):
        with_bias = ContrastiveLoss("infonce", impl, 4)(image, text, scale, torch.tensor(-3.0))
        assert with_bias.item() == pytest.approx(reference_infonce(image, text, scale).item(), abs=1e-6)


def test_both_directions_needs_the_square_problem():
    image, text = _embeddings(6, 4, seed=2)
    with pytest.raises(ValueError, match="square"):
        tiled_infonce(image[:3], text, torch.tensor(1.0), None, 0, 4, True)


def test_bad_kind_or_impl_names_the_choices():
    with pytest.raises(ValueError, match="choose kind from"):
        ContrastiveLoss("softmax")


# ------------------------------------------------------------------------------------------------
# Two processes on gloo: each rank passes its own rows; averaged over ranks (as DDP averages
# gradients) the loss and the gradients equal one process's on the concatenated global batch.

CASES = [
    ("infonce", "local"),
    ("infonce", "dense"),
    ("infonce", "tiled"),
    ("siglip", "local"),
    ("siglip", "tiled"),
]
GLOBAL_N, DIM, BLOCK, LOG_SCALE, BIAS = 10, 6, 3, math.log(12.0), -4.0  # 5 rows per rank: ragged tiles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text = _embeddings(GLOBAL_N, DIM, seed=3)  # the global batch, identical on every rank
        n = GLOBAL_N // world
        for kind, impl in CASES:
            local = slice(rank * n, (rank + 1) * n)
            loss, grads = _loss_and_grads(
                ContrastiveLoss(kind, impl, BLOCK), image[local], text[local], LOG_SCALE, BIAS
            )
            out[(rank, kind, impl)] = (loss.item(), grads)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_the_global_batch_for_every_mode():
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    image, text = _embeddings(GLOBAL_N, DIM, seed=3)
    n = GLOBAL_N // world
    for kind, impl in CASES:
        want, (d_image, d_text, d_scale, d_bias) = _loss_and_grads(
            REFERENCE[kind], image, text, LOG_SCALE, BIAS
        )
        ranks = [out[(r, kind, impl)] for r in range(world)]
        assert sum(loss for loss, _ in ranks) / world == pytest.approx(want.item(), rel=1e-5), (kind, impl)
        for r, (_, grads) in enumerate(ranks):
            # the gather's backward has summed every rank's gradient into the owner; DDP divides by W
            rows = slice(r * n, (r + 1) * n)
            assert torch.allclose(grads[0] / world, d_image[rows], atol=1e-6), (kind, impl, "image")
            assert torch.allclose(grads[1] / world, d_text[rows], atol=1e-6), (kind, impl, "text")
        mean_scale = sum(grads[2] for _, grads in ranks) / world
        mean_bias = sum(grads[3] for _, grads in ranks) / world
        assert torch.allclose(mean_scale, d_scale, rtol=1e-5, atol=1e-6), (kind, impl, "scale")
        assert torch.allclose(mean_bias, d_bias, rtol=1e-5, atol=1e-6), (kind, impl, "bias")
