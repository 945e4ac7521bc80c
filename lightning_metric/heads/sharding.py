"""Class centres split across DDP ranks: which classes a rank holds, and the collectives of
the distributed softmax (model-parallel margin heads, as insightface's partial FC).

Rank ``r`` holds the contiguous class range ``[start, stop)`` of :func:`shard_bounds`, so the
concatenation of the shards in rank order is the whole matrix and a checkpoint can be
consolidated, or cut again for another world size, by slicing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_metric.distributed import all_reduce_sum

__all__ = [
    "CHECKPOINT_KEY",
    "ClassShard",
    "ShardingError",
    "consolidate_centres",
    "logsumexp_across_ranks",
    "shard_bounds",
    "shard_centres",
]


class ShardingError(ValueError):
    """``shard_classes=True`` cannot be honoured (too few classes, a head that overrides the
    loss, a checkpoint whose centres do not fit)."""


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


# --- checkpoints: one file with every class, whatever the world size ---------------------

CHECKPOINT_KEY = "lightning_metric_class_centres"
"""Checkpoint entry describing the head's centres: shape, world size, optimizer state keys."""


def _full_shape(head: Any) -> tuple[int, int]:
    return head.num_classes * head.sub_centers, head.embedding_dim


def _optimizer_keys(weight: Tensor, optimizers: Sequence[Optimizer]) -> list[tuple[int, int]]:
    """``(optimizer, state index)`` of ``weight`` in each optimizer's ``state_dict``."""
    keys = []
    for i, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]
        keys += [(i, j) for j, p in enumerate(params) if p is weight]
    return keys


def _map_state(
    checkpoint: dict[str, Any], keys: list[tuple[int, int]], shape: Sequence[int], fn: Any
) -> None:
    """Apply ``fn`` to the optimizer state tensors shaped like the centres (Adam's moments),
    in new dicts: ``Optimizer.state_dict`` shares them with the live optimizer."""
    states = checkpoint.get("optimizer_states", [])
    for i, j in keys:
        state = states[i]["state"].get(j) if i < len(states) else None
        if state:
            states[i]["state"][j] = {
                name: fn(t) if isinstance(t, Tensor) and tuple(t.shape) == tuple(shape) else t
                for name, t in state.items()
            }


def consolidate_centres(
    checkpoint: dict[str, Any], head: Any, key: str, optimizers: Sequence[Optimizer]
) -> None:
    """``on_save_checkpoint`` (every rank at once): rank 0's checkpoint, the one Lightning
    writes, gets the whole matrix and the whole optimizer state of the centres, gathered from
    the shards into CPU memory, so it loads in any world size; ``key`` is the weight's name
    in ``checkpoint["state_dict"]``."""
    keys = _optimizer_keys(head.weight, optimizers)
    shard = head.class_shard
    checkpoint[CHECKPOINT_KEY] = {
        "shape": list(_full_shape(head)),
        "saved_by_world_size": 1 if shard is None else shard.world_size,
        "optimizer_state": [list(k) for k in keys],
    }
    if shard is None:
        return
    k = head.sub_centers
    rows = [(b - a) * k for a, b in shard_bounds(head.num_classes, shard.world_size)]

    def gather(t: Tensor) -> Tensor:
        return _gather_to_rank0(t, rows)

    checkpoint["state_dict"][key] = gather(checkpoint["state_dict"][key])
    _map_state(checkpoint, keys, head.weight.shape, gather)


def _gather_to_rank0(t: Tensor, rows: list[int]) -> Tensor:
    """Every rank's rows of ``t``, in rank order, on rank 0 and in CPU memory; the other ranks
    keep their own rows (only rank 0 writes the checkpoint). One shard travels at a time, so
    no device ever holds more than its own shard plus one other."""
    if dist.get_rank() != 0:
        dist.send(t.detach().contiguous(), dst=0)
        return t
    full = torch.empty((sum(rows), *t.shape[1:]), dtype=t.dtype)
    full[: rows[0]] = t.detach().cpu()
    start = rows[0]
    for r in range(1, len(rows)):
        part = t.new_empty((rows[r], *t.shape[1:]))
        dist.recv(part, src=r)
        full[start : start + rows[r]] = part.cpu()
        start += rows[r]
    return full


def shard_centres(checkpoint: dict[str, Any], head: Any, key: str, source: str) -> None:
    """``on_load_checkpoint``: check the checkpoint's centres against the head and keep this
    rank's rows of them and of their optimizer state (a no-op for a whole head)."""
    expected = _full_shape(head)
    weight = checkpoint.get("state_dict", {}).get(key)
    if weight is None:
        raise ShardingError(f"{source} holds no class centres `{key}`; expected {expected}")
    if tuple(weight.shape) != expected:
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        saved = meta.get("saved_by_world_size")
        raise ShardingError(
            f"{source}: `{key}` has shape {tuple(weight.shape)}, expected {expected} "
            f"(num_classes={head.num_classes} x sub_centers={head.sub_centers}, "
            f"embedding_dim={head.embedding_dim})"
            + (f"; it was saved by {saved} rank(s)" if saved else "")
            + ": a checkpoint of another num_classes, or one whose shards are missing "
            "(written by a rank that did not gather the others)"
        )
    shard = head.class_shard
    if shard is None:
        return
    k = head.sub_centers
    rows = slice(shard.start * k, shard.stop * k)
    checkpoint["state_dict"][key] = weight[rows].clone()
    meta = checkpoint.get(CHECKPOINT_KEY)
    keys = (
        [tuple(x) for x in meta["optimizer_state"]] if meta else _guess_keys(checkpoint, expected)
    )
    _map_state(checkpoint, keys, expected, lambda t: t[rows].clone())


def _guess_keys(checkpoint: dict[str, Any], shape: tuple[int, int]) -> list[tuple[int, int]]:
    """A checkpoint from before the metadata: the state entries shaped like the centres."""
    return [
        (i, j)
        for i, opt in enumerate(checkpoint.get("optimizer_states", []))
        for j, state in opt.get("state", {}).items()
        if any(isinstance(t, Tensor) and tuple(t.shape) == shape for t in state.values())
    ]
