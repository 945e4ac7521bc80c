"""torchmetrics shell around the functional retrieval core."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_metric.checks import ArgumentTypeError, check_choice, check_k, check_metric
from lightning_metric.retrieval.accumulator import ROLE_CODES, EmbeddingAccumulator
from lightning_metric.retrieval.knn import Metric, prepare, same_rows
from lightning_metric.retrieval.ranking import retrieval_metrics
from lightning_metric.retrieval.rerank import Reranker, check_reranked, ranking_metrics

__all__ = ["RetrievalMetrics"]


class RetrievalMetrics(EmbeddingAccumulator):
    """Accumulates embeddings, labels and dataset indices; computes retrieval metrics.

    States are gathered across DDP ranks on :meth:`compute`, without DistributedSampler's
    padding and in single-process order (:class:`~.accumulator.EmbeddingAccumulator`), so
    every rank and any number of ranks give the same values.

    Items updated with ``role="both"`` (the default) query all the others leave-one-out.
    For a query/gallery protocol, update the query set with ``role="query"`` and the gallery
    with ``role="reference"``. A gallery that holds exactly the query rows (the same set
    passed twice) is evaluated leave-one-out, with a warning: a query never retrieves itself.

    Example::

        self.val_retrieval = RetrievalMetrics(k=(1, 5))
        # validation_step
        self.val_retrieval.update(embeddings, labels, batch["index"])
        # on_validation_epoch_end
        self.log_dict(self.val_retrieval.compute(), sync_dist=False)
        self.val_retrieval.reset()

    Args:
        k: cut-offs for ``recall@k`` / ``precision@k``. A ``k`` larger than the number of
            retrievable items is clamped with a warning (``recall@k`` is then the recall over
            all of them) instead of failing mid-training.
        metric, map_at_r, mrr, precision, clustering, average, fast: as in
            :func:`lightning_metric.retrieval.retrieval_metrics`.
        compute_on_cpu: move accumulated states to CPU after every update (saves accelerator
            memory; the search then runs through FAISS on CPU).
        rerank: a :class:`~lightning_metric.retrieval.rerank.Reranker` (``KReciprocal()``,
            ``QueryExpansion()``): the same metrics are also computed on its re-ranked
            distances, returned as ``rerank/recall@1``, ``rerank/map@r``, ... beside the plain
            ones (needs the full query x reference distance matrix in memory).
    """

    higher_is_better = True

    def __init__(
        self,
        k: int | Sequence[int] = (1, 2, 4, 8),
        metric: Metric = "cosine",
        map_at_r: bool = True,
        mrr: bool = True,
        precision: bool = True,
        clustering: bool = False,
        average: Literal["micro", "macro"] = "micro",
        compute_on_cpu: bool = False,
        fast: bool | None = None,
        rerank: Reranker | None = None,
    ) -> None:
        super().__init__(compute_on_cpu=compute_on_cpu)
        self.k = check_k(k)
        check_metric(metric)
        check_choice("average", average, ("micro", "macro"))
        self.metric = metric
        self.map_at_r = map_at_r
        self.mrr = mrr
        self.precision = precision
        self.clustering = clustering
        self.average = average
        self.fast = fast
        if rerank is not None and not callable(rerank):
            raise ArgumentTypeError(
                f"`rerank` must be a re-ranker such as "
                f"lightning_metric.retrieval.rerank.KReciprocal(), got {rerank!r}"
            )
        self.rerank = rerank

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Metrics as 0-d float tensors; see :func:`retrieval_metrics` for the keys."""
        emb, labels, _, roles = self._gathered()
        values = self._compute(emb, labels, roles)
        return {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}

    def _compute(self, emb: Tensor, labels: Tensor, roles: Tensor) -> dict[str, float]:
        split = bool((roles != ROLE_CODES["both"]).any())
        query_mask = (roles & 1).bool()
        reference_mask = (roles & 2).bool()
        if split and not bool(query_mask.any()):
            raise ValueError("RetrievalMetrics got reference items but no query items")
        if split and not bool(reference_mask.any()):
            raise ValueError("RetrievalMetrics got query items but no reference items")
        if split and _same_set(emb, labels, query_mask, reference_mask):
            # Every query would find its own copy in the gallery first: recall 1.0.
            warnings.warn(
                "RetrievalMetrics: the reference items are the query items again (same "
                "embeddings and labels); evaluating them leave-one-out instead, so that no "
                "query retrieves itself",
                UserWarning,
                stacklevel=3,
            )
            emb, labels = emb[query_mask], labels[query_mask]
            split = False
            query_mask = reference_mask = torch.ones_like(labels, dtype=torch.bool)
        # Items in both sets cannot retrieve themselves.
        overlap = bool((query_mask & reference_mask).any())
        candidates = int(reference_mask.sum()) - (1 if overlap else 0)
        num_queries = int(query_mask.sum())
        if candidates < 1:
            warnings.warn(
                f"only {int(reference_mask.sum())} item(s) to search: retrieval metrics "
                "are unavailable (not reported)",
                UserWarning,
                stacklevel=3,
            )
            return {"unscorable_queries": float(num_queries)}
        ks = {k: min(k, candidates) for k in self.k}
        if any(k != v for k, v in ks.items()):
            warnings.warn(
                f"k={max(self.k)} exceeds the {candidates} retrievable items: recall@k and "
                f"precision@k for k > {candidates} are computed at k={candidates}",
                UserWarning,
                stacklevel=3,
            )
        result = retrieval_metrics(
            emb,
            labels,
            tuple(sorted(set(ks.values()))),
            query_mask=query_mask if split else None,
            reference_mask=reference_mask if split else None,
            metric=self.metric,
            map_at_r=self.map_at_r,
            mrr=self.mrr,
            precision=self.precision,
            clustering=self.clustering,
            average=self.average,  # type: ignore[arg-type]
            fast=self.fast,
        )
        out: dict[str, float] = {}
        for k, used in ks.items():
            for prefix in ("recall", "precision"):
                if f"{prefix}@{used}" in result:
                    out[f"{prefix}@{k}"] = result[f"{prefix}@{used}"]
        out.update({n: v for n, v in result.items() if "@" not in n or n == "map@r"})
        if self.rerank is not None:
            out.update(self._reranked(emb, labels, query_mask, reference_mask, split, ks))
        return out

    def _reranked(
        self,
        emb: Tensor,
        labels: Tensor,
        query_mask: Tensor,
        reference_mask: Tensor,
        split: bool,
        ks: dict[int, int],
    ) -> dict[str, float]:
        """The same metrics on the distances the re-ranker returns, as ``rerank/<name>``."""
        assert self.rerank is not None
        x = prepare(emb.float(), self.metric)
        if split:
            position = torch.cumsum(reference_mask.long(), 0) - 1
            exclude = torch.where(reference_mask, position, -1)[query_mask]
            dist = self.rerank(x[query_mask], x[reference_mask], self.metric)
            qlab, rlab = labels[query_mask], labels[reference_mask]
        else:
            exclude = torch.arange(x.shape[0], device=x.device)
            dist = self.rerank(x, None, self.metric)
            qlab = rlab = labels
        # Checked here to name the re-ranker (a user's may return NaN or the wrong shape).
        dist = check_reranked(dist, len(qlab), len(rlab), f"the re-ranker {self.rerank!r}")
        result = ranking_metrics(
            dist, qlab, rlab, tuple(sorted(set(ks.values()))), exclude=exclude.cpu()
        )
        out = {
            f"rerank/recall@{k}": result[f"recall@{used}"]
            for k, used in ks.items()
            if f"recall@{used}" in result
        }
        for name in ("map@r", "r_precision", "mrr"):
            if name in result and (self.map_at_r or name == "mrr") and (self.mrr or name != "mrr"):
                out[f"rerank/{name}"] = result[name]
        return out


def _same_set(emb: Tensor, labels: Tensor, query_mask: Tensor, reference_mask: Tensor) -> bool:
    if bool((query_mask & reference_mask).any()):
        return False  # explicit overlap ("both" items) is already excluded row by row
    return same_rows(emb[query_mask], emb[reference_mask]) and torch.equal(
        labels[query_mask], labels[reference_mask]
    )
