"""Helpers for evaluating across DDP ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["dedupe_by_index", "gather_for_loss", "gather_uneven", "world_size"]


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_uneven(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (sizes may differ); no gradient.

    Every rank receives the same result, in rank order.
    """
    if world_size() == 1:
        return tensor
    return _gather_padded(tensor, _rank_sizes(tensor))


def dedupe_by_index(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep one row per dataset index, ordered by index.

    DistributedSampler pads the last batch by repeating samples, so after gathering some
    dataset indices occur twice; keeping the first occurrence of each and sorting by index
    also makes the row order independent of the number of ranks (which keeps tie-breaking
    by position identical to a single-process run).

    Returns ``(index, *tensors)`` restricted to the kept rows.
    """
    if index.ndim != 1:
        raise ValueError(f"`index` must be 1-D, got shape {tuple(index.shape)}")
    for t in tensors:
        if t.shape[0] != index.shape[0]:
            raise ValueError(
                f"every tensor must have one row per index ({index.shape[0]}), got "
                f"shape {tuple(t.shape)}"
            )
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    return (index[keep], *(t[keep] for t in tensors))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


def gather_for_loss(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's embeddings and labels, concatenated in rank order, for a batch loss.

    Meant for a loss that every rank computes identically on the gathered batch. Gradient
    flows to this rank's rows only, multiplied by the world size: DDP then averages the model
    gradients over ranks, which gives exactly the gradient of the loss on the concatenated
    batch on one device, with no extra collective in the backward pass. The loss value and
    the gradients of the loss's own parameters (proxies) are left unscaled: they are already
    identical on every rank, so DDP's average keeps them right (PML's DistributedLossWrapper
    multiplies the loss instead, which over-scales both by the world size).

    Batch sizes may differ between ranks. A no-op outside distributed training.
    """
    world = world_size()
    if world == 1:
        return embeddings, labels
    rank = dist.get_rank()
    counts = _rank_sizes(embeddings)
    gathered_emb = _gather_padded(embeddings.detach(), counts)
    gathered_labels = _gather_padded(labels, counts)
    start = sum(counts[:rank])
    local = _ScaleGrad.apply(embeddings, float(world))
    gathered_emb = torch.cat([gathered_emb[:start], local, gathered_emb[start + counts[rank] :]])
    return gathered_emb, gathered_labels


def _rank_sizes(tensor: Tensor) -> list[int]:
    """Length of ``tensor`` (dim 0) on every rank, in rank order."""
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _gather_padded(tensor: Tensor, counts: list[int]) -> Tensor:
    """all_gather needs one shape on every rank: pad to the largest part, then cut back."""
    longest = max(counts)
    if tensor.shape[0] != longest:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        tensor = padded
    parts = [torch.empty_like(tensor) for _ in counts]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
