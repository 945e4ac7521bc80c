"""Spawned gloo process groups for the DDP tests, built so that a test can fail but never hang.

* Rendezvous through a ``file://`` FileStore in the test's own tmp dir: no TCP port is picked,
  so no other process (another copy of these tests) can take it or join the wrong group.
* Every process group gets ``PG_TIMEOUT``: a rank left waiting in a collective raises.
* ``run_ranks`` kills every rank as soon as one fails or ``DEADLINE_S`` passes, and always
  joins them all; ``FileRendezvousDDP`` does the rendezvous for ``Trainer(strategy=...)``.

The timeout chain is PG_TIMEOUT (60 s) < DEADLINE_S (240 s) < pytest-timeout for ``ddp``
tests (300 s, set in conftest.py). The numbers are sized for 3 copies of these tests plus a
CPU hog on 2 cores, where a spawned rank alone takes 20-40 s to import torch + lightning.
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from lightning_metric.strategies import ShardedCentresDDPStrategy

# The longest a rank may wait for its peers in one collective, the rendezvous included (a
# peer may still be importing torch): long enough for a loaded machine, short for a hang.
PG_TIMEOUT = timedelta(seconds=60)
# The whole spawned run: imports (up to 40 s under load) + the work, with a 2x margin.
DEADLINE_S = 240.0


def _rendezvous_file(folder: str | Path) -> str:
    # A FileStore file must be fresh for each group: a leftover one would mix two groups. Its
    # folder must exist: a FileStore in a missing folder waits past the group's timeout.
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / f"rendezvous-{uuid.uuid4().hex}")


def _init_group(init_file: str, rank: int, world_size: int, timeout: timedelta) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
    )


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    init_file: str,
    timeout: timedelta,
) -> None:
    torch.set_num_threads(1)  # 2 ranks (or 3 copies of them) share 2 cores
    _init_group(init_file, rank, world_size, timeout)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _describe(rank: int, exitcode: int) -> str:
    if exitcode < 0:  # multiprocessing reports death by signal N as -N
        return f"rank {rank} was killed by signal {signal.Signals(-exitcode).name}"
    return f"rank {rank} exited with code {exitcode} (its traceback is in the captured stderr)"


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    tmp_path: str | Path,
    args: tuple = (),
    timeout: float = DEADLINE_S,
    pg_timeout: timedelta = PG_TIMEOUT,
) -> None:
    """Runs ``fn(rank, *args)`` in ``world_size`` spawned processes joined in one gloo group.

    ``fn`` and ``args`` must pickle (``fn`` a module-level function). Raises ``RuntimeError``
    naming the failed rank(s) as soon as one exits non-zero, ``TimeoutError`` naming the ranks
    still running after ``timeout`` seconds; no process outlives the call either way.
    """
    # spawn, not fork: a child forked from a parent whose OpenMP / gloo threads are running
    # can deadlock (seen once in a full-suite run); spawn costs a few seconds of imports.
    ctx = mp.get_context("spawn")
    init_file = _rendezvous_file(tmp_path)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, fn, args, world_size, init_file, pg_timeout),
            name=f"rank{rank}",
            daemon=True,  # the interpreter kills them too if the parent dies in between
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.start()
        while True:
            # One snapshot: reading exitcode twice, a rank failing in between looks finished.
            codes = [proc.exitcode for proc in procs]
            failed = [_describe(rank, code) for rank, code in enumerate(codes) if code]
            if failed:
                raise RuntimeError("; ".join(failed) + "; any rank still running was killed")
            running = [rank for rank, code in enumerate(codes) if code is None]
            if not running:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {running} still running after {timeout:.0f} s: killed")
            # Wakes up as soon as any rank exits, so a failure is seen at once.
            wait([procs[r].sentinel for r in running], timeout=min(left, 1.0))
    finally:
        started = [proc for proc in procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.kill()
        for proc in started:
            proc.join()


class FileRendezvousDDP(DDPStrategy):
    """``ddp_spawn`` whose process group meets through a FileStore in ``folder``, not a port.

    Lightning's ``_init_dist_connection`` returns early when a process group already exists,
    so its env:// rendezvous on ``find_free_network_port()`` is never used. One instance per
    Trainer launch: the rendezvous file is chosen here, in the parent, and pickled to ranks.
    """

    def __init__(self, folder: str | Path, timeout: timedelta = PG_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", timeout=timeout, **kwargs)
        self.init_file = _rendezvous_file(folder)

    def setup_distributed(self) -> None:
        self.set_world_ranks()  # global_rank / world_size come from the cluster environment
        if not dist.is_initialized():
            _init_group(self.init_file, self.global_rank, self.world_size, self._timeout)
        super().setup_distributed()

    def teardown(self) -> None:
        super().teardown()
        # Lightning leaves the group alive when a spawned rank returns; a rank exiting while
        # its peer's gloo threads still talk to it was seen to abort ("terminate called without
        # an active exception"). Both ranks leave together, then close the group themselves --
        # on success only: after a failure (Lightning tears down inside its `except`) a peer
        # may be gone, and a barrier would only hide the original error.
        if sys.exc_info()[0] is None and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class FileRendezvousLaunchedDDP(DDPStrategy):
    """Lightning's ``ddp`` (the launcher re-executes the command line on the other ranks),
    meeting through the FileStore ``init_file`` instead of ``MASTER_PORT``: every re-executed
    rank parses the same ``init_file`` from the command line. The caller makes it fresh (a
    path in the test's own tmp dir that does not exist yet)."""

    def __init__(self, init_file: str, timeout: timedelta = PG_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(timeout=timeout, **kwargs)
        self.init_file = init_file

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        if not dist.is_initialized():
            _init_group(self.init_file, self.global_rank, self.world_size, self._timeout)
        super().setup_distributed()


class FileRendezvousShardedDDP(FileRendezvousDDP, ShardedCentresDDPStrategy):
    """The library's per-rank checkpointing strategy, meeting through a FileStore."""
