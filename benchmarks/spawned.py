"""Spawned CPU ranks for the benchmarks that measure a process group (gloo): each rank runs
``target(rank, world, *args, init, out)``, meets the others through the FileStore ``init`` and
writes its figures to ``out/<rank>.json``; a rank that fails, or outlives ``timeout``, stops
the run, and no rank is left behind. A rank reads its own memory with :func:`status_kb` and
:func:`reset_peak`."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


def run_spawned(
    target: Callable[..., None], world: int, args: tuple[Any, ...], timeout: float
) -> list[dict[str, Any]]:
    """Every rank's ``out/<rank>.json``, in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        init = str(Path(out) / f"rendezvous-{uuid.uuid4().hex}")
        procs = [
            ctx.Process(target=target, args=(r, world, *args, init, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout=timeout)
                if p.exitcode != 0:
                    raise RuntimeError(f"world {world}: a rank failed (exit code {p.exitcode})")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def join_group(rank: int, world: int, init: str, timeout: float) -> None:
    """Join the gloo process group of ``world`` ranks through the FileStore ``init`` (no TCP
    port); a single rank runs without one."""
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{init}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )


def status_kb(field: str) -> int:
    """``/proc/self/status``'s ``field`` (``VmRSS``, ``VmHWM``: the peak) in kB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Make ``VmHWM`` the current RSS, so a phase's peak is measured on its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
