"""Ranking metrics of embeddings as pure functions of embeddings and labels.

Definitions (DESIGN.md):

- ``recall@k``: fraction of queries with at least one same-label item among their ``k``
  nearest neighbours, the query itself excluded (= CMC@k = hit rate).
- ``precision@k``: mean fraction of same-label items among the ``k`` nearest neighbours.
- ``map@r`` and ``r_precision``: as in "A Metric Learning Reality Check" (Musgrave et al.,
  2020); ``R`` is the number of other same-label items in the reference set.
- ``mrr``: mean reciprocal rank of the first same-label neighbour within the ``R_max``
  nearest (``R_max`` = largest ``R`` over queries), 0 when there is none. This is the depth
  PML's ``AccuracyCalculator(k="max_bin_count")`` uses.
- ``unscorable_queries``: queries with ``R == 0`` (no other item of their class in the
  reference set). They are left out of every mean above.

:func:`retrieval_metrics` averages the per-query values over queries or classes,
:func:`retrieval_metrics_per_class` reports them per class; both run one pipeline
(:func:`_scored`). :func:`neighbour_list_metrics` scores neighbour lists found elsewhere (an
approximate :class:`~lightning_metric.retrieval.EmbeddingIndex`); all three compute the values
in :func:`_match_values`. Verification and clustering metrics live in
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
from lightning_metric.retrieval.clustering import clustering_metrics
from lightning_metric.retrieval.knn import (
    Metric,
    as_tensor,
    check_embeddings,
    check_reference,
    prepare,
    same_rows,
    search_prepared,
    single_threaded_bookkeeping,
)

__all__ = ["neighbour_list_metrics", "retrieval_metrics", "retrieval_metrics_per_class"]

Average = Literal["micro", "macro"]
# Neighbour-label entries held at once while scoring (bounds memory for large classes).
_SCORE_BLOCK_ELEMENTS = 1 << 22


@dataclass
class _Protocol:
    """Which items query and which are searched (see :func:`retrieval_metrics`)."""

    reference_embeddings: Tensor | np.ndarray | None
    reference_labels: Tensor | np.ndarray | None
    query_mask: Tensor | np.ndarray | None
    reference_mask: Tensor | np.ndarray | None


@dataclass
class _Scoring:
    """What is computed per query, and how the neighbours are searched."""

    metric: Metric
    map_at_r: bool
    mrr: bool
    precision: bool
    chunk_size: int | None
    fast: bool | None


def _check_mask(mask: Tensor | np.ndarray, n: int, name: str) -> Tensor:
    m = as_tensor(mask, name)
    if m.dtype != torch.bool or m.shape != (n,):
        raise ValueError(
            f"`{name}` must be a bool tensor of shape [{n}], got dtype {m.dtype} "
            f"and shape {tuple(m.shape)}"
        )
    if not bool(m.any()):
        raise ValueError(f"`{name}` selects no items: nothing to evaluate")
    return m


@dataclass
class _Setup:
    query: Tensor  # prepared [Q, D]
    reference: Tensor  # prepared [R, D]
    query_labels: Tensor  # contiguous class ids [Q]
    reference_labels: Tensor  # contiguous class ids [R]
    classes: Tensor  # original label value of each contiguous id
    exclude: Tensor | None  # [Q] reference row of the query itself, -1 if absent
    num_candidates: int  # smallest number of reference rows any query can retrieve


def _setup(
    embeddings: Tensor | np.ndarray, labels: Tensor | np.ndarray, p: _Protocol, metric: Metric
) -> _Setup:
    check_metric(metric)
    reference_embeddings, reference_labels = p.reference_embeddings, p.reference_labels
    query_mask, reference_mask = p.query_mask, p.reference_mask
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    lab = check_labels("labels", labels, length=emb.shape[0]).to(emb.device)
    split = reference_embeddings is not None or reference_labels is not None
    masked = query_mask is not None or reference_mask is not None
    if split and masked:
        raise ValueError(
            "pass either reference_embeddings/reference_labels or query_mask/reference_mask, "
            "not both"
        )
    if split:
        if reference_embeddings is None or reference_labels is None:
            raise ValueError("reference_embeddings and reference_labels must be given together")
        ref = check_reference(emb, reference_embeddings, "embeddings", "reference_embeddings")
        rlab = check_labels("reference_labels", reference_labels, length=ref.shape[0])
        rlab = rlab.to(emb.device)
        if same_rows(emb, ref):
            _same_inputs(lab, rlab)
            split = False  # searched leave-one-out below
    exclude: Tensor | None
    if split:
        q, r, qlab = prepare(emb, metric), prepare(ref, metric), lab
        exclude, num_candidates = None, ref.shape[0]
    elif masked:
        n = emb.shape[0]
        qm = _check_mask(query_mask, n, "query_mask") if query_mask is not None else None
        rm = (
            _check_mask(reference_mask, n, "reference_mask") if reference_mask is not None else None
        )
        qm = torch.ones(n, dtype=torch.bool) if qm is None else qm
        rm = torch.ones(n, dtype=torch.bool) if rm is None else rm
        qm, rm = qm.to(emb.device), rm.to(emb.device)
        full = prepare(emb, metric)
        q, r, qlab, rlab = full[qm], full[rm], lab[qm], lab[rm]
        position = torch.cumsum(rm.long(), 0) - 1
        exclude = torch.where(rm, position, torch.full_like(position, -1))[qm]
        num_candidates = r.shape[0] - (1 if bool((exclude >= 0).any()) else 0)
    else:
        q = r = prepare(emb, metric)
        qlab = rlab = lab
        exclude = torch.arange(q.shape[0], device=q.device)
        num_candidates = q.shape[0] - 1
    classes, inverse = torch.unique(torch.cat([qlab, rlab]), return_inverse=True)
    return _Setup(
        q, r, inverse[: len(qlab)], inverse[len(qlab) :], classes, exclude, num_candidates
    )


def _same_inputs(labels: Tensor, reference_labels: Tensor) -> None:
    """The reference set is the query set passed twice: say so, search it leave-one-out."""
    if not torch.equal(labels, reference_labels):
        raise ValueError(
            "`reference_embeddings` holds the same rows as `embeddings` but "
            "`reference_labels` differ from `labels`: pass one set with its labels for "
            "leave-one-out, or the real reference set"
        )
    # Each query would retrieve itself at rank 1 and score recall 1.0.
    warnings.warn(
        "the reference set is the query set (same embeddings and labels): each query's own "
        "row is excluded, as in leave-one-out (omit reference_embeddings to silence this)",
        UserWarning,
        stacklevel=5,
    )


@dataclass
class _PerQuery:
    labels: Tensor  # contiguous class id of every scorable query
    values: dict[str, Tensor]  # metric name -> float64 [num_scorable]
    num_queries: int
    num_unscorable: int


def _score(s: _Setup, ks: tuple[int, ...], o: _Scoring) -> _PerQuery:
    if o.chunk_size is not None:
        check_int("chunk_size", o.chunk_size, minimum=1)
    if s.num_candidates < 1:
        raise ValueError(
            f"there is only {s.reference.shape[0]} item to search and a query never retrieves "
            "itself: retrieval metrics need at least 2 items"
        )
    check_top_k(ks[-1], s.num_candidates)
    map_at_r, mrr = o.map_at_r, o.mrr
    counts = torch.bincount(s.reference_labels, minlength=len(s.classes))
    r_count = counts[s.query_labels]
    if s.exclude is not None:
        r_count = r_count - (s.exclude >= 0).long()
    scorable = (r_count > 0).nonzero()[:, 0]
    nq = s.query.shape[0]
    result = _PerQuery(s.query_labels[scorable], {}, nq, nq - scorable.numel())
    if scorable.numel() == 0:
        return result
    r_count = r_count[scorable]
    r_max = int(r_count.max())
    depth = max(ks[-1], r_max if (map_at_r or mrr) else 0)
    chunk = o.chunk_size or max(1, min(16384, _SCORE_BLOCK_ELEMENTS // depth))
    out: dict[str, Tensor] = {}
    for start in range(0, scorable.numel(), chunk):
        sl = slice(start, min(start + chunk, scorable.numel()))
        rows = scorable[sl]
        ex = s.exclude[rows] if s.exclude is not None else None
        nn = search_prepared(s.query[rows], s.reference, depth, o.metric, ex, None, o.fast)
        match = s.reference_labels[nn.indices] == s.query_labels[rows][:, None]
        values = _match_values(match, r_count[sl], ks, o, r_max)
        for name, v in values.items():
            if name not in out:
                out[name] = torch.empty(scorable.numel(), dtype=torch.float64, device=v.device)
            out[name][sl] = v
    result.values = out
    return result


def _match_values(
    match: Tensor, r_count: Tensor, ks: tuple[int, ...], o: _Scoring, r_max: int
) -> dict[str, Tensor]:
    """Per-query metrics of ranked lists: ``match [Q, depth]`` says which neighbours share the
    query's class, ``r_count [Q]`` is each query's ``R`` (its relevant references). The one
    place the metrics are defined: in-memory search and given neighbour lists both end here."""
    ranks = torch.arange(1, match.shape[1] + 1, device=match.device, dtype=torch.float64)
    hits = match.cumsum(1)
    out: dict[str, Tensor] = {}
    for k in ks:
        out[f"recall@{k}"] = (hits[:, k - 1] > 0).double()
    if o.precision:
        for k in ks:
            out[f"precision@{k}"] = hits[:, k - 1].double() / k
    if o.map_at_r:
        relevant = match & (ranks[None, :] <= r_count[:, None])
        cum = relevant.cumsum(1).double()
        out["map@r"] = (cum / ranks * relevant).sum(1) / r_count
        out["r_precision"] = relevant.sum(1).double() / r_count
    if o.mrr:
        m = match[:, :r_max]
        first = m.double().argmax(1)
        out["mrr"] = torch.where(m.any(1), 1.0 / (first + 1.0), 0.0).double()
    return out


def retrieval_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    k: int | Sequence[int] = (1, 2, 4, 8),
    *,
    reference_embeddings: Tensor | np.ndarray | None = None,
    reference_labels: Tensor | np.ndarray | None = None,
    query_mask: Tensor | np.ndarray | None = None,
    reference_mask: Tensor | np.ndarray | None = None,
    metric: Metric = "cosine",
    map_at_r: bool = True,
    mrr: bool = True,
    precision: bool = True,
    clustering: bool = False,
    average: Average = "micro",
    chunk_size: int | None = None,
    fast: bool | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval metrics of ``embeddings`` with class ``labels``.

    By default every item queries all the others (leave-one-out). For a query/reference
    (InShop, re-ID gallery) protocol pass either ``reference_embeddings`` +
    ``reference_labels`` (disjoint sets) or boolean ``query_mask`` / ``reference_mask`` over
    ``embeddings`` (an item in both sets never retrieves itself).

    Args:
        k: the cut-offs for ``recall@k`` and ``precision@k``.
        metric: ``"cosine"``, ``"ip"`` (inner product) or ``"l2"``.
        map_at_r: compute ``map@r`` and ``r_precision`` (searches ``R_max`` neighbours).
        mrr: compute ``mrr`` (also searches ``R_max`` neighbours).
        precision: compute ``precision@k``.
        clustering: also compute ``nmi`` and ``ami`` of a FAISS k-means clustering of the
            queries (one cluster per class) against the labels; costs an extra k-means.
        average: ``"micro"`` averages over scorable queries, ``"macro"`` first averages
            within each class, then over classes.
        chunk_size: queries scored at once (default bounds memory automatically).
        fast: see :func:`lightning_metric.retrieval.knn`.
        seed: k-means seed for ``clustering``.

    Returns:
        ``{"recall@1": ..., "precision@1": ..., "map@r": ..., "r_precision": ..., "mrr": ...,
        "unscorable_queries": ...}`` as floats. If no query can be scored, only
        ``unscorable_queries`` (and ``nmi``/``ami``) are returned and a warning is issued:
        the ranking metrics are unavailable, not 0.

    Example: two classes; the last item of class 1 lies among the class-0 items, so its
    nearest neighbour has another label and 3 of the 4 queries hit at rank 1:

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
    >>> result = retrieval_metrics(x, torch.tensor([0, 0, 1, 1]), k=1)
    >>> result["recall@1"], result["unscorable_queries"]
    (0.75, 0.0)
    """
    check_choice("average", average, ("micro", "macro"))
    protocol = _Protocol(reference_embeddings, reference_labels, query_mask, reference_mask)
    scoring = _Scoring(metric, map_at_r, mrr, precision, chunk_size, fast)
    s, pq = _scored(embeddings, labels, k, protocol, scoring)
    out = _averaged(pq, average)
    if clustering:
        out.update(clustering_metrics(s.query, s.query_labels, seed))
    return out


