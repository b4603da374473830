"""Process-group helpers. Every function works without torch.distributed initialised (one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping autograd.

    accelerator.gather / dist.all_gather cut the graph, so a contrastive loss built on them would
    get no gradient through the other ranks' embeddings. torch.distributed.nn's all_gather
    backpropagates by reduce-scattering (summing) the gradients, which is what makes each rank's
    local loss add up to the global-batch loss once DDP averages the parameter gradients.
    All ranks must pass tensors of the same shape.
    """
    if world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank (evaluation, metrics)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def shard_indices(total: int) -> range:
    """This rank's share of `total` items for evaluation: items rank, rank + W, rank + 2W, ..."""
    return range(rank(), total, world_size())


def gather_in_order(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble `total` rows computed by shard_indices on every rank into their original order.

    Ranks hold ceil or floor of total / W rows; all_gather needs equal shapes, so each pads to the
    ceiling first. Row i of the result was computed by rank i % W as its (i // W)-th row.
    """
    world = world_size()
    if world == 1:
        return local
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = all_gather_no_grad(padded).view(world, per_rank, *local.shape[1:])
    # [rank, position] -> item position * W + rank
    return gathered.transpose(0, 1).reshape(world * per_rank, *local.shape[1:])[:total]


def sum_over_ranks(values: list[float], device) -> list[float]:
    """values summed over all ranks: one all-reduce, which every rank must call at the same point."""
    if not is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank when it is true on at least one."""
    return [v > 0 for v in sum_over_ranks([float(f) for f in flags], device)]
