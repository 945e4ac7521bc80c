"""The life of a margin head's class centres inside a training run (``shard_classes=True``).

:class:`ShardedCentres` is what ``MetricLearningModule``'s Lightning hooks hand the head to:
at setup each DDP rank builds only its classes. A checkpoint is saved either per rank
(under :class:`~lightning_metric.strategies.ShardedCentresDDPStrategy`: each rank's rows through
``torch.distributed.checkpoint``, :mod:`lightning_metric.centre_checkpoint`) or, under any other
strategy, as one file with every centre gathered onto rank 0
(:mod:`lightning_metric.heads.sharding`); both load in any world size, each rank keeping its
part. After a ``ddp_spawn`` run the main process's head is made whole again.
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

from lightning_metric.centre_checkpoint import (
    check_shape,
    drop_centres,
    is_sharded_checkpoint,
    load_centres,
    split_off_centres,
)
from lightning_metric.heads import MarginHead
from lightning_metric.heads.sharding import (
    CHECKPOINT_KEY,
    ShardingError,
    consolidate_centres,
    shard_centres,
)

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

    def setup(self, strategy: Strategy, rank: int, world_size: int, stage: str = "fit") -> bool:
        """Keep only this rank's centres under DDP (``shard_classes=True``, every rank).
        True when they were sharded: DDP must then leave them out of its gradient average
        (they are not replicas). Outside ``fit`` a head whose centres are not built yet is
        left so: inference does not use them (a checkpoint's load builds them if it has them)."""
        head = self.head
        if stage != "fit" and head.weight.is_meta:
            return False
        if not head.shard_classes or world_size == 1:
            head.materialize()  # a head left on the meta device by the module: build it whole
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

    def save(
        self,
        checkpoint: dict[str, Any],
        key: str,
        optimizers: Sequence[Optimizer],
        strategy: Strategy | None = None,
    ) -> None:
        """Every rank at once. Under a strategy that saves centre shards
        (``ShardedCentresDDPStrategy``) this rank's centres and moments leave ``checkpoint``
        for the strategy to write; otherwise every class centre (and its optimizer state) is
        gathered into it (a collective with sharded centres)."""
        if self.head.shard_classes and getattr(strategy, "saves_centre_shards", False):
            block_rows = getattr(strategy, "centre_block_rows", None)
            split_off_centres(checkpoint, self.head, key, optimizers, block_rows)
        else:
            consolidate_centres(checkpoint, self.head, key, optimizers)

    def load(
        self,
        checkpoint: dict[str, Any],
        key: str,
        source: str,
        checkpoint_path: Any = None,
        fitting: bool = False,
    ) -> None:
        """Check the checkpoint's centres against the head (a :class:`ShardingError` naming
        ``source`` otherwise) and keep this rank's part of them and their optimizer state.

        A sharded checkpoint's centres are read (this rank's rows only, from
        ``checkpoint_path``'s directory) when ``fitting``; for inference they are not read
        at all and the head is left without centres."""
        if not is_sharded_checkpoint(checkpoint):
            shard_centres(checkpoint, self.head, key, source)
            return
        head = self.head
        if not fitting:
            describe = f"num_classes={head.num_classes}, embedding_dim={head.embedding_dim}"
            expected = (head.num_classes * head.sub_centers, head.embedding_dim)
            check_shape(checkpoint[CHECKPOINT_KEY], expected, describe, source)
            drop_centres(checkpoint, head, key)
            return
        if checkpoint_path is None:
            raise ShardingError(
                f"{source} keeps its class centres in a directory beside its file, but its path "
                "is unknown here: resume with trainer.fit(..., ckpt_path=path)"
            )
        load_centres(checkpoint, head, key, checkpoint_path, source)
