"""Memory per rank past one host: sharded class centres (``--part centres``, here) and sharded
evaluation (``--part evaluation``: benchmarks/scale_evaluation.py, with its own flags).

    python benchmarks/scale.py --part centres                    # C=4M, D=128, W = 1, 2, 4
    python benchmarks/scale.py --part centres --classes 20000 --dim 16 --worlds 1 2
    python benchmarks/scale.py --part evaluation                 # 1M x 128 gallery, W = 1, 2, 4
    python benchmarks/scale.py --part evaluation --n 20000 --queries 500 --worlds 1 2

CPU processes joined by gloo (spawned, FileStore rendezvous), each reporting its own peak
resident memory (VmHWM, reset through /proc/self/clear_refs before each phase) per phase:

- setup: the head built on the meta device, this rank's rows built in place
  (``MarginHead.shard``), AdamW created;
- step: the first training step (the gradient and both moments appear; AdamW's CPU step also
  makes two temporaries of the weight's size): training memory, not the issue's target;
- save: ``sharded``: each rank writes its rows through torch.distributed.checkpoint
  (``ShardedCentresDDPStrategy``'s path); ``one file``: today's path, every centre and moment
  gathered onto rank 0, which writes one file;
- load: in *another* world size W' (the next of ``--worlds``, the last going to the first):
  the head's rows built in place, then the checkpoint's rows of weights and moments read
  (``sharded``: only the pieces over this rank's rows; ``one file``: the whole file, as
  Lightning reads it on every rank, then cut; the ranks read it one after the other so that the
  host holds one copy at a time; each rank's peak is its own either way);
- resume: one training step after the load (as ``step``).

Each figure is the phase's peak minus the same phase's peak of the same run at C = 1k (the
baseline: interpreter, torch, gloo, activations), beside the rank's share of the centre state,
weights + gradient + 2 AdamW moments = 16 * C * D / W bytes, and their ratio. Issue 20's
target: ratio <= 1.3 at C = 4M, W = 4 for setup, save and load. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import runpy
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from spawned import join_group, reset_peak, status_kb

BASELINE_CLASSES = 1000
BATCH = 64


class _Phases:
    """Peak RSS (kB) and seconds of each phase of one rank."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def begin(self, name: str) -> None:
        if dist.is_initialized():
            dist.barrier()
        reset_peak()
        self._name, self._start = name, time.perf_counter()

    def end(self) -> None:
        if dist.is_initialized():
            dist.barrier()
        self.seconds[self._name] = time.perf_counter() - self._start
        self.peaks[self._name] = status_kb("VmHWM")


class _SavesShards:
    """The strategy attributes ``ShardedCentres.save`` reads (no Trainer in this benchmark)."""

    saves_centre_shards = True
    centre_block_rows = None


def _model(classes: int, dim: int) -> tuple[Any, Any]:
    from torch import nn

    from lightning_metric.heads import ArcFaceHead
    from lightning_metric.heads.base import deferred_centres

    torch.manual_seed(0)
    with deferred_centres():
        head = ArcFaceHead(dim, classes, shard_classes=True)
    return head, nn.ModuleDict({"head": head})


def _step(head: Any, optimizer: Any, dim: int, classes: int, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, dim, generator=g)
    head.loss(x, torch.randint(0, classes, (BATCH,), generator=g)).backward()
    optimizer.step()


