"""Sharded class centres: memory per rank and step time, 1 process vs W CPU processes (gloo).

    python benchmarks/sharded.py                       # C=1M, D=128, global batch 256, W=1 and 2
    python benchmarks/sharded.py --classes 200000 --worlds 1 2 3

One step = ArcFace loss forward + backward (into the embeddings and the centres) + AdamW step,
on the same global batch: one process holds every centre, W processes hold ``C / W`` each
(``shard_classes=True``) and gather the batch. Per rank it prints:

- centres: the bytes of the centre weight + its gradient + AdamW's two moments (exact, from
  the tensors: what scales with C);
- peak RSS: the process's peak resident memory during the timed steps (VmHWM, reset just
  before them), minus the RSS before the head was built: centres, their optimizer state and
  every activation, as the OS sees it;
- step: the fastest of ``--steps`` steps (load only ever adds time).

The ratio column divides by the one-process figure measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from spawned import join_group, reset_peak, run_spawned, status_kb


def _rank(rank: int, world: int, args: argparse.Namespace, init: str, out: str) -> None:
    from lightning_metric.heads import ArcFaceHead

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    join_group(rank, world, init, timeout=600)
    before = status_kb("VmRSS")
    torch.manual_seed(0)
    head = ArcFaceHead(args.dim, args.classes, shard_classes=True)
    head.shard(rank, world)  # what MetricLearningModule.setup does under DDP
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    batch = args.batch // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, args.dim, generator=g, requires_grad=True)
    y = torch.randint(0, args.classes, (batch,), generator=g)
    times = []
    for step in range(args.steps + 1):
        if step == 1:
            reset_peak()  # the first step allocated the gradient and the moments
        start = time.perf_counter()
        head.loss(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if world > 1:
            dist.barrier()
        if step:
            times.append(time.perf_counter() - start)
    w = head.weight
    state = optimizer.state[w]
    centres = w.nbytes + w.grad.nbytes + sum(t.nbytes for t in state.values() if t.ndim == 2)
    result = {
        "centres_mb": centres / 2**20,
        "peak_mb": (status_kb("VmHWM") - before) / 1024,
        "step_s": min(times),
        "rows": w.shape[0],
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace) -> list[dict[str, float]]:
    return run_spawned(_rank, world, (args,), args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="global batch (all ranks)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    print(
        f"ArcFace, C={args.classes:,}, D={args.dim}, global batch {args.batch}, AdamW, "
        f"{os.cpu_count()} cores shared by the ranks"
    )
    print(
        f"{'ranks':>5} | {'centre rows/rank':>16} | {'centres MB/rank':>15} | {'x 1 proc':>8} | "
        f"{'peak RSS MB/rank':>16} | {'x 1 proc':>8} | {'step s':>7} | {'x 1 proc':>8}"
    )
    base: dict[str, float] = {}
    for world in args.worlds:
        ranks = _run(world, args)
        worst = {k: max(r[k] for r in ranks) for k in ("centres_mb", "peak_mb", "step_s", "rows")}
        base = base or worst
        print(
            f"{world:>5} | {int(worst['rows']):>16,} | {worst['centres_mb']:>15.0f} | "
            f"{worst['centres_mb'] / base['centres_mb']:>8.2f} | {worst['peak_mb']:>16.0f} | "
            f"{worst['peak_mb'] / base['peak_mb']:>8.2f} | {worst['step_s']:>7.2f} | "
            f"{worst['step_s'] / base['step_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