def _averaged(pq: _PerQuery, average: Average) -> dict[str, float]:
    out: dict[str, float] = {}
    if pq.num_unscorable < pq.num_queries:
        for name, values in pq.values.items():
            if average == "micro":
                out[name] = float(values.mean())
            else:
                out[name] = float(_class_means(values, pq.labels)[1].mean())
    out["unscorable_queries"] = float(pq.num_unscorable)
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
    o = _Scoring("cosine", map_at_r, mrr, precision, None, None)
    scorable = (r_count > 0).nonzero()[:, 0]
    nq = lists.shape[0]
    pq = _PerQuery(qlab[scorable], {}, nq, nq - scorable.numel())
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
        pq.values = _match_values(match, r_count[scorable], ks, o, r_max)
    else:
        _warn_unscorable(nq)
    return _averaged(pq, average)


def _scored(
    embeddings: Any, labels: Any, k: Any, protocol: _Protocol, scoring: _Scoring
) -> tuple[_Setup, _PerQuery]:
    """The pipeline of both public functions: check, search, score every query."""
    ks = check_k(k)
    with single_threaded_bookkeeping():
        s = _setup(embeddings, labels, protocol, scoring.metric)
        pq = _score(s, ks, scoring)
    if pq.num_unscorable == pq.num_queries:
        _warn_unscorable(pq.num_queries)
    return s, pq


