"""Contrastive gradient accumulation that is exactly a bigger batch (GradCache).

Ordinary accumulation runs the loss once per micro-batch, so each micro-batch only sees its own
m - 1 negatives: k micro-batches of m are not a batch of k * m for a contrastive loss. Here the
loss sees all k * m pairs per process (k * m * W across processes) while activations are kept for
one micro-batch at a time:

1. forward every micro-batch without autograd, keeping only its embeddings and the RNG state it
   started from (dropout masks must be drawn again identically in step 3);
2. compute the loss once over all cached embeddings, and its gradients with respect to the
   embeddings, the temperature and the bias (cheap: no tower in this graph);
3. forward each micro-batch again with autograd, RNG restored, and backpropagate the cached
   embedding gradients through it (a surrogate sum(emb * grad)). The temperature and bias
   gradients enter with the last micro-batch, through the model's own outputs, so that under DDP
   every trainable parameter is reduced once, on the last micro-batch; the others run under
   no_sync and only accumulate locally.

The parameter gradients then equal those of one step on the whole batch, up to fp32 rounding.
Two caveats, the same as for any micro-batching: BatchNorm in training mode normalises with
micro-batch statistics (frozen-BN or LayerNorm towers are exact), and the running statistics are
updated by the replay only (step 1's updates are undone), once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def capture_rng() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def accumulated_backward(
    model: nn.Module,
    micro_batches: Sequence[tuple],
    loss_fn: Callable,
    *,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of loss_fn over all micro-batches joined.

    model(*micro_batch) must return (image_emb, text_emb, logit_scale, logit_bias or None), as
    ClipModel does (DDP-wrapped or not). `backward` is e.g. accelerator.backward (loss scaling),
    `no_sync` e.g. lambda: accelerator.no_sync(model). Returns the loss (detached).
    """
    # 1. embeddings without activations
    saved_buffers = [buffer.detach().clone() for buffer in model.buffers()]
    rng_states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            rng_states.append(capture_rng())
            with autocast():
                image_emb, text_emb, logit_scale, logit_bias = model(*micro_batch)
            image_parts.append(image_emb)
            text_parts.append(text_emb)
        rng_after = capture_rng()
        for buffer, saved in zip(model.buffers(), saved_buffers):
            buffer.copy_(saved)  # BatchNorm statistics: let only the replay update them

    # 2. the loss over the whole batch; leaves in fp32 so that small gradients do not underflow
    image_all = torch.cat(image_parts).float().requires_grad_(True)
    text_all = torch.cat(text_parts).float().requires_grad_(True)
    scale_leaf = logit_scale.detach().float().requires_grad_(True)
    bias_leaf = logit_bias.detach().float().requires_grad_(True) if logit_bias is not None else None
    loss = loss_fn(image_all, text_all, scale_leaf, bias_leaf)
    loss.backward()
    sizes = [part.shape[0] for part in image_parts]
    image_grads = image_all.grad.split(sizes)
    text_grads = text_all.grad.split(sizes)

    # 3. replay each micro-batch with autograd and push the cached gradients through it
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        restore_rng(rng_states[index])
        with nullcontext() if last else no_sync():
            with autocast():
                image_emb, text_emb, logit_scale, logit_bias = model(*micro_batch)
            surrogate = (image_emb.float() * image_grads[index]).sum() + (
                text_emb.float() * text_grads[index]
            ).sum()
            if last:
                surrogate = surrogate + logit_scale.float() * scale_leaf.grad
                if bias_leaf is not None:
                    surrogate = surrogate + logit_bias.float() * bias_leaf.grad
            backward(surrogate)
    restore_rng(rng_after)
    return loss.detach()


def batch_statistics_layers(model: nn.Module) -> list[str]:
    """The BatchNorm layers that normalise with the statistics of the batch they see in training.

    The replay above is exact for everything but these: each micro-batch is normalised with its own
    statistics, so k micro-batches are not exactly one batch of k times the size. (Frozen
    BatchNorm, as locked towers get with freeze_bn_stats, holds fixed statistics and is not listed.)
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
