"""Exact contrastive losses computed block by block, never holding the n x N logit matrix.

Both kernels score `rows` [n, d] against `cols` [N, d] with logits S = scale * rows @ cols.T + bias,
where row i's positive is column `offset + i`. The forward pass walks (block x block) tiles and keeps
only per-row / per-column statistics; the backward pass recomputes each tile and turns it into
gradients at once. Peak memory is the gradients themselves (O((n + N) d)) plus a few tiles
(O(block^2)), instead of several n x N matrices for autograd's version.

Every tile is computed in fp32 with autocast switched off, whatever the input dtype: the sums over
N columns are where bf16 would lose digits. Gradients are returned in the inputs' dtypes.

The two losses share one structure. For a tile of logits S, the forward accumulates a statistic
and the backward needs dLoss/dS = W (a tile of weights); everything else is the same algebra:

    d rows  = scale * W @ cols          d cols = scale * W.T @ rows
    d scale = sum(W * rows @ cols.T)    d bias = sum(W)

and the positives (the diagonal at `offset`) contribute a rank-one correction computed in O(n d).

InfoNCE:  loss_rows = sum_i [logsumexp_j S_ij - S_i,offset+i]   (cross-entropy of each row)
          W_ij = softmax_j(S)_ij, minus 1 at the positive; with `both_directions` the same tiles also
          give the column cross-entropies (the other direction of a square, single-process batch),
          so the symmetric loss costs one pass over the matrix instead of two.
SigLIP:   loss = sum_ij softplus(S_ij) - sum_i S_i,offset+i
          (every pair as a negative, -log sigmoid(-s) = softplus(s), then the positives corrected:
          -log sigmoid(s) = softplus(s) - s); W_ij = sigmoid(S_ij), minus 1 at the positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BLOCK = 1024  # 4 MiB per fp32 tile; measured fastest on CPU among 512-4096 at N = 4096


def _tiles(n: int, block: int):
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _logits(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    logits = rows.float() @ cols.float().T
    logits.mul_(scale)
    if bias is not None:
        logits.add_(bias)
    return logits


def _positive_logits(rows, cols, scale, bias, offset: int) -> torch.Tensor:
    """S_i,offset+i for every row, in O(n d)."""
    pos = (rows.float() * cols[offset : offset + rows.shape[0]].float()).sum(-1) * scale
    return pos + bias if bias is not None else pos


def _backward(ctx, tile_weights, positive_weight: torch.Tensor):
    """Shared backward: recompute each tile, ask `tile_weights(logits, row_slice, col_slice)` for
    dLoss/dS on it, and accumulate the four gradients; then subtract the positives' term
    (`positive_weight` = dLoss/dS_i,offset+i summed over directions, the same for every row)."""
    rows, cols, scale, bias = ctx.saved_tensors[:4]
    offset, block = ctx.offset, ctx.block
    with torch.autocast(device_type=rows.device.type, enabled=False):
        scale32 = scale.float()
        bias32 = bias.float() if bias is not None else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        grad_cols = torch.zeros(cols.shape, dtype=torch.float32, device=cols.device)
        grad_scale = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_bias = torch.zeros((), dtype=torch.float32, device=rows.device)
        for r0, r1 in _tiles(rows.shape[0], block):
            row_block = rows[r0:r1].float()
            for c0, c1 in _tiles(cols.shape[0], block):
                col_block = cols[c0:c1].float()
                logits = _logits(row_block, col_block, scale32, bias32)
                weights = tile_weights(logits, slice(r0, r1), slice(c0, c1))
                weighted_cols = weights @ col_block  # [rows, d]
                # sum(W * rows @ cols.T) without another tile: sum_i rows_i . (W @ cols)_i
                grad_scale += (row_block * weighted_cols).sum()
                grad_bias += weights.sum()
                grad_rows[r0:r1] += weighted_cols
                grad_cols[c0:c1].addmm_(weights.T, row_block)
        # dS/drows = scale * cols (and alike for cols): the scale is applied once, at the end.
        grad_rows.mul_(scale32)
        grad_cols.mul_(scale32)
        # The positives, S_i,offset+i, each enter the loss with weight -positive_weight.
        n = rows.shape[0]
        pos_cols = cols[offset : offset + n].float()
        rows32 = rows.float()
        grad_rows -= positive_weight * scale32 * pos_cols
        grad_cols[offset : offset + n] -= positive_weight * scale32 * rows32
        grad_scale -= positive_weight * (rows32 * pos_cols).sum()
        grad_bias -= positive_weight * n
    return (
        grad_rows.to(rows.dtype),
        grad_cols.to(cols.dtype),
        grad_scale.to(scale.dtype),
        grad_bias.to(bias.dtype) if bias is not None else None,
    )


class TiledInfoNCE(torch.autograd.Function):
    """Sums of InfoNCE cross-entropies: returns [row_sum, col_sum].

    row_sum: sum over rows i of -log softmax_j(S)_i,offset+i (rows against all columns);
    col_sum: with both_directions (square problem, offset 0), the same over columns, else 0.
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, offset: int, block: int, both_directions: bool):
        n, total = rows.shape[0], cols.shape[0]
        if both_directions and (n != total or offset != 0):
            raise ValueError("both_directions needs the square problem: as many rows as columns, offset 0")
        with torch.autocast(device_type=rows.device.type, enabled=False):
            scale32 = scale.float()
            bias32 = bias.float() if bias is not None else None
            row_lse = torch.full((n,), float("-inf"), device=rows.device)
            col_lse = torch.full((total,), float("-inf"), device=rows.device) if both_directions else None
            for r0, r1 in _tiles(n, block):
                row_block = rows[r0:r1].float()
                for c0, c1 in _tiles(total, block):
                    logits = _logits(row_block, cols[c0:c1], scale32, bias32)
                    # Online log-sum-exp: merge this tile's per-row (and per-column) values.
                    torch.logaddexp(row_lse[r0:r1], torch.logsumexp(logits, dim=1), out=row_lse[r0:r1])
                    if both_directions:
                        torch.logaddexp(col_lse[c0:c1], torch.logsumexp(logits, dim=0), out=col_lse[c0:c1])
            positives = _positive_logits(rows, cols, scale32, bias32, offset)
            row_sum = (row_lse - positives).sum()
            col_sum = (col_lse - positives).sum() if both_directions else torch.zeros_like(row_sum)
        ctx.offset, ctx.block, ctx.both = offset, block, both_directions
        ctx.save_for_backward(rows, cols, scale, bias, row_lse, col_lse)
        return torch.stack([row_sum, col_sum])

    @staticmethod
    def backward(ctx, grad_out):
        row_lse, col_lse = ctx.saved_tensors[4:]
        grad_out = grad_out.float()
        grad_row, grad_col = grad_out[0], grad_out[1]

        def tile_weights(logits, row_slice, col_slice):
            # softmax over columns of each row (and over rows of each column), weighted by the
            # incoming gradient of each direction; computed in place over the logits tile.
            weights = (logits - row_lse[row_slice, None]).exp_().mul_(grad_row)
            if ctx.both:
                weights += logits.sub_(col_lse[None, col_slice]).exp_().mul_(grad_col)
            return weights

        positive_weight = grad_row + grad_col if ctx.both else grad_row
        grads = _backward(ctx, tile_weights, positive_weight)
        return (*grads, None, None, None)


