"""Re-ranking on glyphs: plain vs k-reciprocal vs alpha-QE (+ DBA) retrieval metrics.

Embeds the glyph test split (classes never trained on) with a trained main-job checkpoint
and evaluates every item against all the others (leave-one-out):

    python benchmarks/rerank.py --ckpt outputs/glyphs_arcface/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import time

import torch
from index import glyph_embeddings  # benchmarks/index.py, run from this folder's parent

from lightning_metric.retrieval import retrieval_metrics
from lightning_metric.retrieval.rerank import KReciprocal, QueryExpansion, ranking_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    args = parser.parse_args()
    emb_np, labels_np = glyph_embeddings(args.ckpt)
    emb, labels = torch.from_numpy(emb_np), torch.from_numpy(labels_np)
    emb = torch.nn.functional.normalize(emb, dim=1)
    n = len(emb)
    print(f"glyphs test split: {n} items, {len(labels.unique())} classes, dim {emb.shape[1]}")
    rows = [
        "| method | recall@1 | recall@4 | MAP@R | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    start = time.perf_counter()
    plain = retrieval_metrics(emb, labels, k=(1, 4))
    rows.append(
        f"| plain (cosine) | {plain['recall@1']:.4f} | {plain['recall@4']:.4f} | "
        f"{plain['map@r']:.4f} | {time.perf_counter() - start:.1f} |"
    )
    for name, reranker in (
        ("k-reciprocal k1=20 k2=6 lambda=0.3", KReciprocal(20, 6, 0.3)),
        ("alpha-QE k=2 alpha=3", QueryExpansion(k=2, alpha=3.0)),
        ("alpha-QE + DBA k=2 alpha=3", QueryExpansion(k=2, alpha=3.0, dba=True)),
    ):
        start = time.perf_counter()
        dist = reranker(emb, None, "cosine")
        m = ranking_metrics(dist, labels, labels, k=(1, 4), exclude=torch.arange(n))
        rows.append(
            f"| {name} | {m['recall@1']:.4f} | {m['recall@4']:.4f} | {m['map@r']:.4f} | "
            f"{time.perf_counter() - start:.1f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
