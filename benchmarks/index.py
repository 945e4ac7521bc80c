"""Approximate FAISS indexes in ``EmbeddingIndex``: build time, memory, speed, recall.

N = 1,000,000 synthetic clustered unit vectors, D = 128 (cosine = inner product), 1,000
held-out queries from the same distribution, 2 FAISS threads. Every index is built through
``EmbeddingIndex(embeddings, factory=...)`` (training included) and searched for the top 10;
recall@10 is the fraction of the exact top 10 (the ``Flat`` index) it returns.

    python benchmarks/index.py                    # 1M vectors, ~10 minutes on 2 cores
    python benchmarks/index.py --n 100000         # quick
    python benchmarks/index.py --ckpt outputs/glyphs_arcface/checkpoints/best.ckpt
                                                  # + the glyph test embeddings of a model
    python benchmarks/index.py --load-only        # only the load-verification table

Columns: ``build s`` (train + add), ``RSS MB`` (peak resident-memory increase while
building: includes the float32 copy of the embeddings EmbeddingIndex keeps, N*D*4 bytes),
``index MB`` (the serialised FAISS index), ``QPS`` (queries per second, one batch of all
queries), ``x Flat`` (QPS ratio to exact search in the same run), ``recall@10``.
IVF uses nlist = 4*sqrt(N) rounded to a power of two, trained on 40 vectors per list.

A second table times ``EmbeddingIndex.load`` of the saved ``Flat`` and IVF-PQ indexes with
the SHA-256 verification of every file (the default) and with ``verify=False``: best of
``--load-repeats`` loads each, files in the page cache (just written; a cold read from disk
adds the same read time to both). ``files MB`` is the directory's size, ``x`` the ratio.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# Other processes share the cores: OpenMP threads that spin while waiting would steal them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
K = 10


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def peak_rss_delta() -> Iterator[list[float]]:
    """Samples the resident memory every 5 ms; yields a list that gets the peak increase."""
    base = current_rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out: list[float] = [0.0]
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out[0] = max(peak[0], current_rss_mb()) - base


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, generated in chunks (float32)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)]
        x += rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def glyph_embeddings(ckpt: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of the glyph test split from a trained main-job checkpoint."""
    import torch

    from lightning_metric.cli import main

    config = str(ROOT / "examples" / "configs" / "glyphs_arcface.yaml")
    cli = main(["--config", config, "--trainer.logger=false"], run=False)
    assert cli is not None
    model, data = cli.model, cli.datamodule
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    data.setup("test")
    embeddings, labels = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            embeddings.append(model(batch["x"]).float())
            labels.append(batch["label"])
    return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()


def run_table(
    name: str, base: np.ndarray, queries: np.ndarray, configs: list[dict[str, Any]]
) -> list[str]:
    import faiss

    from lightning_metric.retrieval import EmbeddingIndex

    rows = []
    truth: np.ndarray | None = None
    flat_qps = 0.0
    for config in configs:
        factory = config["factory"]
        gc.collect()
        with peak_rss_delta() as rss:
            start = time.perf_counter()
            index = EmbeddingIndex(base, factory=factory, train_size=config.get("train_size"))
            build = time.perf_counter() - start
        size_mb = faiss.serialize_index(index._index).nbytes / 2**20
        for params in config.get("params", [{}]):
            index.search(queries[:10], k=K, **params)  # warm-up
            start = time.perf_counter()
            ids, _ = index.search(queries, k=K, **params)
            qps = len(queries) / (time.perf_counter() - start)
            if truth is None:
                truth, flat_qps = ids, qps
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)])
            label = factory + "".join(f" {k}={v}" for k, v in params.items())
            rows.append(
                f"| {name} | {label} | {build:.1f} | {rss[0]:.0f} | {size_mb:.0f} | "
                f"{qps:,.0f} | {qps / flat_qps:.1f} | {recall:.3f} |"
            )
            print(rows[-1], flush=True)
        del index
    return rows


def load_table(
    name: str, base: np.ndarray, configs: list[dict[str, Any]], repeats: int
) -> list[str]:
    """Load time with and without the content-hash verification, per saved index."""
    from lightning_metric.retrieval import EmbeddingIndex

    rows = []
    for config in configs:
        index = EmbeddingIndex(base, factory=config["factory"], train_size=config.get("train_size"))
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            directory = index.save(Path(tmp) / "index")
            del index
            gc.collect()
            size_mb = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
            best = {}
            for verify in (True, False):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    loaded = EmbeddingIndex.load(directory, verify=verify)
                    times.append(time.perf_counter() - start)
                    del loaded
                    gc.collect()
                best[verify] = min(times)
        rows.append(
            f"| {name} | {config['factory']} | {size_mb:.0f} | {best[True]:.2f} | "
            f"{best[False]:.2f} | {best[True] / best[False]:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def load_configs(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat and the IVF-PQ index (lossy: its index.faiss is small next to embeddings.npy)."""
    return [c for c in configs if c["factory"] == "Flat" or ",PQ" in c["factory"]]


def configs_for(n: int, dim: int) -> list[dict[str, Any]]:
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    pq_m = dim // 4 if dim % 4 == 0 else dim
    return [
        {"factory": "Flat"},
        {"factory": "HNSW32", "params": [{"ef_search": 32}, {"ef_search": 64}, {"ef_search": 128}]},
        {
            "factory": f"IVF{nlist},Flat",
            "train_size": 40 * nlist,
            "params": [{"nprobe": 8}, {"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64}],
        },
        {
            "factory": f"IVF{nlist},PQ{pq_m}",
            "train_size": 40 * nlist,
            "params": [{"nprobe": 16}, {"nprobe": 64}],
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ckpt", help="main-job checkpoint: also benchmark glyph embeddings")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--load-only", action="store_true", help="only the load table")
    parser.add_argument("--load-repeats", type=int, default=3)
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} threads")
    header = [
        "| data | index | build s | RSS MB | index MB | QPS | x Flat | recall@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    load_header = [
        "| data | index | files MB | load s (verify) | load s (verify=False) | x |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows: list[str] = []
    load_rows: list[str] = []
    if not args.skip_synthetic:
        base = clustered(args.n, args.dim, args.clusters, seed=0)
        queries = clustered(args.queries, args.dim, args.clusters, seed=1)
        name = f"clustered {args.n:,}x{args.dim}"
        configs = configs_for(args.n, args.dim)
        if not args.load_only:
            print("\n".join(header), flush=True)
            rows += run_table(name, base, queries, configs)
        print("\n".join(load_header), flush=True)
        load_rows += load_table(name, base, load_configs(configs), args.load_repeats)
        del base
    if args.ckpt:
        emb, _ = glyph_embeddings(args.ckpt)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(emb))
        nq = min(args.queries, len(emb) // 5)
        queries, base = emb[order[:nq]], emb[order[nq:]]
        name = f"glyphs test {len(base):,}x{emb.shape[1]}"
        rows += run_table(name, base, queries, configs_for(len(base), emb.shape[1]))
    if rows:
        print("\n" + "\n".join(header + rows))
    if load_rows:
        print("\n" + "\n".join(load_header + load_rows))


if __name__ == "__main__":
    main()
