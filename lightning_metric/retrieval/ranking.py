"""Ranking metrics of embeddings and labels: search, then score every query.

Definitions (DESIGN.md), "relevant" as decided by :mod:`~.relevance` (same label, a shared
label of multi-label items, or the same class at each level of a hierarchy):

- ``recall@k``: fraction of queries with at least one relevant item among their ``k``
  nearest neighbours, the query itself excluded (= CMC@k = hit rate).
- ``precision@k``: mean fraction of relevant items among the ``k`` nearest neighbours.
- ``map@r`` and ``r_precision``: as in "A Metric Learning Reality Check" (Musgrave et al.,
  2020); ``R`` is the number of relevant references other than the query itself.
- ``mrr``: mean reciprocal rank of the first relevant neighbour within the ``R_max``
  nearest (``R_max`` = largest ``R`` over queries), 0 when there is none. This is the depth
  PML's ``AccuracyCalculator(k="max_bin_count")`` uses.
- ``unscorable_queries``: queries with ``R == 0`` (no relevant item in the reference set).
  They are left out of every mean above.

Which rows query, which are searched and what a query may not retrieve is decided by
:mod:`~.protocol`; each value is computed by one function of :mod:`~.functional`, composed in
:func:`match_values`. :func:`retrieval_metrics` averages the per-query values over queries
or classes, :func:`retrieval_metrics_per_class` reports them per class; both run one pipeline
(:func:`_scored`). :func:`neighbour_list_metrics` scores neighbour lists found elsewhere (an
approximate :class:`~lightning_metric.retrieval.EmbeddingIndex`), :func:`ranked_metrics`
rankings found elsewhere (re-ranking). Verification and clustering metrics live in
:mod:`~lightning_metric.retrieval.verification` and :mod:`~lightning_metric.retrieval.clustering`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import (
    check_choice,
    check_int,
    check_k,
    check_labels,
    check_metric,
    check_top_k,
)
from lightning_metric.retrieval import functional as F
from lightning_metric.retrieval.clustering import clustering_metrics
from lightning_metric.retrieval.knn import (
    Similarity,
    as_tensor,
    check_embeddings,
    check_reference,
    prepare,
    search_prepared,
    single_threaded_bookkeeping,
)
from lightning_metric.retrieval.protocol import (
    check_mask,
    exclusion,
    num_candidates,
    repeats_queries,
)
from lightning_metric.retrieval.quantization import (
    PRECISIONS,
    EncodedReference,
    Precision,
    encode_reference,
    prefix,
)
from lightning_metric.retrieval.relevance import (
    LabelKind,
    Level,
    build_levels,
    label_kind_of,
    normalize_labels,
    pad_multi_hot,
)

__all__ = ["neighbour_list_metrics", "retrieval_metrics", "retrieval_metrics_per_class"]

Average = Literal["micro", "macro"]
# Neighbour-label entries held at once while scoring (bounds memory for large classes).
_SCORE_BLOCK_ELEMENTS = 1 << 22
# Queries searched at once at most: one FAISS call (knn._FAISS_CHUNK) per block.
_FAISS_QUERIES = 1 << 16


@dataclass
class _Protocol:
    """Which items query and which are searched (see :func:`retrieval_metrics`)."""

    reference_embeddings: Tensor | np.ndarray | None
    reference_labels: Any
    query_mask: Tensor | np.ndarray | None
    reference_mask: Tensor | np.ndarray | None


@dataclass
class Scoring:
    """What is computed per query, and how the neighbours are searched."""

    metric: Similarity
    map_at_r: bool
    mrr: bool
    precision: bool
    chunk_size: int | None
    fast: bool | None
    label_kind: LabelKind = "auto"
    level_names: Sequence[str] | None = None
    dim: int | None = None  # Matryoshka prefix searched (None: the whole embedding)
    quantization: Precision = "float32"  # how the reference rows are coded and searched
    rescore_multiplier: int = 4


@dataclass
class _Setup:
    query: Tensor  # prepared [Q, D]
    reference: Tensor  # prepared [R, D]
    levels: list[Level]  # relevance of the references to the queries, per evaluated level
    exclude: Tensor | None  # [Q] reference row of the query itself, -1 if absent
    num_candidates: int  # smallest number of reference rows any query can retrieve
    encoded: EncodedReference | None = None  # the coded reference, None for float32


def _setup(embeddings: Tensor | np.ndarray, labels: Any, p: _Protocol, o: Scoring) -> _Setup:
    """The protocol (:mod:`~.protocol`) applied to the inputs: query and reference rows,
    exclusions, and the relevance of every level."""
    metric = o.metric
    check_metric(metric)
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    kind = label_kind_of(labels, o.label_kind)
    lab = normalize_labels(labels, kind, emb.shape[0]).to(emb.device)
    split = p.reference_embeddings is not None or p.reference_labels is not None
    masked = p.query_mask is not None or p.reference_mask is not None
    if split and masked:
        raise ValueError(
            "pass either reference_embeddings/reference_labels or query_mask/reference_mask, "
            "not both"
        )
    if split:
        if p.reference_embeddings is None or p.reference_labels is None:
            raise ValueError("reference_embeddings and reference_labels must be given together")
        ref = check_reference(emb, p.reference_embeddings, "embeddings", "reference_embeddings")
        ref_kind = label_kind_of(p.reference_labels, o.label_kind, "reference_labels")
        if ref_kind != kind:
            raise ValueError(f"`labels` are {kind} labels but `reference_labels` are {ref_kind}")
        rlab = normalize_labels(p.reference_labels, kind, ref.shape[0], "reference_labels")
        rlab = rlab.to(emb.device)
        if kind == "multi_label":
            lab, rlab = pad_multi_hot(lab, rlab)
        if repeats_queries(emb, ref, lab, rlab):
            _warn_same_inputs()
            split = False  # searched leave-one-out below
    if o.dim is not None:
        emb = prefix(emb, o.dim)
        if split:
            ref = prefix(ref, o.dim)
    exclude: Tensor | None
    if split:
        q, r, qlab = prepare(emb, metric), prepare(ref, metric), lab
        exclude, candidates = None, ref.shape[0]
    elif masked:
        n = emb.shape[0]
        qm = check_mask(p.query_mask, n, "query_mask") if p.query_mask is not None else None
        rm = (
            check_mask(p.reference_mask, n, "reference_mask")
            if p.reference_mask is not None
            else None
        )
        qm = torch.ones(n, dtype=torch.bool) if qm is None else qm
        rm = torch.ones(n, dtype=torch.bool) if rm is None else rm
        qm, rm = qm.to(emb.device), rm.to(emb.device)
        full = prepare(emb, metric)
        q, r, qlab, rlab = full[qm], full[rm], lab[qm], lab[rm]
        exclude = exclusion(qm, rm)
        candidates = num_candidates(r.shape[0], exclude)
    else:
        q = r = prepare(emb, metric)
        qlab = rlab = lab
        exclude = torch.arange(q.shape[0], device=q.device)
        candidates = q.shape[0] - 1
    levels = build_levels(kind, qlab, rlab, o.level_names)
    # Codes (and int8 ranges) come from the reference rows only, never from the queries.
    encoded = None
    if o.quantization != "float32":
        encoded = encode_reference(r, o.quantization, metric, o.rescore_multiplier)
    return _Setup(q, r, levels, exclude, candidates, encoded)


def _warn_same_inputs() -> None:
    # Each query would retrieve itself at rank 1 and score recall 1.0.
    warnings.warn(
        "the reference set is the query set (same embeddings and labels): each query's own "
        "row is excluded, as in leave-one-out (omit reference_embeddings to silence this)",
        UserWarning,
        stacklevel=6,
    )


@dataclass
class PerQuery:
    labels: Tensor | None  # class id of every scorable query (single labels), for averages
    values: dict[str, Tensor]  # metric name -> float64 [num_scorable]
    num_queries: int
    num_unscorable: int
    suffix: str = ""  # the level's key suffix


def _score(s: _Setup, ks: tuple[int, ...], o: Scoring) -> list[PerQuery]:
    """Per-query values of every level; the neighbours are searched once for all levels."""
    if o.chunk_size is not None:
        check_int("chunk_size", o.chunk_size, minimum=1)
    if s.num_candidates < 1:
        raise ValueError(
            f"there is only {s.reference.shape[0]} item to search and a query never retrieves "
            "itself: retrieval metrics need at least 2 items"
        )
    check_top_k(ks[-1], s.num_candidates)
    nq = s.query.shape[0]
    r_counts = [level.counts(s.exclude) for level in s.levels]
    scorable = [(r > 0).nonzero()[:, 0] for r in r_counts]
    results = [
        PerQuery(None if lv.multi else lv.query[sc], {}, nq, nq - sc.numel(), lv.name)
        for lv, sc in zip(s.levels, scorable, strict=True)
    ]
    if len(s.levels) == 1:
        searched = scorable[0]
    else:
        searched = torch.stack([r > 0 for r in r_counts]).any(0).nonzero()[:, 0]
    if searched.numel() == 0:
        return results
    r_max = [
        int(r[sc].max()) if sc.numel() else 0 for r, sc in zip(r_counts, scorable, strict=True)
    ]
    depth = max(ks[-1], max(r_max) if (o.map_at_r or o.mrr) else 0)
    width = max(lv.query.shape[1] if lv.multi else 1 for lv in s.levels)
    chunk = o.chunk_size or max(1, min(_FAISS_QUERIES, _SCORE_BLOCK_ELEMENTS // (depth * width)))
    # Position of each query among its level's scorable queries.
    position = [torch.cumsum(r > 0, 0) - 1 for r in r_counts]
    for start in range(0, searched.numel(), chunk):
        rows = searched[start : start + chunk]
        ex = s.exclude[rows] if s.exclude is not None else None
        if s.encoded is None:
            nn = search_prepared(s.query[rows], s.reference, depth, o.metric, ex, None, o.fast)
        else:
            nn = s.encoded.search(s.query[rows], depth, ex)
        for level, r, pos, rm, res in zip(
            s.levels, r_counts, position, r_max, results, strict=True
        ):
            keep = None if len(s.levels) == 1 else (r[rows] > 0).nonzero()[:, 0]
            sub, neighbours = (rows, nn.indices) if keep is None else (rows[keep], nn.indices[keep])
            if sub.numel() == 0:
                continue
            match = level.matrix(sub, neighbours)
            values = match_values(match, r[sub], ks, o, rm)
            total = res.num_queries - res.num_unscorable
            for name, v in values.items():
                if name not in res.values:
                    res.values[name] = torch.empty(total, dtype=torch.float64, device=v.device)
                res.values[name][pos[sub]] = v
    return results


def match_values(
    match: Tensor, r_count: Tensor, ks: tuple[int, ...], o: Scoring, r_max: int
) -> dict[str, Tensor]:
    """Per-query metrics of ranked lists: ``match [Q, depth]`` says which neighbours are
    relevant to the query, ``r_count [Q]`` is each query's ``R`` (its relevant references).
    In-memory search, re-ranked distances and given neighbour lists all end here, in the
    per-metric functions of :mod:`~.functional`."""
    out: dict[str, Tensor] = {}
    for k in ks:
        out[f"recall@{k}"] = F.recall_at_k(match, k)
    if o.precision:
        for k in ks:
            out[f"precision@{k}"] = F.precision_at_k(match, k)
    if o.map_at_r:
        out["map@r"] = F.map_at_r(match, r_count)
        out["r_precision"] = F.r_precision(match, r_count)
    if o.mrr:
        out["mrr"] = F.mrr(match[:, :r_max])
    return out


def retrieval_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Any,
    k: int | Sequence[int] = (1, 2, 4, 8),
    *,
    reference_embeddings: Tensor | np.ndarray | None = None,
    reference_labels: Any = None,
    query_mask: Tensor | np.ndarray | None = None,
    reference_mask: Tensor | np.ndarray | None = None,
    metric: Similarity = "cosine",
    map_at_r: bool = True,
    mrr: bool = True,
    precision: bool = True,
    clustering: bool = False,
    average: Average = "micro",
    chunk_size: int | None = None,
    fast: bool | None = None,
    seed: int = 0,
    label_kind: LabelKind = "auto",
    level_names: Sequence[str] | None = None,
    dim: int | None = None,
    quantization: Precision = "float32",
    rescore_multiplier: int = 4,
) -> dict[str, float]:
    """Retrieval metrics of ``embeddings`` with class ``labels``.

    By default every item queries all the others (leave-one-out). For a query/reference
    (InShop, re-ID gallery) protocol pass either ``reference_embeddings`` +
    ``reference_labels`` (disjoint sets) or boolean ``query_mask`` / ``reference_mask`` over
    ``embeddings`` (an item in both sets never retrieves itself). The rules are those of
    :mod:`~lightning_metric.retrieval.protocol`.

    Args:
        labels: ``[N]`` class ids; or multi-label items (a multi-hot ``[N, L]`` matrix or a
            list of label lists: relevant when they share a label); or hierarchical
            ``[N, levels]`` ids, coarse to fine (metrics per level). See
            :mod:`~lightning_metric.retrieval.relevance`.
        k: the cut-offs for ``recall@k`` and ``precision@k``.
        metric: ``"cosine"``, ``"ip"`` (inner product) or ``"l2"``.
        map_at_r: compute ``map@r`` and ``r_precision`` (searches ``R_max`` neighbours).
        mrr: compute ``mrr`` (also searches ``R_max`` neighbours).
        precision: compute ``precision@k``.
        clustering: also compute ``nmi`` and ``ami`` of a FAISS k-means clustering of the
            queries (one cluster per class) against the labels; costs an extra k-means.
        average: ``"micro"`` averages over scorable queries, ``"macro"`` first averages
            within each class, then over classes (single or hierarchical labels).
        chunk_size: queries scored at once (default bounds memory automatically).
        fast: see :func:`lightning_metric.retrieval.knn`.
        seed: k-means seed for ``clustering``.
        label_kind: ``"auto"`` (1-D: single, bool matrix or list of lists: multi-label),
            ``"single"``, ``"multi_label"`` or ``"hierarchical"``; a 2-D integer matrix
            needs one of the last two.
        level_names: names of the hierarchical levels in the result keys (default
            ``level0``, ``level1``, ...).
        dim: score the Matryoshka prefix of this size (the first ``dim`` coordinates,
            L2-normalised, :func:`~.quantization.prefix`) instead of the whole embedding.
        quantization: how the reference rows are stored and searched
            (:mod:`~lightning_metric.retrieval.quantization`): ``"float32"`` (as they are),
            ``"int8"`` (codes with ranges calibrated on the reference rows, searched by the
            float query against the decoded codes), ``"binary"`` (sign bits, Hamming
            distance) or ``"binary_rescore"`` (``rescore_multiplier`` x the searched depth
            of binary candidates re-ranked by the float vectors). Every search is exact for
            its codes; ``cosine`` compares the decoded vectors by inner product.
        rescore_multiplier: candidates per kept neighbour for ``"binary_rescore"``.

    Returns:
        ``{"recall@1": ..., "precision@1": ..., "map@r": ..., "r_precision": ..., "mrr": ...,
        "unscorable_queries": ...}`` as floats; hierarchical labels give every key once per
        level, suffixed: ``"recall@1/level0"``, ``"map@r/level1"``, ... If no query can be
        scored, only ``unscorable_queries`` (and ``nmi``/``ami``) are returned and a warning
        is issued: the ranking metrics are unavailable, not 0.

    Example: two classes; the last item of class 1 lies among the class-0 items, so its
    nearest neighbour has another label and 3 of the 4 queries hit at rank 1:

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
    >>> result = retrieval_metrics(x, torch.tensor([0, 0, 1, 1]), k=1)
    >>> result["recall@1"], result["unscorable_queries"]
    (0.75, 0.0)

    Hierarchical labels (category, then product), the same points: every item has another
    item of its category, but products 2 and 3 are singletons:

    >>> levels = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]])
    >>> result = retrieval_metrics(x, levels, k=1, label_kind="hierarchical",
    ...                            level_names=["category", "product"])
    >>> result["recall@1/category"], result["unscorable_queries/product"]
    (0.75, 4.0)
    """
    check_choice("average", average, ("micro", "macro"))
    check_choice("quantization", quantization, PRECISIONS)
    check_int("rescore_multiplier", rescore_multiplier, minimum=1)
    if dim is not None:
        check_int("dim", dim, minimum=1)
    protocol = _Protocol(reference_embeddings, reference_labels, query_mask, reference_mask)
    scoring = Scoring(metric, map_at_r, mrr, precision, chunk_size, fast, label_kind, level_names)
    scoring.dim, scoring.quantization = dim, quantization
    scoring.rescore_multiplier = rescore_multiplier
    s, per_level = _scored(embeddings, labels, k, protocol, scoring, average)
    out: dict[str, float] = {}
    for pq in per_level:
        out.update(averaged(pq, average))
    if clustering:
        for level in s.levels:
            values = clustering_metrics(s.query, level.group(), seed)
            out.update({f"{name}{level.name}": v for name, v in values.items()})
    return out


def averaged(pq: PerQuery, average: Average) -> dict[str, float]:
    out: dict[str, float] = {}
    if pq.num_unscorable < pq.num_queries:
        for name, values in pq.values.items():
            if average == "micro":
                out[name + pq.suffix] = float(values.mean())
            else:
                assert pq.labels is not None
                out[name + pq.suffix] = float(_class_means(values, pq.labels)[1].mean())
    out["unscorable_queries" + pq.suffix] = float(pq.num_unscorable)
    return out


def neighbour_list_metrics(
    neighbour_labels: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray,
    relevant_counts: Tensor | np.ndarray,
    k: int | Sequence[int] = (1, 2, 4, 8),
    *,
    map_at_r: bool = True,
    mrr: bool = True,
    precision: bool = True,
    average: Average = "micro",
) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` for neighbour lists found by someone else
    (an approximate index, an external search engine), with the same definitions.

    Args:
        neighbour_labels: ``[Q, L]`` integer label of each query's neighbours, nearest first,
            the query itself left out; ``-1`` where there is no neighbour (an approximate
            index that found fewer than ``L``) or its label is unknown: never relevant.
        query_labels: ``[Q]`` labels, ``>= 0``.
        relevant_counts: ``[Q]`` ``R`` of each query: how many references share its label
            (itself not counted), whether or not the search found them. Queries with
            ``R == 0`` are unscorable, as in :func:`retrieval_metrics`.
        k, map_at_r, mrr, precision, average: as in :func:`retrieval_metrics`.

    ``L`` must reach ``max(k)`` and, for ``map@r`` / ``mrr``, the largest ``R`` of a
    scorable query: a shorter list would count the unsearched ranks as misses.

    Example: the first query finds one of its two same-label items first and the other third;
    the second finds nothing (``-1``) where its one relevant item should have been:

    >>> import torch
    >>> lists = torch.tensor([[4, 7, 4], [-1, -1, -1]])
    >>> m = neighbour_list_metrics(lists, torch.tensor([4, 2]), torch.tensor([2, 1]), k=(1, 2))
    >>> m["recall@1"], m["recall@2"], m["map@r"], m["precision@2"]
    (0.5, 0.5, 0.25, 0.25)
    """
    check_choice("average", average, ("micro", "macro"))
    ks = check_k(k)
    lists = as_tensor(neighbour_labels, "neighbour_labels")
    if lists.ndim != 2 or lists.is_floating_point() or lists.dtype == torch.bool:
        raise ValueError(
            f"`neighbour_labels` must be an integer [num_queries, L] array, got dtype "
            f"{lists.dtype} and shape {tuple(lists.shape)}"
        )
    qlab = check_labels("query_labels", query_labels, length=lists.shape[0])
    if qlab.numel() and int(qlab.min()) < 0:
        raise ValueError(
            f"`query_labels` must be >= 0 (a query of unknown class cannot be scored), got "
            f"{int(qlab.min())}; leave such queries out"
        )
    r_count = check_labels("relevant_counts", relevant_counts, length=lists.shape[0])
    if r_count.numel() and int(r_count.min()) < 0:
        raise ValueError(f"`relevant_counts` must be >= 0, got {int(r_count.min())}")
    o = Scoring("cosine", map_at_r, mrr, precision, None, None)
    scorable = (r_count > 0).nonzero()[:, 0]
    nq = lists.shape[0]
    pq = PerQuery(qlab[scorable], {}, nq, nq - scorable.numel())
    if scorable.numel():
        r_max = int(r_count[scorable].max())
        need = max(ks[-1], r_max if (map_at_r or mrr) else 0)
        if lists.shape[1] < need:
            raise ValueError(
                f"`neighbour_labels` holds {lists.shape[1]} neighbours per query, but "
                f"{need} are needed (max k = {ks[-1]}"
                + (f", largest R = {r_max} for map@r / mrr" if map_at_r or mrr else "")
                + "): search deeper"
            )
        lists = lists[scorable, :need].to(torch.int64)
        match = (lists == qlab[scorable][:, None]) & (lists >= 0)
        pq.values = match_values(match, r_count[scorable], ks, o, r_max)
    else:
        warn_unscorable(nq)
    return averaged(pq, average)


