"""Lightning strategies of the library: :class:`ShardedCentresDDPStrategy`, DDP whose
checkpoints keep sharded class centres sharded on disk."""

from __future__ import annotations

import shutil
from typing import Any, Optional

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy

from lightning_metric.centre_checkpoint import PENDING_KEY, centres_directory, save_pieces
from lightning_metric.checks import check_int
from lightning_metric.heads.sharding import CHECKPOINT_KEY

__all__ = ["ShardedCentresDDPStrategy"]


class ShardedCentresDDPStrategy(DDPStrategy):
    """Lightning's DDP; a margin head with ``shard_classes=True`` is checkpointed per rank.

    Lightning writes a checkpoint from rank 0 only, so with plain ``strategy="ddp"`` the
    module gathers every class centre and its AdamW moments onto rank 0 (16 x C x D bytes).
    With this strategy each rank writes its own rows through ``torch.distributed.checkpoint``
    into ``<checkpoint>.centres/`` beside the ordinary checkpoint file, which rank 0 writes
    without them (see :mod:`lightning_metric.centre_checkpoint`). Resuming reads only the
    rows a rank owns, in any world size; ``test`` / ``predict`` / ``load_from_checkpoint``
    read the file alone. From YAML::

        trainer:
          strategy:
            class_path: lightning_metric.strategies.ShardedCentresDDPStrategy

    Args:
        centre_block_rows: rows per saved piece (default: 16 MiB of one tensor); a rank
            loading reads at most one piece beyond each end of its rows.
        **kwargs: :class:`~lightning.pytorch.strategies.DDPStrategy`'s arguments.
    """

    saves_centre_shards = True

    def __init__(self, centre_block_rows: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if centre_block_rows is not None:
            centre_block_rows = check_int("centre_block_rows", centre_block_rows, minimum=1)
        self.centre_block_rows = centre_block_rows

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Every rank: its centre rows into ``<filepath>.centres/`` (DCP); rank 0: the rest
        into ``filepath``, after the directory is complete."""
        pending = checkpoint.pop(PENDING_KEY, None)
        if pending is not None:
            save_pieces(centres_directory(filepath), pending, checkpoint[CHECKPOINT_KEY])
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(centres_directory(filepath), ignore_errors=True)
