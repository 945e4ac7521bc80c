"""Helpers for evaluating across DDP ranks."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_sum",
    "dedupe_by_index",
    "gather_for_loss",
    "gather_uneven",
    "lost_ranks",
    "peer_table",
    "rank",
    "sync_mean",
    "unpad_gathered",
    "world_size",
]


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


def peer_table() -> list[tuple[str, int]]:
    """``(hostname, pid)`` of every rank, in rank order. A collective: call it on every rank
    while all are alive (at setup), so that a rank that dies later can be named."""
    me = (socket.gethostname(), os.getpid())
    if world_size() == 1:
        return [me]
    table: list = [None] * world_size()
    dist.all_gather_object(table, me)
    return [(str(host), int(pid)) for host, pid in table]


def lost_ranks(table: list[tuple[str, int]]) -> list[int]:
    """Ranks of ``table`` on this host whose process has ended.

    Ranks on other hosts cannot be checked from here and are never reported. A rank that has
    exited but is not yet reaped by its parent (a zombie: Lightning's ``ddp`` launcher is the
    parent of ranks 1..N) counts as ended.
    """
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(table) if h == host and not _process_alive(pid)]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": the state follows the last ')' (comm may hold spaces).
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def gather_uneven(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (sizes may differ); no gradient.

    Every rank receives the same result, in rank order.
    """
    if world_size() == 1:
        return tensor
    return _gather_padded(tensor, _rank_sizes(tensor))


def unpad_gathered(
    ranks: Tensor, world: int, index: Tensor | None = None, dataset_size: int | None = None
) -> Tensor:
    """Rows to keep from one dataset's evaluation rows gathered from ``world`` ranks, in the
    order one process reading the (unshuffled) sampler would see them.

    ``ranks [G]`` is the rank each row came from, rows of one rank in the order that rank saw
    them. ``DistributedSampler`` gives rank ``r`` the items at positions ``r, r + W, ...`` of
    its index list, padded to ``W * ceil(N / W)`` by repeating the first items, so row ``i``
    of rank ``r`` sits at position ``r + i * W`` and the ``G - N`` rows at positions ``>= N``
    are padding. Only those may be dropped; a repeated dataset index anywhere else is a real
    item and kept (ConcatDataset, datasets with their own index field).

    ``dataset_size`` (``len(dataset)``) gives the padding count directly. Without it the
    padding is inferred from ``index``, which then has to be unique per item: when other
    rows share an index the padding cannot be told apart, and a ``ValueError`` says so
    rather than dropping real items. Nothing is dropped in a single process (``world == 1``).
    """
    g = ranks.numel()
    if world == 1 or g == 0:
        return torch.arange(g, device=ranks.device)
    by_rank = torch.argsort(ranks, stable=True)
    sorted_ranks = ranks[by_rank].long()
    counts = torch.bincount(sorted_ranks, minlength=world)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(g, device=ranks.device) - starts[sorted_ranks]
    order = by_rank[torch.argsort(sorted_ranks + slot * world)]
    padded = padding_count(counts, world, order, index, dataset_size)
    return order[: g - padded]


def padding_count(
    counts: Tensor, world: int, order: Tensor, index: Tensor | None, dataset_size: int | None
) -> int:
    g = int(counts.sum())
    equal = bool((counts == counts[0]).all())
    if dataset_size is not None:
        padded = max(g - dataset_size, 0)
        if padded and (padded >= world or not equal):
            raise ValueError(
                f"gathered {g} rows from {world} ranks (per rank: {counts.tolist()}) for a "
                f"dataset of {dataset_size} items: more than DistributedSampler's padding of "
                f"at most {world - 1} rows; was the loader iterated more than once?"
            )
    elif index is None:
        return 0
    else:
        padded = g - int(torch.unique(index).numel())
        if padded and (padded >= world or not equal):
            raise ValueError(
                f"{padded} of the {g} rows gathered from {world} ranks repeat a dataset index, "
                "more than DistributedSampler padding explains: the dataset's `index` is not "
                "unique per item (e.g. a ConcatDataset). Pass the dataset size (RecallAtK does "
                "this itself; RetrievalMetrics.update(..., dataset_size=len(dataset))) so "
                "padding can be told apart from repeated indexes"
            )
    if padded and index is not None:
        # Padding repeats the first items of the sampler's list, position for position.
        tail, head = index[order[g - padded :]], index[order[:padded]]
        if not torch.equal(tail, head):
            raise ValueError(
                f"the last {padded} gathered rows do not repeat the first {padded} items as "
                "DistributedSampler padding does, so they cannot be removed safely; use "
                "DistributedSampler (shuffle=False) for evaluation loaders"
            )
    return padded


def dedupe_by_index(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep one row per dataset index, ordered by index.

    Only for indexes that are unique per item: rows that share an index are merged even
    when they are different items. The evaluation code uses :func:`unpad_gathered`, which
    drops only DistributedSampler's padding.

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


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over DDP ranks, as a new detached tensor (the caller's is untouched)."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def sync_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over DDP ranks, detached (``x`` itself when not distributed).

    What the margin heads' running statistics use, so every rank keeps the same value.
    """
    world = world_size()
    return all_reduce_sum(x) / world if world > 1 else x


class _GatherSumGrad(torch.autograd.Function):
    """All ranks' rows forward; backward sums the gradient over ranks and keeps this rank's."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        counts = _rank_sizes(x)
        ctx.counts = counts  # type: ignore[attr-defined]
        return _gather_padded(x.detach(), counts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        counts: list[int] = ctx.counts  # type: ignore[attr-defined]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        me = dist.get_rank()
        start = sum(counts[:me])
        return grad[start : start + counts[me]] * len(counts)


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's rows of ``x``, concatenated in rank order, for a loss that each rank
    computes only a *part* of (the sharded margin heads: each rank has some classes).

    Backward sums the gradient of the gathered rows over ranks (each rank holds only its
    part of it), keeps this rank's rows and multiplies them by the world size, because DDP
    then averages the model gradients over ranks. Batch sizes may differ between ranks.
    Identity when not distributed.
    """
    if world_size() == 1:
        return x
    return _GatherSumGrad.apply(x)
