"""Sharded evaluation: memory per rank and time, gathered vs sharded, 1, 2 and 4 CPU
processes (gloo).

    python benchmarks/scale_evaluation.py                      # N=1M gallery, D=128, W=1 2 4
    python benchmarks/scale_evaluation.py --n 20000 --queries 500 --worlds 1 2   # seconds

The gallery is ``--n`` clustered unit vectors (the generator of benchmarks/retrieval.py:
``--n / 20`` classes, ``--noise`` 1.6), ``--queries`` more items of the same classes are the
queries (``RetrievalMetrics`` roles ``"query"`` / ``"reference"``, recall@1,2,4,8, MAP@R,
R-precision, MRR). Each rank makes only its own rows (DistributedSampler's split, padding
included), block by block from a seed per block, so no rank ever holds the whole set but the
gathered path itself. Per rank:

- rows MB: the bytes of the rank's own embeddings (what ``update`` accumulated);
- peak MB: the process's peak resident memory (VmHWM, reset after the imports) from before
  the rows are made to the end of ``compute()``, minus the RSS at that point: the rank's rows
  plus everything evaluation adds (the gathered copies, or the shard's prepared copy and the
  query blocks);
- compute s: ``compute()`` alone, slowest rank.

"gathered" is ``RetrievalMetrics()`` (every rank gathers every row and computes the whole
metric); "sharded" is ``RetrievalMetrics(shard_reference=True)``. The ratio column divides by
the gathered figure at the same world size. The script asserts that every sharded result
equals the gathered one and the one-process one exactly.

The vectors are rounded to a 1/256 grid and searched by inner product (``metric="ip"``), so
that every float32 score is exact whatever order BLAS sums it in: the assertion then checks
the sharded merge (tie order included), not the BLAS kernel. On arbitrary floats at D=128,
FAISS's blocked GEMM can round the same pair differently in a gallery of another size, and
two candidates whose scores differ only in that rounding can swap in either path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from spawned import join_group, reset_peak, run_spawned, status_kb

_BLOCK = 1 << 14  # rows made from one seed


def _rows(n: int, world: int, rank: int) -> np.ndarray:
    """DistributedSampler(shuffle=False) rows of ``rank``: padded by repeating the first."""
    total = -(-n // world) * world
    return np.arange(rank, total, world) % n


def _make(
    rows: np.ndarray, dim: int, classes: int, noise_norm: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of the set (the generator of benchmarks/retrieval.py, one seed per block
    of rows), on a 1/256 grid."""
    # One set of class centres for the queries and the gallery; ``seed`` picks the rows.
    centres = np.random.default_rng(0).standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((len(rows), dim), dtype=np.float32)
    labels = np.empty(len(rows), dtype=np.int64)
    blocks = rows // _BLOCK
    for b in np.unique(blocks):
        rng = np.random.default_rng([seed, int(b)])
        block_labels = rng.integers(0, classes, _BLOCK)
        noise = rng.standard_normal((_BLOCK, dim)).astype(np.float32)
        mine = np.nonzero(blocks == b)[0]
        offset = rows[mine] - b * _BLOCK
        v = centres[block_labels[offset]] + noise_norm / np.sqrt(dim) * noise[offset]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        x[mine] = np.round(v * 256) / 256
        labels[mine] = block_labels[offset]
    return torch.from_numpy(x), torch.from_numpy(labels)


def _rank(
    rank: int, world: int, shard: bool, args: argparse.Namespace, init: str, out: str
) -> None:
    from lightning_metric.retrieval import RetrievalMetrics

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    join_group(rank, world, init, timeout=args.timeout)
    classes = max(1, args.n // 20)
    metric = RetrievalMetrics(k=(1, 2, 4, 8), metric="ip", shard_reference=shard)
    reset_peak()
    before = status_kb("VmRSS")
    nbytes = 0
    for role, n, seed in (("query", args.queries, 2), ("reference", args.n, 1)):
        rows = _rows(n, world, rank)
        for start in range(0, len(rows), args.batch):
            part = rows[start : start + args.batch]
            x, labels = _make(part, args.dim, classes, args.noise, seed)
            nbytes += x.nbytes
            index = torch.from_numpy(part)
            metric.update(x, labels, index, role=role, dataset_size=n)  # type: ignore[arg-type]
    if world > 1:
        dist.barrier()
    start_t = time.perf_counter()
    values = {k: float(v) for k, v in metric.compute().items()}
    seconds = time.perf_counter() - start_t
    result = {
        "rows_mb": nbytes / 2**20,
        "peak_mb": (status_kb("VmHWM") - before) / 1024,
        "compute_s": seconds,
        "metrics": values,
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, shard: bool, args: argparse.Namespace) -> list[dict]:  # type: ignore[type-arg]
    return run_spawned(_rank, world, (shard, args), args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery items")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--noise", type=float, default=1.6, help="noise norm / centre norm")
    parser.add_argument("--batch", type=int, default=4096, help="rows per update() call")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    print(
        f"gallery N={args.n:,} x D={args.dim}, {args.queries:,} queries, {args.n // 20:,} "
        f"classes, inner product on a 1/256 grid; {os.cpu_count()} cores shared by the ranks"
    )
    print(
        f"{'ranks':>5} | {'path':>8} | {'rows MB/rank':>12} | {'peak MB/rank':>12} | "
        f"{'x gathered':>10} | {'compute s':>9} | {'x gathered':>10}"
    )
    reference: dict[str, float] | None = None
    for world in args.worlds:
        gathered: dict[str, float] = {}
        for shard in (False, True) if world > 1 else (False,):
            ranks = _run(world, shard, args)
            worst = {k: max(r[k] for r in ranks) for k in ("rows_mb", "peak_mb", "compute_s")}
            for r in ranks:
                assert r["metrics"] == ranks[0]["metrics"], "ranks disagree"
            reference = reference or ranks[0]["metrics"]
            assert ranks[0]["metrics"] == reference, (world, shard, ranks[0]["metrics"], reference)
            gathered = gathered or worst
            print(
                f"{world:>5} | {'sharded' if shard else 'gathered':>8} | "
                f"{worst['rows_mb']:>12.0f} | {worst['peak_mb']:>12.0f} | "
                f"{worst['peak_mb'] / gathered['peak_mb']:>10.2f} | {worst['compute_s']:>9.1f} | "
                f"{worst['compute_s'] / gathered['compute_s']:>10.2f}"
            )
    assert reference is not None
    print("metrics (equal on every path):", json.dumps(reference))


if __name__ == "__main__":
    main()
