"""LostRankReport: a DDP run that fails because a rank died says which rank it was."""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_metric.distributed import lost_ranks, peer_table, rank, world_size

__all__ = ["LostRankReport"]

log = logging.getLogger(__name__)


class LostRankReport(Callback):
    """Names the lost rank(s) when a DDP run fails because a rank's process died.

    A rank killed mid-epoch (out of memory, a preempted node, ``kill -9``) leaves its peers
    with a bare gloo/NCCL error ("Connection closed by peer", a timeout) that names an address,
    not a rank. At setup every rank records the ``(host, pid)`` of all ranks; when the run
    fails, each survivor checks which ranks on its host have ended and adds a note naming
    them (rank, pid, host) to the exception, and logs it. The exception itself is unchanged,
    so Lightning's own handling and exit code are too. ``MetricLearningModule`` adds this
    callback by default.
    """

    def __init__(self) -> None:
        self.table: Optional[list[tuple[str, int]]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.table = peer_table() if world_size() > 1 else None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        note = self.describe()
        if note is None:
            return
        log.error(note)
        _add_note(exception, note)

    def describe(self) -> Optional[str]:
        """The note for the ranks lost so far, or None when every recorded rank is alive."""
        if not self.table:
            return None
        lost = lost_ranks(self.table)
        if not lost:
            return None
        who = ", ".join(f"rank {r} (pid {self.table[r][1]} on {self.table[r][0]})" for r in lost)
        return (
            f"lost {who} of {len(self.table)} DDP processes: its process ended, so the "
            f"collective rank {rank()} was in failed. Look at rank {lost[0]}'s own output for "
            "why (out of memory, killed); re-run from the last checkpoint with --ckpt_path."
        )


def _add_note(exception: BaseException, note: str) -> None:
    add_note: Any = getattr(exception, "add_note", None)
    if add_note is not None:  # Python >= 3.11: printed under the traceback
        add_note(note)
    elif exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0]}\n{note}", *exception.args[1:])
