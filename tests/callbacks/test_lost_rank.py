"""A DDP run that fails because a rank's process died names that rank (LostRankReport)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_metric import MetricLearningModule
from lightning_metric.callbacks import LostRankReport
from lightning_metric.distributed import lost_ranks, peer_table
from lightning_metric.heads import ArcFaceHead

HOST = socket.gethostname()


def _notes(error: BaseException) -> list[str]:
    """PEP 678 notes (Python >= 3.11); on 3.10 the note is appended to the message."""
    return [*getattr(error, "__notes__", []), str(error)]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: the pid no longer exists
    return child.pid


def _zombie() -> subprocess.Popen:
    """A child that has exited but is not reaped yet (its parent did not wait)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.02)
    return child


def test_lost_ranks_are_the_ended_processes_of_this_host() -> None:
    zombie = _zombie()
    try:
        table = [
            (HOST, os.getpid()),  # alive
            (HOST, _dead_pid()),  # ended and reaped
            (HOST, zombie.pid),  # ended, not reaped: the `ddp` launcher's children look so
            ("another-host", _dead_pid()),  # cannot be checked from here: never reported
        ]
        assert lost_ranks(table) == [1, 2]
        assert lost_ranks(table[:1]) == []
    finally:
        zombie.wait()


def test_the_exception_gets_a_note_naming_the_lost_rank() -> None:
    report = LostRankReport()
    error = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4242")
    report.on_exception(None, None, error)  # type: ignore[arg-type]  # not under DDP: no note
    assert not any("lost rank" in n for n in _notes(error))

    dead = _dead_pid()
    report.table = [(HOST, os.getpid()), (HOST, dead)]
    report.on_exception(None, None, error)  # type: ignore[arg-type]
    (note,) = [n for n in _notes(error) if "lost rank" in n]
    assert f"lost rank 1 (pid {dead} on {HOST}) of 2 DDP processes" in note
    assert "--ckpt_path" in note
    assert type(error) is RuntimeError and "Connection closed by peer" in str(error)


def test_the_module_brings_the_report_along() -> None:
    module = MetricLearningModule(
        backbone=nn.Flatten(), neck=nn.Linear(4, 3), embedding_dim=3, head=ArcFaceHead(3, 5)
    )
    assert [type(c) for c in module.configure_callbacks()] == [LostRankReport]


def _survivor_names_the_lost_rank(rank: int, folder: str) -> None:
    report = LostRankReport()
    report.table = peer_table()  # what setup() records on every rank
    if rank == 1:
        os._exit(0)  # gone without a word (exit 0: the harness leaves rank 0 running)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - gloo's error type varies by version
        report.on_exception(None, None, error)  # type: ignore[arg-type]
        notes = _notes(error)
        Path(folder, "survivor.json").write_text(
            json.dumps({"notes": notes, "seconds": time.monotonic() - start, "table": report.table})
        )


@pytest.mark.ddp
def test_survivor_of_a_lost_rank_fails_fast_and_names_it(tmp_path: Path) -> None:
    from ddp_harness import PG_TIMEOUT, run_ranks

    run_ranks(_survivor_names_the_lost_rank, 2, tmp_path, args=(str(tmp_path),), timeout=180)
    result = json.loads((tmp_path / "survivor.json").read_text())
    _, lost_pid = result["table"][1]
    assert any(f"lost rank 1 (pid {lost_pid} on " in note for note in result["notes"])
    # The closed connection is noticed at once, long before the process-group timeout.
    assert result["seconds"] < PG_TIMEOUT.total_seconds() / 2
