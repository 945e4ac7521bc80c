"""The DDP test harness fails fast, says which rank failed and how, and leaves nothing running."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from ddp_harness import PG_TIMEOUT, FileRendezvousDDP, run_ranks
from torch.distributed import distributed_c10d
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.ddp

SHORT_PG_TIMEOUT = timedelta(seconds=5)
# How late the harness may notice a rank's exit on a loaded machine: far below PG_TIMEOUT,
# so a test passing within it shows that nothing waited for a timeout.
REACTION_S = 15.0


def _note(folder: str, name: str, rank: int) -> None:
    """Records this rank's pid and the current time under ``name``, for the parent."""
    Path(folder, f"{name}{rank}.json").write_text(json.dumps([os.getpid(), time.time()]))


def _read(folder: Path, name: str, rank: int) -> tuple[int, float]:
    pid, when = json.loads((folder / f"{name}{rank}.json").read_text())
    return pid, when


def _assert_all_gone(folder: Path, world: int = 2) -> None:
    for rank in range(world):
        pid, _ = _read(folder, "started", rank)
        # Killed *and* joined: even a zombie would still answer signal 0.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


def _wait_for(path: Path) -> None:
    # init_process_group can return on one rank while its peer is still connecting: leaving
    # then would fail the peer inside init, not in the collective under test.
    while not path.exists():
        time.sleep(0.05)


def _killed_mid_collective(rank: int, folder: str) -> None:
    _note(folder, "started", rank)
    if rank == 1:
        _wait_for(Path(folder, "waiting0.json"))
        time.sleep(0.5)  # let rank 0 get into the all_reduce
        _note(folder, "dying", rank)
        os.kill(os.getpid(), signal.SIGKILL)
    _note(folder, "waiting", rank)
    dist.all_reduce(torch.ones(3))


def test_rank_killed_mid_collective_fails_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 was killed by signal SIGKILL"):
        run_ranks(_killed_mid_collective, 2, tmp_path, args=(str(tmp_path),), timeout=120)
    _, died = _read(tmp_path, "dying", 1)
    assert time.time() - died < REACTION_S < PG_TIMEOUT.total_seconds()
    assert time.monotonic() - start < 120
    _assert_all_gone(tmp_path)


def _skips_the_barrier(rank: int, folder: str, linger: float) -> None:
    _note(folder, "started", rank)
    if rank == 1:
        _wait_for(Path(folder, "waiting0.json"))
        time.sleep(linger)
        return  # normally, without ever entering the barrier
    _note(folder, "waiting", rank)
    dist.barrier()


@pytest.mark.parametrize(
    "linger",
    [
        # Rank 1's process ends: gloo sees its connection close and fails rank 0 at once.
        0.0,
        # Rank 1 is alive but elsewhere: only the process-group timeout frees rank 0.
        3 * SHORT_PG_TIMEOUT.total_seconds(),
    ],
)
def test_peer_waiting_for_an_absent_rank_fails(tmp_path: Path, linger: float) -> None:
    args = (str(tmp_path), linger)
    with pytest.raises(RuntimeError, match=r"rank 0 exited with code 1 \(its traceback"):
        run_ranks(
            _skips_the_barrier, 2, tmp_path, args=args, timeout=120, pg_timeout=SHORT_PG_TIMEOUT
        )
    _, waiting_since = _read(tmp_path, "waiting", 0)
    waited = time.time() - waiting_since
    assert waited < SHORT_PG_TIMEOUT.total_seconds() + REACTION_S
    if linger:
        assert waited >= SHORT_PG_TIMEOUT.total_seconds()  # it was the timeout that fired
    _assert_all_gone(tmp_path)


def _sleeps_forever(rank: int, folder: str) -> None:
    _note(folder, "started", rank)
    # Rank 0 leaves the group only once rank 1 has joined it: a rank still connecting when its
    # peer destroys the group fails, which would end the test before the deadline.
    dist.barrier()
    if rank == 1:
        time.sleep(10**6)


def test_deadline_kills_a_rank_that_never_returns(tmp_path: Path) -> None:
    # 60 s: rank 0 must have imported torch and returned by then, even on a loaded machine.
    deadline = 60.0
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^ranks \[1\] still running after 60 s: killed$"):
        run_ranks(_sleeps_forever, 2, tmp_path, args=(str(tmp_path),), timeout=deadline)
    assert deadline <= time.monotonic() - start < deadline + REACTION_S
    _assert_all_gone(tmp_path)


class _RecordRendezvous(pl.Callback):
    """Each rank writes down how its process group met."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store = distributed_c10d._get_default_store()
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
        seen = {
            "init_method": distributed_c10d._default_pg_init_method,
            "store": type(store).__name__,
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/out", self.layer(batch[0]).sum(), sync_dist=True)


def test_lightning_strategy_meets_through_the_file_not_a_port(tmp_path: Path) -> None:
    strategy = FileRendezvousDDP(tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[_RecordRendezvous(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_Linear(), DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2))
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # A FileStore at our file, not the TCPStore of Lightning's env:// on a free port.
        assert seen["init_method"] == f"file://{strategy.init_file}"
        assert seen["store"] == "FileStore"
    assert strategy.init_file.startswith(str(tmp_path))