class TiledSigLIP(torch.autograd.Function):
    """Sum over all pairs of the sigmoid loss: -log sigmoid(+S) for positives, -log sigmoid(-S) else."""

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, offset: int, block: int):
        with torch.autocast(device_type=rows.device.type, enabled=False):
            scale32 = scale.float()
            bias32 = bias.float() if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            for r0, r1 in _tiles(rows.shape[0], block):
                row_block = rows[r0:r1].float()
                for c0, c1 in _tiles(cols.shape[0], block):
                    total += F.softplus(_logits(row_block, cols[c0:c1], scale32, bias32)).sum()
            total -= _positive_logits(rows, cols, scale32, bias32, offset).sum()
        ctx.offset, ctx.block = offset, block
        ctx.save_for_backward(rows, cols, scale, bias)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.float()

        def tile_weights(logits, row_slice, col_slice):
            return logits.sigmoid_().mul_(grad)

        grads = _backward(ctx, tile_weights, grad)
        return (*grads, None, None)


def tiled_infonce(
    rows, cols, scale, bias=None, offset: int = 0, block: int = DEFAULT_BLOCK, both_directions=False
):
    return TiledInfoNCE.apply(rows, cols, scale, bias, offset, block, both_directions)


def tiled_siglip(rows, cols, scale, bias=None, offset: int = 0, block: int = DEFAULT_BLOCK):
    return TiledSigLIP.apply(rows, cols, scale, bias, offset, block)