def _warn_unscorable(n: int) -> None:
    warnings.warn(
        f"none of the {n} queries has another item of its class in the reference set, so "
        "recall@k, precision@k, map@r, r_precision and mrr are unavailable (not reported)",
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
    labels: Tensor | np.ndarray,
    k: int | Sequence[int] = (1, 2, 4, 8),
    *,
    reference_embeddings: Tensor | np.ndarray | None = None,
    reference_labels: Tensor | np.ndarray | None = None,
    query_mask: Tensor | np.ndarray | None = None,
    reference_mask: Tensor | np.ndarray | None = None,
    metric: Metric = "cosine",
    map_at_r: bool = True,
    mrr: bool = True,
    precision: bool = True,
    chunk_size: int | None = None,
    fast: bool | None = None,
) -> dict[str, dict[int, float]]:
    """Like :func:`retrieval_metrics`, but averaged within each query class.

    Returns ``{metric_name: {label: value}}``; classes whose queries are all unscorable are
    absent, and ``"unscorable_queries"`` maps each label to its count of unscorable queries.
    """
    protocol = _Protocol(reference_embeddings, reference_labels, query_mask, reference_mask)
    scoring = _Scoring(metric, map_at_r, mrr, precision, chunk_size, fast)
    s, pq = _scored(embeddings, labels, k, protocol, scoring)
    out: dict[str, dict[int, float]] = {}
    for name, values in pq.values.items():
        present, means = _class_means(values, pq.labels)
        names = s.classes[present].tolist()
        out[name] = dict(zip(names, means.tolist(), strict=True))
    all_q = torch.bincount(s.query_labels, minlength=len(s.classes))
    scored = torch.bincount(pq.labels, minlength=len(s.classes))
    seen = (all_q > 0).nonzero()[:, 0]
    out["unscorable_queries"] = {
        int(s.classes[c]): float(all_q[c] - scored[c]) for c in seen.tolist()
    }
    return out
