"""What the sharded-centre DDP tests share: each rank's uneven batch, a linear backbone with a
``shard_classes=True`` head, the record of the classes each rank samples (partial FC) and their
replay in the one-process reference, and the tolerance the comparisons use."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import lightning_metric.heads.base as head_base
from lightning_metric.heads import MarginHead

F_IN = 6

Objective = Callable[[MarginHead, Tensor, Tensor], Tensor]


def rank_batch(rank: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s batch: ``5 + rank`` rows (uneven across ranks), scaled by rank."""
    g = torch.Generator().manual_seed(100 + rank)
    size = 5 + rank
    x = torch.randn(size, F_IN, generator=g) * (1.0 + rank)
    return x, torch.randint(0, num_classes, (size,), generator=g)


def all_batches(world: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Every rank's batch concatenated in rank order: what one process sees."""
    batches = [rank_batch(r, num_classes) for r in range(world)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


class ShardedHeadModel(nn.Module):
    """``objective(head, Linear(x), y)`` with a sharded ``cls`` head, initialised from seed 0
    so every rank and the reference start alike."""

    def __init__(
        self,
        cls: type[MarginHead],
        rate: float,
        kwargs: dict[str, Any],
        dim: int,
        num_classes: int,
        objective: Objective,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(F_IN, dim)
        self.head = cls(dim, num_classes, sample_rate=rate, shard_classes=True, **kwargs)
        self.objective = objective

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.objective(self.head, self.backbone(x), y)


def record_sampling(record: list[Tensor], offset: list[int]) -> None:
    """From now on (in this rank's process), append every partial-FC draw to ``record`` as
    global class ids (``offset[0]``: the first class of the rank's shard)."""
    original = head_base.sample_classes

    def sample(labels: Tensor, n: int, rate: float) -> tuple[Tensor, Tensor]:
        index, local = original(labels, n, rate)
        record.append(index + offset[0])
        return index, local

    head_base.sample_classes = sample  # type: ignore[assignment]


@contextmanager
def replay_sampling(sampled: Tensor | None) -> Iterator[None]:
    """Make one process draw ``sampled`` (the union of the shards' draws), as it would."""
    if sampled is None:
        yield
        return
    original = head_base.sample_classes

    def forced(labels: Tensor, n: int, rate: float) -> tuple[Tensor, Tensor]:
        return sampled, torch.searchsorted(sampled, labels)

    head_base.sample_classes = forced  # type: ignore[assignment]
    try:
        yield
    finally:
        head_base.sample_classes = original


def close(got: Tensor, want: Tensor, msg: str, tol: float = 1e-5) -> None:
    """Equal to ``tol`` of the tensor's scale (at least 1): float32 sums taken in another
    order (chunks, ranks) differ by ~1e-7 relative, and gradients at s=64 reach a few
    hundred. ``tol=0`` asks for exact equality."""
    assert got.shape == want.shape, msg
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= tol * scale, f"{msg}: max difference {err:.3g} (scale {scale:.3g})"