def ranked_metrics(
    neighbours: Tensor,
    levels: list[Level],
    exclude: Tensor | None,
    ks: tuple[int, ...],
    o: Scoring,
) -> dict[str, float]:
    """Micro-averaged metrics of full rankings ``neighbours [Q, depth]`` (reference rows,
    nearest first, each query's excluded row already left out) found by any means (the
    re-rankers' distances), on the relevance ``levels`` of :mod:`~.relevance`."""
    out: dict[str, float] = {}
    rows = torch.arange(neighbours.shape[0], device=neighbours.device)
    for level in levels:
        r = level.counts(exclude)
        scorable = r > 0
        nq = neighbours.shape[0]
        pq = PerQuery(None, {}, nq, nq - int(scorable.sum()), level.name)
        if bool(scorable.any()):
            match = level.matrix(rows[scorable], neighbours[scorable])
            r_max = int(r[scorable].max())
            pq.values = match_values(match, r[scorable], ks, o, r_max)
        out.update(averaged(pq, "micro"))
    return out


def _scored(
    embeddings: Any,
    labels: Any,
    k: Any,
    protocol: _Protocol,
    scoring: Scoring,
    average: Average = "micro",
) -> tuple[_Setup, list[PerQuery]]:
    """The pipeline of both public functions: check, search, score every query."""
    ks = check_k(k)
    with single_threaded_bookkeeping():
        s = _setup(embeddings, labels, protocol, scoring)
        if average == "macro":
            for level in s.levels:
                level.group()  # raises for multi-label items
        per_level = _score(s, ks, scoring)
    for pq in per_level:
        if pq.num_unscorable == pq.num_queries:
            warn_unscorable(pq.num_queries, pq.suffix)
    return s, per_level


