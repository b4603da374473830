"""ContrastiveLoss: symmetric InfoNCE (CLIP) or the pairwise sigmoid loss (SigLIP), one interface.

    loss_fn = ContrastiveLoss(kind="infonce", impl="tiled", block_size=2048)
    loss = loss_fn(image_emb, text_emb, logit_scale.exp(), logit_bias)

With W processes each rank passes its own n pairs (L2-normalised rows); the embeddings are
all-gathered with autograd, so the global contrastive batch is N = n * W. Implementations
(`impl`), all exact and all equal to the loss on the concatenated global batch once DDP has
averaged the parameter gradients over ranks:

    dense  every rank builds the full N x N matrix (the baseline; memory N^2 per rank)
    local  this rank's n rows against all N columns, both directions (memory n * N per rank)
    tiled  local, computed block by block with a recomputing backward (memory O(N d + block^2)),
           see blockwise.py
    auto   local

Normalisation: InfoNCE is the mean over rows of both directions' cross-entropy, halved; SigLIP is
the sum over pairs divided by the number of rows (as in the SigLIP paper). A rank's loss is the
mean over its own rows, so the average over ranks is the global loss; gradients reaching other
ranks' embeddings through the gather's backward are summed into their owners and then divided by
W along with everything else by DDP's gradient averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_train import distributed
from clip_train.loss.blockwise import DEFAULT_BLOCK, tiled_infonce, tiled_siglip

KINDS = ("infonce", "siglip")
IMPLS = ("auto", "dense", "local", "tiled")


class ContrastiveLoss(nn.Module):
    def __init__(self, kind: str = "infonce", impl: str = "auto", block_size: int = DEFAULT_BLOCK):
        super().__init__()
        if kind not in KINDS or impl not in IMPLS:
            raise ValueError(
                f"loss kind {kind!r} / impl {impl!r}: choose kind from {KINDS}, impl from {IMPLS}"
            )
        if block_size < 1:
            raise ValueError(f"loss.block_size must be at least 1, got {block_size}")
        self.kind = kind
        self.impl = "local" if impl == "auto" else impl
        self.block_size = block_size

    def forward(self, image_emb, text_emb, logit_scale, logit_bias=None) -> torch.Tensor:
        """image_emb, text_emb: [n, d] rows of this rank; logit_scale: exp(temperature parameter)."""
        all_image = distributed.all_gather_with_grad(image_emb)
        all_text = distributed.all_gather_with_grad(text_emb)
        if self.impl == "dense" or distributed.world_size() == 1:
            # The whole square problem; row i's positive is column i.
            image_rows, text_rows, offset = all_image, all_text, 0
        else:
            # This rank's pair i sits at position rank * n + i of the gathered batch.
            image_rows, text_rows, offset = image_emb, text_emb, distributed.rank() * image_emb.shape[0]
        square = image_rows is all_image
        num_rows = image_rows.shape[0]
        # The logits are formed in fp32 even under autocast: bf16 loses digits in sums over N columns.
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            scale = logit_scale.float()
            bias = logit_bias.float() if logit_bias is not None else None
            if self.kind == "siglip":
                return self._siglip(image_rows, all_text, scale, bias, offset) / num_rows
            if self.impl == "tiled":
                if square:  # one pass over the tiles gives both directions
                    sums = tiled_infonce(image_rows, all_text, scale, bias, 0, self.block_size, True)
                    return sums.sum() / (2 * num_rows)
                image_to_text = tiled_infonce(image_rows, all_text, scale, bias, offset, self.block_size)[0]
                text_to_image = tiled_infonce(text_rows, all_image, scale, bias, offset, self.block_size)[0]
                return (image_to_text + text_to_image) / (2 * num_rows)
            labels = torch.arange(num_rows, device=image_emb.device) + offset
            logits_per_image = _logits(image_rows, all_text, scale, bias)
            # A square matrix serves both directions; a rank's stripe needs its texts' own rows.
            logits_per_text = logits_per_image.T if square else _logits(text_rows, all_image, scale, bias)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def _siglip(self, image_rows, all_text, scale, bias, offset: int) -> torch.Tensor:
        """Sum over this rank's image rows x all texts (each pair counted once across ranks)."""
        if self.impl == "tiled":
            return tiled_siglip(image_rows, all_text, scale, bias, offset, self.block_size)
        logits = _logits(image_rows, all_text, scale, bias)
        signs = -torch.ones_like(logits)
        rows = torch.arange(image_rows.shape[0], device=logits.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum()


def _logits(rows: torch.Tensor, cols: torch.Tensor, scale, bias) -> torch.Tensor:
    logits = scale * rows.float() @ cols.float().T
    return logits + bias if bias is not None else logits
