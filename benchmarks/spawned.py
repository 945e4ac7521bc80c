"""Spawned CPU ranks for the benchmarks that measure a process group (gloo): each rank runs
``target(rank, world, *args, init, out)``, meets the others through the FileStore ``init`` and
writes its figures to ``out/<rank>.json``; a rank that fails, or outlives ``timeout``, stops
the run, and no rank is left behind."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import uuid
from collections.abc import Callable
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