def warn_unscorable(n: int, level: str = "") -> None:
    where = f" at level {level[1:]!r}" if level else ""
    warnings.warn(
        f"none of the {n} queries has another item of its class in the reference set{where}, "
        "so recall@k, precision@k, map@r, r_precision and mrr are unavailable (not reported)",
        UserWarning,
        stacklevel=4,
    )


def _class_means(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    present, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(present), dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=len(present)).double()
    return present, sums / counts


def retrieval_metrics_per_class(
    embeddings: Tensor | np.ndarray,
    labels: Any,
    k: int | Sequence[int] = (1, 2, 4, 8),
    *,
    reference_embeddings: Tensor | np.ndarray | None = None,
    reference_labels: Any = None,
    query_mask: Tensor | np.ndarray | None = None,
    reference_mask: Tensor | np.ndarray | None = None,
    metric: Similarity = "cosine",
    map_at_r: bool = True,
    mrr: bool = True,
    precision: bool = True,
    chunk_size: int | None = None,
    fast: bool | None = None,
    label_kind: LabelKind = "auto",
    level_names: Sequence[str] | None = None,
) -> dict[str, dict[int, float]]:
    """Like :func:`retrieval_metrics`, but averaged within each query class.

    Returns ``{metric_name: {label: value}}``; classes whose queries are all unscorable are
    absent, and ``"unscorable_queries"`` maps each label to its count of unscorable queries.
    Hierarchical labels suffix the names per level (``"recall@1/level0"``); multi-label
    items have no single class and are refused.
    """
    protocol = _Protocol(reference_embeddings, reference_labels, query_mask, reference_mask)
    scoring = Scoring(metric, map_at_r, mrr, precision, chunk_size, fast, label_kind, level_names)
    s, per_level = _scored(embeddings, labels, k, protocol, scoring, "macro")
    out: dict[str, dict[int, float]] = {}
    for level, pq in zip(s.levels, per_level, strict=True):
        assert pq.labels is not None and level.classes is not None
        for name, values in pq.values.items():
            present, means = _class_means(values, pq.labels)
            names = level.classes[present].tolist()
            out[name + pq.suffix] = dict(zip(names, means.tolist(), strict=True))
        all_q = torch.bincount(level.query, minlength=len(level.classes))
        scored = torch.bincount(pq.labels, minlength=len(level.classes))
        seen = (all_q > 0).nonzero()[:, 0]
        out["unscorable_queries" + pq.suffix] = {
            int(level.classes[c]): float(all_q[c] - scored[c]) for c in seen.tolist()
        }
    return out