def _run(rank: int, world: int, job: dict[str, Any]) -> None:
    from lightning_metric.centre_checkpoint import PENDING_KEY, centres_directory, save_pieces
    from lightning_metric.sharded_centres import ShardedCentres

    torch.set_num_threads(1)
    join_group(rank, world, job["init"], timeout=1800)
    classes, dim, path = job["classes"], job["dim"], Path(job["path"])
    phases = _Phases()
    head, model = _model(classes, dim)
    centres = ShardedCentres(head)
    phases.begin("setup" if job["kind"] == "save" else "load")
    head.shard(rank, world) if world > 1 else head.materialize()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if job["kind"] == "save":
        phases.end()
        phases.begin("step")  # the gradient, both moments and AdamW's temporaries appear
        _step(head, optimizer, dim, classes, rank)
        phases.end()
        for how, name in (("sharded", "sharded.ckpt"), ("one file", "one.ckpt")):
            phases.begin(f"save {how}")
            checkpoint = {
                "state_dict": model.state_dict(),
                "optimizer_states": [optimizer.state_dict()],
            }
            strategy = _SavesShards() if how == "sharded" else None
            centres.save(checkpoint, "head.weight", [optimizer], strategy)  # type: ignore[arg-type]
            pending = checkpoint.pop(PENDING_KEY, None)
            if pending is not None:
                meta = checkpoint["lightning_metric_class_centres"]
                save_pieces(centres_directory(path / name), pending, meta)
            if rank == 0:
                torch.save(checkpoint, path / name)
            del checkpoint, pending
            phases.end()
    else:
        name = "sharded.ckpt" if job["kind"] == "load sharded" else "one.ckpt"
        source = path / name
        checkpoint = None
        for turn in range(world if name == "one.ckpt" else 1):
            if name == "sharded.ckpt" or turn == rank:
                checkpoint = torch.load(source, map_location="cpu", weights_only=False)
                centres.load(checkpoint, "head.weight", name, source, fitting=True)
                checkpoint = {  # keep only what the model and optimizer take (this rank's part)
                    "state_dict": checkpoint["state_dict"],
                    "optimizer_states": checkpoint["optimizer_states"],
                }
            if name == "one.ckpt" and world > 1:
                dist.barrier()
        assert checkpoint is not None
        model.load_state_dict(checkpoint["state_dict"])  # what Lightning does next
        optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        del checkpoint
        phases.end()
        phases.begin("resume")
        _step(head, optimizer, dim, classes, rank)
        phases.end()
    out = {"peaks": phases.peaks, "seconds": phases.seconds}
    Path(job["out"]).with_suffix(f".{rank}.json").write_text(json.dumps(out))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world: int, job: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    job = {**job, "init": str(Path(job["path"]) / f"rdv-{uuid.uuid4().hex}")}
    job["out"] = str(Path(job["path"]) / f"result-{uuid.uuid4().hex}")
    procs = [ctx.Process(target=_run, args=(r, world, job)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed in {job['kind']} on {world} ranks")
    return [
        json.loads(Path(job["out"]).with_suffix(f".{r}.json").read_text()) for r in range(world)
    ]


def _measure(classes: int, dim: int, worlds: list[int], root: Path, world: int) -> dict:
    """``(path, W, W', phase, rank) -> (peak kB, seconds)`` of saving on ``world`` ranks and
    loading into the next world size of ``worlds``."""
    results: dict[tuple, Any] = {}
    target = worlds[(worlds.index(world) + 1) % len(worlds)]
    folder = root / f"C{classes}-W{world}"
    folder.mkdir(parents=True)
    base = {"classes": classes, "dim": dim, "path": str(folder)}
    try:
        for rank, r in enumerate(_spawn(world, {**base, "kind": "save"})):
            for phase, peak in r["peaks"].items():
                how = phase.removeprefix("save ") if phase.startswith("save") else "both"
                name = "save" if phase.startswith("save") else phase
                results[(how, world, world, name, rank)] = (peak, r["seconds"][phase])
        for how in ("sharded", "one file"):
            kind = "load sharded" if how == "sharded" else "load one file"
            for rank, r in enumerate(_spawn(target, {**base, "kind": kind})):
                for phase, peak in r["peaks"].items():
                    results[(how, world, target, phase, rank)] = (peak, r["seconds"][phase])
    finally:
        shutil.rmtree(folder)
    return results


ORDER = {"setup": 0, "step": 1, "save": 2, "load": 3, "resume": 4}


def main() -> None:
    part = argparse.ArgumentParser(add_help=False)
    part.add_argument("--part", choices=["centres", "evaluation"], default="centres")
    chosen, rest = part.parse_known_args()
    if chosen.part == "evaluation":  # its own script, with its own flags
        script = Path(__file__).with_name("scale_evaluation.py")
        sys.argv = [str(script), *rest]
        runpy.run_path(str(script), run_name="__main__")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["centres", "evaluation"], default="centres")
    parser.add_argument("--classes", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tmp", default=None, help="folder for the checkpoints (default: /tmp)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scale-", dir=args.tmp))
    print(
        f"class centres, C={args.classes:,} D={args.dim}: peak RSS per rank minus the same "
        f"run's at C={BASELINE_CLASSES:,}, beside the rank's share 16*C*D/W",
        flush=True,
    )
    print(
        f"{'path':9} {'W->W2':>6} {'phase':7} {'rank':>4} {'peak-base MB':>13} "
        f"{'share MB':>9} {'ratio':>6} {'s':>6}",
        flush=True,
    )
    try:
        for world in args.worlds:
            started = time.perf_counter()
            small = _measure(BASELINE_CLASSES, args.dim, args.worlds, root, world)
            big = _measure(args.classes, args.dim, args.worlds, root, world)
            for key in sorted(big, key=lambda k: (ORDER[k[3]], k[0] != "sharded", k[4])):
                how, _, target, phase, rank = key
                peak, seconds = big[key]
                extra = (peak - small[key][0]) / 1024
                share = 16 * args.classes * args.dim / target / 2**20
                print(
                    f"{how:9} {f'{world}->{target}':>6} {phase:7} {rank:>4} {extra:13.0f} "
                    f"{share:9.0f} {extra / share:6.2f} {seconds:6.1f}",
                    flush=True,
                )
            print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
