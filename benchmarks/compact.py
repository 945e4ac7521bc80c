"""Compact embeddings: what each prefix size and precision keeps, and what it costs to search.

    python benchmarks/compact.py                       # trains both models (2 main jobs), 1M search
    python benchmarks/compact.py --plain_ckpt A.ckpt --matryoshka_ckpt B.ckpt   # no training
    python benchmarks/compact.py --skip_quality --n 200000                      # search only

Quality: the README main job is trained twice, as it is and with
``examples/configs/matryoshka.yaml`` (``matryoshka_dims=[16, 32, 64, 128]``), each by
``lightning-metric fit`` in its own process capped to AVX2. The checkpoint each run keeps
(best val/recall@1) embeds the validation split (classes never trained on), and every
prefix d x precision cell is scored by ``retrieval_metrics(dim=d, quantization=p)``
(leave-one-out, exact search over the codes): recall@1 and MAP@R against bytes per vector.
The plain model's cell at d < 128 is the plain model truncated to d coordinates. The
float32 full-size cell is checked against the val/recall@1 the run logged.

Search: N clustered synthetic unit vectors (D=128, as benchmarks/retrieval.py makes them)
and 1,000 held-out queries from the same clusters. The reference is raw FAISS
``IndexFlatIP`` (float32 Flat). Each ``EmbeddingIndex`` precision is built, saved and
loaded as a user ships it; a loaded binary index keeps ``embeddings.npy`` memory-mapped and
reads only the re-scored candidates' rows from it. A search of fewer queries than FAISS
threads runs one FAISS thread per query (``EmbeddingIndex`` does; the reference is run the
same way, and once more with FAISS's own threads). Printed per contender: the bytes of the
in-memory search structure, queries per second one query per call (how a service answers
requests) and 1,000 per call (batch), and recall@10 against the exact float top 10.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from main_job import AVX2, CONFIG, ROOT
from retrieval import make_data

MATRYOSHKA = ROOT / "examples" / "configs" / "matryoshka.yaml"
DIMS = (16, 32, 64, 128)
PRECISIONS = ("float32", "int8", "binary", "binary_rescore")
RESCORE = 4
# Capped as a common laptop or cloud CPU runs; read when torch and FAISS load.
for _key, _value in {**AVX2, "FAISS_OPT_LEVEL": "avx2"}.items():
    os.environ.setdefault(_key, _value)


# ---------------------------------------------------------------- quality


def train(name: str, configs: list[Path], folder: Path) -> tuple[Path, float]:
    """``lightning-metric fit`` of the configs; the kept checkpoint and the logged best
    val/recall@1."""
    root = folder / name
    command = [
        sys.executable, "-m", "lightning_metric.cli", "fit",
        *(f"--config={c}" for c in configs),
        f"--trainer.default_root_dir={root}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, **AVX2}, check=True, capture_output=True)
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    best = max(float(r["val/recall@1"]) for r in rows if r.get("val/recall@1"))
    print(f"trained {name}: {time.perf_counter() - started:.0f} s, best val/recall@1 {best:.4f}")
    return root / "checkpoints" / "best.ckpt", best


def validation_embeddings(ckpt: Path) -> tuple[Any, Any]:
    """The checkpoint's embeddings of the main job's validation split (unseen classes)."""
    from lightning_metric import MetricLearningModule
    from lightning_metric.cli.lightning_cli import main as cli_main
    from lightning_metric.retrieval.index import embed_loader

    cli = cli_main([f"--config={CONFIG}", "--trainer.logger=false"], run=False)
    assert cli is not None
    data = cli.datamodule
    data.setup("validate")
    loader = data.val_dataloader()
    loader = loader[0] if isinstance(loader, list | tuple) else loader
    model = MetricLearningModule.load_from_checkpoint(ckpt, map_location="cpu")
    embeddings, labels, _ = embed_loader(model, loader)
    return embeddings, labels


def grid(embeddings: Any, labels: Any) -> dict[tuple[int, str], dict[str, float]]:
    from lightning_metric.retrieval import bytes_per_vector, retrieval_metrics

    cells = {}
    for d in DIMS:
        for p in PRECISIONS:
            m = retrieval_metrics(
                embeddings, labels, k=1, dim=d, quantization=p, rescore_multiplier=RESCORE,
                mrr=False, precision=False,
            )  # fmt: skip
            cells[(d, p)] = {
                "recall@1": m["recall@1"],
                "map@r": m["map@r"],
                "bytes": bytes_per_vector(d, p),  # type: ignore[arg-type]
            }
    return cells


def quality(args: argparse.Namespace, folder: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    runs = {
        "plain": ([CONFIG], args.plain_ckpt),
        "matryoshka": ([CONFIG, MATRYOSHKA], args.matryoshka_ckpt),
    }
    results = {}
    for name, (configs, ckpt) in runs.items():
        logged = None
        if ckpt is None:
            ckpt, logged = train(name, configs, folder)
        embeddings, labels = validation_embeddings(Path(ckpt))
        cells = grid(embeddings, labels)
        full = cells[(128, "float32")]["recall@1"]
        if logged is not None:
            print(f"  check: {name} d128/float32 recall@1 {full:.4f}, logged {logged:.4f}")
        results[name] = cells
    print(f"\nval, unseen classes ({len(labels)} items), leave-one-out; bytes per vector:")
    print(f"{'model':11s} {'cell':22s} {'bytes':>6s} {'recall@1':>9s} {'MAP@R':>7s}")
    for name, cells in results.items():
        for (d, p), c in cells.items():
            print(
                f"{name:11s} d{d:<4d}{p:17s} {c['bytes']:6d} {c['recall@1']:9.4f} {c['map@r']:7.4f}"
            )
    report_targets(results)
    return results


def report_targets(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    plain, mat = results["plain"], results["matryoshka"]

    def r1(cells: dict, d: int, p: str = "float32") -> float:  # type: ignore[type-arg]
        return float(cells[(d, p)]["recall@1"])

    full = r1(mat, 128)
    checks = [
        ("full dim: matryoshka within 0.5 pt of plain", full - r1(plain, 128), -0.005),
        ("d32 within 2 pt of full (matryoshka)", r1(mat, 32) - full, -0.02),
        ("d32 above the plain model truncated to 32", r1(mat, 32) - r1(plain, 32), 1e-12),
        ("int8 full >= 0.995x float", r1(mat, 128, "int8") / full - 0.995, 0.0),
        (
            "binary+rescore x4 full >= 0.98x float",
            r1(mat, 128, "binary_rescore") / full - 0.98,
            0.0,
        ),
    ]
    print("\nissue 19 targets (matryoshka model unless named):")
    for text, margin, floor in checks:
        print(f"  {'met ' if margin >= floor else 'MISS'} {text}: {margin:+.4f}")
    print(
        f"  binary alone, full dim: recall@1 {r1(mat, 128, 'binary'):.4f} ({r1(mat, 128, 'binary') / full:.3f}x float)"
    )


def plot(results: dict[str, dict], path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"float32": "o", "int8": "s", "binary": "v", "binary_rescore": "^"}
    for ax, key, title in zip(axes, ("recall@1", "map@r"), ("recall@1", "MAP@R"), strict=True):
        for name, style in (("plain", "--"), ("matryoshka", "-")):
            for p in PRECISIONS:
                cells = [results[name][(d, p)] for d in DIMS]
                ax.plot([c["bytes"] for c in cells], [c[key] for c in cells], style, marker=markers[p],
                        label=f"{name}, {p}" + (f" x{RESCORE}" if p == "binary_rescore" else ""))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector (search structure)")
        ax.set_title(f"{title} on unseen glyph classes")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


# ---------------------------------------------------------------- search speed


def search_speed(args: argparse.Namespace, folder: Path) -> None:
    import faiss

    from lightning_metric.retrieval.index import EmbeddingIndex
    from lightning_metric.retrieval.knn import faiss_threads_for

    x, _ = make_data(args.n + 1000, 128, args.n // 10, args.noise, 0)
    base, queries = x[:-1000], x[-1000:]
    flat = faiss.IndexFlatIP(128)
    flat.add(base)
    _, exact = flat.search(queries, 10)

    def measure(search: Any) -> tuple[float, float, np.ndarray]:
        single = queries[: args.single]
        search(single[:5])  # warm-up: threads started, pages touched
        started = time.perf_counter()
        for i in range(len(single)):
            search(single[i : i + 1])
        one = len(single) / (time.perf_counter() - started)
        started = time.perf_counter()
        found = search(queries)
        batch = len(queries) / (time.perf_counter() - started)
        return one, batch, found

    def raw(q: np.ndarray) -> np.ndarray:
        # The index's own thread rule (at most one FAISS thread per query), so that the ratios
        # compare precisions, not thread settings; FAISS's own rule is the next row.
        with faiss_threads_for(len(q)):
            return flat.search(q, 10)[1]

    size = 4 * 128 * len(base)
    rows = [("raw FAISS IndexFlatIP (reference)", size, *measure(raw))]
    rows.append(
        ("raw FAISS IndexFlatIP, FAISS's threads", size, *measure(lambda q: flat.search(q, 10)[1]))
    )
    contenders = {
        "float32": {},
        "int8 (SQ8)": {"precision": "int8"},
        "binary": {"precision": "binary"},
        f"binary + rescore x{RESCORE} (mmap)": {
            "precision": "binary",
            "rescore_multiplier": RESCORE,
        },
    }
    for name, options in contenders.items():
        index = EmbeddingIndex(base, **options)
        loaded = EmbeddingIndex.load(index.save(folder / f"index{len(rows)}"))
        del index
        codes = loaded._index.ntotal * loaded._index.code_size
        rows.append(
            (f"EmbeddingIndex {name}", codes, *measure(lambda q, i=loaded: i.search(q, k=10).ids))
        )
        del loaded
    ref_one, ref_batch = rows[0][2], rows[0][3]
    print(
        f"\nsearch, N={len(base):,} x 128, k=10, {faiss.omp_get_max_threads()} FAISS threads; ratios vs raw Flat:"
    )
    print(
        f"{'contender':42s} {'MB':>7s} {'QPS 1/call':>11s} {'QPS 1000/call':>14s} {'recall@10':>9s}"
    )
    for name, size, one, batch, found in rows:
        hit = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
        print(
            f"{name:42s} {size / 2**20:7.1f} {one:7.0f} {one / ref_one:4.1f}x {batch:9.0f} {batch / ref_batch:4.1f}x {hit:9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain_ckpt", type=Path)
    parser.add_argument("--matryoshka_ckpt", type=Path)
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--skip_speed", action="store_true")
    parser.add_argument(
        "--n", type=int, default=1_000_000, help="indexed vectors for the search part"
    )
    parser.add_argument("--noise", type=float, default=0.9)
    parser.add_argument("--single", type=int, default=200, help="queries timed one per call")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "compact.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quality:
            plot(quality(args, Path(tmp)), args.picture)
        if not args.skip_speed:
            search_speed(args, Path(tmp))


if __name__ == "__main__":
    main()
