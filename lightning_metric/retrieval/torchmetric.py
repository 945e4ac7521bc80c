"""torchmetrics shell around the functional retrieval core."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metric.checks import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_k,
    check_metric,
)
from lightning_metric.distributed import world_size
from lightning_metric.retrieval.accumulator import ROLE_CODES, EmbeddingAccumulator, Role
from lightning_metric.retrieval.knn import Similarity, prepare
from lightning_metric.retrieval.protocol import (
    clamp_k,
    exclusion,
    num_candidates,
    repeats_queries,
)
from lightning_metric.retrieval.quantization import (
    Precision,
    bytes_per_vector,
    check_dims,
    check_precisions,
)
from lightning_metric.retrieval.ranking import retrieval_metrics
from lightning_metric.retrieval.relevance import (
    LABEL_KINDS,
    LabelKind,
    label_kind_of,
    normalize_labels,
)
from lightning_metric.retrieval.rerank import Reranker, check_reranked, ranking_metrics
from lightning_metric.retrieval.sharded import (
    ShardedOptions,
    layout,
    repeats_local,
    sharded_metrics,
)

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
        label_kind, level_names: how ``labels`` say what is relevant
            (:mod:`~lightning_metric.retrieval.relevance`): ``update`` takes ``[B]`` class
            ids, a ``[B, L]`` multi-hot matrix (bool, read as multi-label by ``"auto"``) or
            ``[B, levels]`` hierarchical ids (``label_kind="hierarchical"``: every key is
            reported per level, ``recall@1/level0``, ...).
        dims, precisions: the compact-embedding grid. For every Matryoshka prefix size in
            ``dims`` (strictly increasing; default: the whole embedding) and every precision in
            ``precisions`` (``"float32"``, ``"int8"``, ``"binary"``, ``"binary_rescore"``;
            default ``["float32"]``) the same metrics are returned as
            ``d64/int8/recall@1``, ``d64/int8/map@r``, ... with ``d64/int8/bytes_per_vector``,
            beside the plain keys (unchanged). Each cell is
            :func:`~lightning_metric.retrieval.retrieval_metrics` with ``dim`` and
            ``quantization``: the prefix is L2-normalised, int8 ranges come from the reference
            items (leave-one-out: the whole set), and each search is exact for its codes (see
            :mod:`~lightning_metric.retrieval.quantization`). Neither re-ranking nor
            clustering is applied to the cells.
        rescore_multiplier: binary candidates per neighbour re-scored in float for
            ``"binary_rescore"``.
        shard_reference: under DDP, keep the embeddings sharded instead of gathering them to
            every rank (:mod:`~lightning_metric.retrieval.sharded`): each rank keeps the rows
            it embedded, query blocks are broadcast, every rank searches its rows and the
            block's owner merges the candidates, ties by lower one-process row as exact search
            breaks them. Same values as one process; embedding memory per rank about
            ``N * D * 4 / W`` bytes (plus a normalised copy for ``cosine`` when the rows are
            not unit-norm already, and a query block) instead of
            several copies of ``N * D * 4``. Off by default: below a few million rows the
            gathered search is faster (one FAISS call, no per-block collectives). Single
            labels only; refuses ``rerank``, ``clustering`` and ``"binary_rescore"``, which
            need every row in one place. Collectives use the embeddings' device. In one
            process it changes nothing.
    """

    higher_is_better = True

    def __init__(
        self,
        k: int | Sequence[int] = (1, 2, 4, 8),
        metric: Similarity = "cosine",
        map_at_r: bool = True,
        mrr: bool = True,
        precision: bool = True,
        clustering: bool = False,
        average: Literal["micro", "macro"] = "micro",
        compute_on_cpu: bool = False,
        fast: bool | None = None,
        rerank: Reranker | None = None,
        label_kind: LabelKind = "auto",
        level_names: Sequence[str] | None = None,
        dims: Sequence[int] | None = None,
        precisions: Sequence[Precision] | None = None,
        rescore_multiplier: int = 4,
        shard_reference: bool = False,
    ) -> None:
        # Sharded: no torchmetrics gather at compute; the ranks exchange query blocks instead.
        super().__init__(compute_on_cpu=compute_on_cpu, sync_on_compute=not shard_reference)
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
        check_choice("label_kind", label_kind, LABEL_KINDS)
        self.label_kind = label_kind
        self.level_names = None if level_names is None else list(level_names)
        self.dims = None if dims is None else check_dims(dims)
        self.precisions = None if precisions is None else check_precisions(precisions)
        self.rescore_multiplier = check_int("rescore_multiplier", rescore_multiplier, minimum=1)
        if not isinstance(shard_reference, bool):
            raise ArgumentTypeError(f"`shard_reference` must be a bool, got {shard_reference!r}")
        self.shard_reference = shard_reference
        if shard_reference:
            _check_shardable(self)
        self._kinds_seen: tuple[Any, ...] = ()

    def update(  # type: ignore[override]
        self,
        embeddings: Tensor,
        labels: Tensor,
        indexes: Tensor | None = None,
        role: Role = "both",
        dataset_size: int | None = None,
    ) -> None:
        """Add a batch (:meth:`EmbeddingAccumulator.update`); ``labels`` are ``[B]`` class ids,
        a ``[B, L]`` multi-hot matrix or ``[B, levels]`` hierarchical ids (``label_kind``)."""
        width = embeddings.shape[-1] if isinstance(embeddings, Tensor) else None
        if self.dims and width is not None and self.dims[-1] > width:
            raise ValueError(
                f"RetrievalMetrics(dims={list(self.dims)}) asks for a prefix of "
                f"{self.dims[-1]} dimensions, but the embeddings have {width}: "
                f"use dims <= {width}"
            )
        if isinstance(labels, Tensor):
            kind = label_kind_of(labels, self.label_kind)
            if labels.ndim != (1 if kind == "single" else 2):
                raise ValueError(
                    f"RetrievalMetrics(label_kind={self.label_kind!r}) takes {kind} labels "
                    f"{'[B]' if kind == 'single' else '[B, L]'}, got shape {tuple(labels.shape)}"
                )
            if kind == "multi_label":
                normalize_labels(labels, kind, labels.shape[0])  # no empty label set
            if self.shard_reference and kind != "single":
                raise ValueError(
                    f"RetrievalMetrics(shard_reference=True) takes single class ids [B], got "
                    f"{kind} labels of shape {tuple(labels.shape)}: evaluate them gathered "
                    "(shard_reference=False)"
                )
            seen = self._kinds_seen
            if seen and (seen[0] != kind or seen[1] != tuple(labels.shape[1:])):
                raise ValueError(
                    f"RetrievalMetrics got {kind} labels of shape {tuple(labels.shape)} after "
                    f"{seen[0]} labels with {seen[1] or 'no'} columns: every batch needs the "
                    "same kind and width"
                )
            self._kinds_seen = (kind, tuple(labels.shape[1:]))
        super().update(embeddings, labels, indexes, role, dataset_size)

    def reset(self) -> None:
        super().reset()
        self._kinds_seen = ()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Metrics as 0-d float tensors; see :func:`retrieval_metrics` for the keys."""
        if self.shard_reference and world_size() > 1:
            values = self._compute_sharded()
        else:
            emb, labels, _, roles = self._gathered()
            values = self._compute(emb, labels, roles)
        return {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}

    def _compute_sharded(self) -> dict[str, float]:
        """:meth:`_compute` with every rank holding only its own rows (no gather)."""
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise ValueError("RetrievalMetrics.compute() called before any update()")
        emb, labels, index, roles = self.local_rows()
        lay = layout(roles, index, self._dataset_sizes, emb.device)
        if lay.split and lay.num_queries == 0:
            raise ValueError("RetrievalMetrics got reference items but no query items")
        if lay.split and lay.num_references == 0:
            raise ValueError("RetrievalMetrics got query items but no reference items")
        if lay.split and repeats_local(emb, labels, roles, lay):
            warnings.warn(
                "RetrievalMetrics: the reference items are the query items again (same "
                "embeddings and labels); evaluating them leave-one-out instead, so that no "
                "query retrieves itself",
                UserWarning,
                stacklevel=3,
            )
            queries = roles == ROLE_CODES["query"]
            emb, labels, index = emb[queries], labels[queries], index[queries]
            roles = torch.full_like(roles[queries], ROLE_CODES["both"])
            sizes = self._dataset_sizes.get(ROLE_CODES["query"])
            both = {} if sizes is None else {ROLE_CODES["both"]: sizes}
            lay = layout(roles, index, both, emb.device)
        candidates = lay.num_references - (1 if lay.any_own else 0)
        if candidates < 1:
            warnings.warn(
                f"only {lay.num_references} item(s) to search: retrieval metrics "
                "are unavailable (not reported)",
                UserWarning,
                stacklevel=3,
            )
            return {"unscorable_queries": float(lay.num_queries)}
        ks = clamp_k(self.k, candidates, stacklevel=4)
        used = tuple(sorted(set(ks.values())))
        o = ShardedOptions(self.metric, self.map_at_r, self.mrr, self.precision, self.average)  # type: ignore[arg-type]
        out = _requested(sharded_metrics(emb, labels, lay, used, o), ks, ("recall", "precision"))
        if self.dims is not None or self.precisions is not None:
            for dim in self.dims or (emb.shape[1],):
                for precision in self.precisions or ("float32",):
                    result = sharded_metrics(
                        emb, labels, lay, used, o, dim, precision, self.rescore_multiplier
                    )
                    cell = f"d{dim}/{precision}/"
                    for name, value in _requested(result, ks, ("recall", "precision")).items():
                        if not name.startswith("unscorable_queries"):
                            out[cell + name] = value
                    out[cell + "bytes_per_vector"] = float(bytes_per_vector(dim, precision))
        return out

    def _kind(self) -> str:
        return self._kinds_seen[0] if self._kinds_seen else self.label_kind

    def _compute(self, emb: Tensor, labels: Tensor, roles: Tensor) -> dict[str, float]:
        split = bool((roles != ROLE_CODES["both"]).any())
        query_mask = (roles & 1).bool()
        reference_mask = (roles & 2).bool()
        if split and not bool(query_mask.any()):
            raise ValueError("RetrievalMetrics got reference items but no query items")
        if split and not bool(reference_mask.any()):
            raise ValueError("RetrievalMetrics got query items but no reference items")
        if (
            split
            and not bool((query_mask & reference_mask).any())
            and repeats_queries(
                emb[query_mask],
                emb[reference_mask],
                labels[query_mask],
                labels[reference_mask],
                ("query embeddings", "reference embeddings"),
            )
        ):
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
            query_mask = reference_mask = torch.ones(len(labels), dtype=torch.bool)
        candidates = num_candidates(
            int(reference_mask.sum()), exclusion(query_mask, reference_mask)
        )
        num_queries = int(query_mask.sum())
        if candidates < 1:
            warnings.warn(
                f"only {int(reference_mask.sum())} item(s) to search: retrieval metrics "
                "are unavailable (not reported)",
                UserWarning,
                stacklevel=3,
            )
            return {"unscorable_queries": float(num_queries)}
        ks = clamp_k(self.k, candidates, stacklevel=4)
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
            label_kind=self._kind(),  # type: ignore[arg-type]
            level_names=self.level_names,
        )
        out = _requested(result, ks, ("recall", "precision"))
        if self.rerank is not None:
            out.update(self._reranked(emb, labels, query_mask, reference_mask, split, ks))
        if self.dims is not None or self.precisions is not None:
            masks = (query_mask, reference_mask) if split else (None, None)
            out.update(self._grid(emb, labels, masks, ks))
        return out

    def _grid(
        self,
        emb: Tensor,
        labels: Tensor,
        masks: tuple[Tensor | None, Tensor | None],
        ks: dict[int, int],
    ) -> dict[str, float]:
        """Every prefix x precision cell, as ``d<dim>/<precision>/<name>``."""
        out: dict[str, float] = {}
        for dim in self.dims or (emb.shape[1],):
            for precision in self.precisions or ("float32",):
                result = retrieval_metrics(
                    emb,
                    labels,
                    tuple(sorted(set(ks.values()))),
                    query_mask=masks[0],
                    reference_mask=masks[1],
                    metric=self.metric,
                    map_at_r=self.map_at_r,
                    mrr=self.mrr,
                    precision=self.precision,
                    average=self.average,  # type: ignore[arg-type]
                    fast=self.fast,
                    label_kind=self._kind(),  # type: ignore[arg-type]
                    level_names=self.level_names,
                    dim=dim,
                    quantization=precision,
                    rescore_multiplier=self.rescore_multiplier,
                )
                cell = f"d{dim}/{precision}/"
                for name, value in _requested(result, ks, ("recall", "precision")).items():
                    if not name.startswith("unscorable_queries"):
                        out[cell + name] = value
                out[cell + "bytes_per_vector"] = float(bytes_per_vector(dim, precision))
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
            exclude = exclusion(query_mask, reference_mask)
            dist = self.rerank(x[query_mask], x[reference_mask], self.metric)
            qlab, rlab = labels[query_mask], labels[reference_mask]
        else:
            exclude = torch.arange(x.shape[0], device=x.device)
            dist = self.rerank(x, None, self.metric)
            qlab = rlab = labels
        # Checked here to name the re-ranker (a user's may return NaN or the wrong shape).
        dist = check_reranked(dist, len(qlab), len(rlab), f"the re-ranker {self.rerank!r}")
        result = ranking_metrics(
            dist,
            qlab,
            rlab,
            tuple(sorted(set(ks.values()))),
            exclude=exclude.cpu(),
            label_kind=self._kind(),  # type: ignore[arg-type]
            level_names=self.level_names,
        )
        wanted = {
            name: value
            for name, value in result.items()
            if not name.startswith("mrr") or self.mrr
            if not name.startswith(("map@r", "r_precision")) or self.map_at_r
        }
        picked = _requested(wanted, ks, ("recall",))
        return {
            f"rerank/{name}": value
            for name, value in picked.items()
            if not name.startswith("unscorable_queries")
        }


_NOT_SHARDABLE = (
    ("rerank", "re-ranking needs the whole query x reference distance matrix"),
    ("clustering", "the k-means clustering runs over every query"),
)


def _check_shardable(m: RetrievalMetrics) -> None:
    """The options a sharded reference cannot serve, refused at construction."""
    for name, why in _NOT_SHARDABLE:
        if getattr(m, name):
            raise ValueError(
                f"RetrievalMetrics(shard_reference=True) cannot use `{name}`: {why}; set "
                f"{name}={'None' if name == 'rerank' else 'False'} or shard_reference=False"
            )
    if m.label_kind in ("multi_label", "hierarchical") or m.level_names is not None:
        raise ValueError(
            f"RetrievalMetrics(shard_reference=True) takes single class ids, got "
            f"label_kind={m.label_kind!r}"
            + (f", level_names={m.level_names}" if m.level_names is not None else "")
            + ": use shard_reference=False for multi-label or hierarchical labels"
        )
    if m.precisions is not None and "binary_rescore" in m.precisions:
        raise ValueError(
            "RetrievalMetrics(shard_reference=True) cannot use precision 'binary_rescore' "
            "(it re-scores candidates with float vectors held by other ranks): use "
            "'binary' or shard_reference=False"
        )


def _requested(
    result: dict[str, float], ks: dict[int, int], prefixes: tuple[str, ...]
) -> dict[str, float]:
    """``result`` under the requested ``k`` (clamped ones reported at the ``k`` asked for),
    in the order: per-k metrics by prefix, then the rest."""
    out: dict[str, float] = {}
    suffixes = sorted({name[name.index("/") :] if "/" in name else "" for name in result})
    for suffix in suffixes:
        for k, used in ks.items():
            for prefix in prefixes:
                if f"{prefix}@{used}{suffix}" in result:
                    out[f"{prefix}@{k}{suffix}"] = result[f"{prefix}@{used}{suffix}"]
    out.update({n: v for n, v in result.items() if "@" not in n or n.startswith("map@r")})
    return out
