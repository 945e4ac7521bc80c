"""Class centres split across DDP ranks: which classes a rank holds, and the collectives of
the distributed softmax (model-parallel margin heads, as insightface's partial FC).

Rank ``r`` holds the contiguous class range ``[start, stop)`` of :func:`shard_bounds`, so the
concatenation of the shards in rank order is the whole matrix and a checkpoint can be
consolidated, or cut again for another world size, by slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ClassShard", "all_reduce_sum", "logsumexp_across_ranks", "shard_bounds"]


@dataclass(frozen=True)
class ClassShard:
    """The classes ``[start, stop)`` that rank ``rank`` of ``world_size`` holds."""

    rank: int
    world_size: int
    start: int
    stop: int

    @property
    def num_classes(self) -> int:
        return self.stop - self.start


def shard_bounds(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Class ranges of every rank, as even as possible (the first ``C % W`` get one more).

    >>> shard_bounds(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(num_classes, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a new tensor, no gradient)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def logsumexp_across_ranks(lse: Tensor) -> Tensor:
    """``log(sum_r exp(lse_r))`` per row, from each rank's partial log-sum-exp.

    One all-reduce of the maximum, one of the sum of exponentials. A rank whose part is
    empty passes ``-inf``; a row that is ``-inf`` on every rank stays ``-inf``.
    """
    top = lse.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = all_reduce_sum(torch.exp(lse - top))
    return top + torch.log(total)
