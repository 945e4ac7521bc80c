"""The life of a margin head's class centres inside a training run (``shard_classes=True``).

:class:`ShardedCentres` is what ``MetricLearningModule``'s Lightning hooks hand the head to:
at setup each DDP rank keeps only its classes; a checkpoint is saved with every centre
(gathered from the shards) so it loads in any world size, and cut again to this rank's part
when loaded; after a ``ddp_spawn`` run the main process's head is made whole again. The
tensor work (bounds, gathering, slicing) lives in :mod:`lightning_metric.heads.sharding`.
A head without ``shard_classes`` goes through the same calls: they check the checkpoint's
centres against the head and otherwise change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torch.optim import Optimizer

from lightning_metric.heads import MarginHead
from lightning_metric.heads.sharding import ShardingError, consolidate_centres, shard_centres

__all__ = ["ShardedCentres"]


class ShardedCentres:
    """Sharding, checkpointing and un-sharding of ``head``'s class centres (``head.weight``)."""

    def __init__(self, head: MarginHead) -> None:
        self.head = head

    def weight_key(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> str:
        """The centres' name among ``named_parameters`` (their key in a ``state_dict``)."""
        key = next((name for name, p in named_parameters if p is self.head.weight), None)
        if key is None:
            raise ValueError(
                f"the class centres of {type(self.head).__name__} are not among the model's "
                "parameters: the head must be a submodule of the model that trains it"
            )
        return key

    def setup(self, strategy: Strategy, rank: int, world_size: int) -> bool:
        """Keep only this rank's centres under DDP (``shard_classes=True``, every rank).
        True when they were sharded: DDP must then leave them out of its gradient average
        (they are not replicas)."""
        head = self.head
        if not head.shard_classes or world_size == 1:
            return False
        if not isinstance(strategy, DDPStrategy):
            raise ShardingError(
                f"{type(head).__name__}(shard_classes=True) needs Lightning's DDP strategy "
                f"(strategy='ddp' or 'ddp_spawn'), got {type(strategy).__name__} "
                f"with {world_size} processes"
            )
        head.shard(rank, world_size)
        return True

    def after_training(self, strategy: Strategy | None) -> None:
        """ddp_spawn hands rank 0's state_dict back to the main process, whose head is whole:
        called from ``on_train_end`` (not ``on_fit_end``: the strategy's teardown comes in
        between)."""
        if isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher):
            self.head.unshard()

    def save(self, checkpoint: dict[str, Any], key: str, optimizers: Sequence[Optimizer]) -> None:
        """Put every class centre (and its optimizer state) into ``checkpoint``, gathered from
        the shards. With sharded centres this is a collective: every rank saves together."""
        consolidate_centres(checkpoint, self.head, key, optimizers)

    def load(self, checkpoint: dict[str, Any], key: str, source: str) -> None:
        """Check the checkpoint's centres against the head (a :class:`ShardingError` naming
        ``source`` otherwise) and keep this rank's part of them and their optimizer state."""
        shard_centres(checkpoint, self.head, key, source)
