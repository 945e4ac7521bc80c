"""Re-ranking: k-reciprocal encoding, alpha query expansion, database-side augmentation.

Pure functions of embeddings or distance matrices, plus small callable objects
(:class:`KReciprocal`, :class:`QueryExpansion`) that ``RecallAtK(rerank=...)`` applies to
report re-ranked metrics beside the plain ones (buildable from YAML with
``class_path``/``init_args``).

k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), on the set P = probes + gallery with distances d:

- ``d`` is divided by its largest value in each row (the authors' code), so the kernel
  below does not depend on the distance scale; the initial ranking is unchanged.
- ``N(p, k)``: the ``k + 1`` nearest items of ``p`` in P, ``p`` itself first (the authors'
  code). ``R(p, k) = {g in N(p, k) : p in N(g, k)}`` (eq. 4).
- ``R*(p, k) = R(p, k) ∪ R(q, round(k/2))`` for every ``q in R(p, k)`` with
  ``|R(p, k) ∩ R(q, round(k/2))| >= 2/3 |R(q, round(k/2))|`` (eq. 6).
- ``V[p, g] = exp(-d(p, g))`` for ``g in R*(p, k1)``, else 0 (eq. 7), each row scaled to
  sum 1 (the authors' code).
- local query expansion: ``V[p] <- mean of V[g] over g in N(p, k2)``, the ``k2`` nearest
  including ``p`` (eq. 11; skipped for ``k2 = 1``).
- ``d_J(p, g) = 1 - sum_j min(V[p, j], V[g, j]) / sum_j max(V[p, j], V[g, j])`` (eq. 10),
  and the final ``d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)`` (eq. 12).

The authors' released code tests the expansion condition with ``>`` where eq. 6 has
``>=``. Published re-identification results come from that code, so ``strict=True`` (the
default) uses ``>``; ``strict=False`` follows eq. 6. They differ only when exactly 2/3 of
``R(q, round(k/2))`` lies in ``R(p, k)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import (
    ArgumentTypeError,
    check_finite_rows,
    check_int,
    check_k,
    check_labels,
    check_range,
    check_top_k,
)
from lightning_metric.retrieval.knn import Similarity
from lightning_metric.retrieval.protocol import num_candidates
from lightning_metric.retrieval.ranking import Scoring, ranked_metrics
from lightning_metric.retrieval.relevance import (
    LabelKind,
    build_levels,
    label_kind_of,
    normalize_labels,
)

__all__ = [
    "KReciprocal",
    "QueryExpansion",
    "Reranker",
    "alpha_query_expansion",
    "check_reranked",
    "database_side_augmentation",
    "k_reciprocal",
    "k_reciprocal_all",
    "ranking_metrics",
]

ArrayLike = Union[Tensor, np.ndarray]


def _np(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D distance matrix, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` holds {int(bad.sum())} NaN/Inf distances (first at [{row}, {col}]: "
            f"{arr[row, col]}); check the embeddings they were computed from"
        )
    if (arr < 0).any():
        raise ValueError(
            f"`{name}` holds negative values ({arr.min():.3g}): pass distances (e.g. squared "
            "Euclidean), not similarities"
        )
    return arr


def _check_params(k1: int, k2: int, lambda_value: float) -> tuple[int, int, float]:
    k1 = check_int("k1", k1, minimum=1)
    k2 = check_int("k2", k2, minimum=1)
    return k1, k2, check_range("lambda_value", lambda_value, 0.0, 1.0)


def _check_strict(strict: Any) -> bool:
    if not isinstance(strict, bool | np.bool_):
        raise ArgumentTypeError(
            f"`strict` must be True (the released code's '>') or False (eq. 6's '>='), got "
            f"{strict!r}"
        )
    return bool(strict)


def _check_expansion(k: int, alpha: float) -> tuple[int, float]:
    """``k`` >= 1 neighbours; ``alpha`` finite and >= 0 (a negative power of a zero
    similarity is Inf, and the expanded vector NaN)."""
    return check_int("k", k, minimum=1), check_range("alpha", alpha, 0.0)


def _check_vectors(name: str, x: Any, dim: Optional[int] = None) -> Tensor:
    """A non-empty, finite ``[N, D]`` float tensor (``D == dim`` when given)."""
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"`{name}` must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-D tensor [N, D], got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ArgumentTypeError(f"`{name}` must hold floating-point embeddings, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"`{name}` has dimension {x.shape[1]}, but the queries have {dim}")
    check_finite_rows(name, x)
    return x


def k_reciprocal(
    q_g: ArrayLike,
    q_q: ArrayLike,
    g_g: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    strict: bool = True,
) -> np.ndarray:
    """Re-ranked ``[Q, G]`` distances of queries to gallery (module docstring; Zhong et al.).

    Args:
        q_g, q_q, g_g: query-gallery ``[Q, G]``, query-query ``[Q, Q]`` and gallery-gallery
            ``[G, G]`` distances (non-negative, e.g. squared Euclidean: the authors' code).
        k1: size of the k-reciprocal neighbourhoods (paper: 20).
        k2: neighbours averaged by local query expansion (paper: 6; 1 turns it off).
        lambda_value: weight of the original distance (paper: 0.3).
        strict: expansion test with ``>`` as the authors' released code (reproduces published
            numbers); ``False``: ``>=`` as eq. 6 of the paper.
    """
    qg, qq, gg = _np(q_g, "q_g"), _np(q_q, "q_q"), _np(g_g, "g_g")
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(
            f"q_g is {qg.shape}, so q_q must be ({nq}, {nq}) and g_g ({ng}, {ng}); got "
            f"{qq.shape} and {gg.shape}"
        )
    full = np.block([[qq, qg], [qg.T, gg]])
    return k_reciprocal_all(full, k1, k2, lambda_value, num_query=nq, strict=strict)[:, nq:]


def k_reciprocal_all(
    dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    num_query: Optional[int] = None,
    strict: bool = True,
) -> np.ndarray:
    """k-reciprocal re-ranking inside one set: ``dist [N, N]`` between all items; returns
    the re-ranked distances of the first ``num_query`` rows (default all) to all ``N``
    items. Leave-one-out evaluation uses it with every item as a query. ``strict``: as in
    :func:`k_reciprocal`."""
    k1, k2, lam = _check_params(k1, k2, lambda_value)
    strict = _check_strict(strict)
    d = _np(dist, "dist")
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"`dist` must be square [N, N], got {d.shape}")
    nq = n if num_query is None else check_int("num_query", num_query, minimum=1, maximum=n)
    if n < 2:
        raise ValueError("k-reciprocal re-ranking needs at least 2 items")
    scale = d.max(axis=1, keepdims=True)
    d = d / np.where(scale > 0, scale, 1.0)
    rank = np.argsort(d, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = [r]
        for q in r:
            rq = reciprocal(int(q), half)
            shared, needed = len(np.intersect1d(rq, r)), 2.0 / 3.0 * len(rq)
            if shared > needed or (not strict and shared == needed):
                expanded.append(rq)
        members = np.unique(np.concatenate(expanded))
        weight = np.exp(-d[i, members])
        v[i, members] = weight / weight.sum()
    if k2 > 1:
        v = v[rank[:, :k2]].mean(axis=1)
    jaccard = np.empty((nq, n), dtype=np.float64)
    # sum_j min(V[p, j], V[g, j]) through the items holding each column (V is sparse).
    holders = [np.flatnonzero(v[:, j]) for j in range(n)]
    row_sums = v.sum(axis=1)
    for i in range(nq):
        overlap = np.zeros(n)
        for j in np.flatnonzero(v[i]):
            rows = holders[j]
            overlap[rows] += np.minimum(v[i, j], v[rows, j])
        # sum_j max(V[p, j], V[g, j]) = sum V[p] + sum V[g] - sum_j min(V[p, j], V[g, j])
        jaccard[i] = 1.0 - overlap / (row_sums[i] + row_sums - overlap)
    return (1.0 - lam) * jaccard + lam * d[:nq]


def _topk_weighted_sum(
    query: Tensor, gallery: Tensor, k: int, alpha: float, exclude_self: bool
) -> Tensor:
    sim = query @ gallery.T
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    k = min(k, gallery.shape[0] - int(exclude_self))
    top, idx = sim.topk(k, dim=1)
    weights = top.clamp(min=0).pow(alpha)
    out = query + (weights[..., None] * gallery[idx]).sum(1)
    return torch.nn.functional.normalize(out, dim=1)


def alpha_query_expansion(query: Tensor, gallery: Tensor, k: int = 2, alpha: float = 3.0) -> Tensor:
    """alpha-QE (Radenović et al., "Fine-tuning CNN Image Retrieval with No Human
    Annotation", TPAMI 2018): each unit-norm query ``q`` becomes
    ``normalize(q + sum_{i<=k} max(q.g_i, 0)^alpha g_i)`` over its ``k`` most similar
    gallery vectors ``g_i`` (``alpha = 0``: average query expansion; a ``k`` above the
    gallery size uses the whole gallery). Returns ``[Q, D]``."""
    k = check_int("k", k, minimum=1)
    k, alpha = _check_expansion(k, alpha)
    query = _check_vectors("query", query)
    gallery = _check_vectors("gallery", gallery, query.shape[1])
    return _topk_weighted_sum(query.float(), gallery.float(), k, alpha, exclude_self=False)


def database_side_augmentation(gallery: Tensor, k: int = 2, alpha: float = 3.0) -> Tensor:
    """DBA: every unit-norm gallery vector ``g`` becomes
    ``normalize(g + sum_{i<=k} max(g.g_i, 0)^alpha g_i)`` over its ``k`` most similar
    *other* gallery vectors. Returns ``[G, D]``."""
    k, alpha = _check_expansion(k, alpha)
    gallery = _check_vectors("gallery", gallery)
    if gallery.shape[0] < 2:
        raise ValueError("database_side_augmentation needs at least 2 gallery vectors")
    g = gallery.float()
    return _topk_weighted_sum(g, g, k, alpha, exclude_self=True)


def _distances(query: Tensor, reference: Tensor, metric: Similarity) -> Tensor:
    """Non-negative distances: squared Euclidean (= 2 - 2 cos for unit vectors)."""
    if metric == "l2":
        return torch.cdist(query.double(), reference.double()).pow(2)
    return (2.0 - 2.0 * query.double() @ reference.double().T).clamp(min=0)


class Reranker(ABC):
    """Maps query and reference embeddings (prepared: unit-norm for cosine) to re-ranked
    distances ``[Q, R]`` (lower = closer). ``reference=None``: one set, every item a query
    of the others (its own column is excluded by the caller). Subclass it for your own."""

    @abstractmethod
    def __call__(self, query: Tensor, reference: Optional[Tensor], metric: Similarity) -> Tensor:
        """Re-ranked distances ``[Q, R]``."""


class KReciprocal(Reranker):
    """k-reciprocal re-ranking as a :class:`Reranker`, on squared Euclidean distances.

    In YAML (``RecallAtK``)::

        rerank:
          class_path: lightning_metric.retrieval.rerank.KReciprocal
          init_args: {k1: 20, k2: 6, lambda_value: 0.3, strict: true}

    ``strict=True`` (default): the expansion test of the authors' released code (``>``),
    which published results use; ``strict=False``: eq. 6 of the paper (``>=``).
    """

    def __init__(
        self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, strict: bool = True
    ) -> None:
        self.k1, self.k2, self.lambda_value = _check_params(k1, k2, lambda_value)
        self.strict = _check_strict(strict)

    def __call__(self, query: Tensor, reference: Optional[Tensor], metric: Similarity) -> Tensor:
        query = _check_vectors("query", query)
        if reference is None:
            d = _distances(query, query, metric).cpu().numpy()
            out = k_reciprocal_all(d, self.k1, self.k2, self.lambda_value, strict=self.strict)
        else:
            reference = _check_vectors("reference", reference, query.shape[1])
            out = k_reciprocal(
                _distances(query, reference, metric).cpu().numpy(),
                _distances(query, query, metric).cpu().numpy(),
                _distances(reference, reference, metric).cpu().numpy(),
                self.k1,
                self.k2,
                self.lambda_value,
                self.strict,
            )
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return (
            f"KReciprocal(k1={self.k1}, k2={self.k2}, lambda_value={self.lambda_value}, "
            f"strict={self.strict})"
        )


class QueryExpansion(Reranker):
    """alpha-QE of the queries, optionally after database-side augmentation (DBA) of the
    reference set, as a :class:`Reranker` (for unit-norm embeddings: cosine / ip)."""

    def __init__(self, k: int = 2, alpha: float = 3.0, dba: bool = False) -> None:
        self.k, self.alpha = _check_expansion(k, alpha)
        if not isinstance(dba, bool):
            raise ArgumentTypeError(f"`dba` must be True or False, got {dba!r}")
        self.dba = dba

    def __call__(self, query: Tensor, reference: Optional[Tensor], metric: Similarity) -> Tensor:
        if reference is None:  # one set: DBA of it is also its leave-one-out QE
            ref = database_side_augmentation(query, self.k, self.alpha) if self.dba else query
            q = database_side_augmentation(ref, self.k, self.alpha)
            return _distances(q, ref, metric)
        if self.dba:
            reference = database_side_augmentation(reference, self.k, self.alpha)
        q = alpha_query_expansion(query, reference, self.k, self.alpha)
        return _distances(q, reference, metric)

    def __repr__(self) -> str:
        return f"QueryExpansion(k={self.k}, alpha={self.alpha}, dba={self.dba})"


def check_reranked(distances: Any, num_query: int, num_reference: int, source: str) -> Tensor:
    """What a re-ranker returned, as a float64 CPU tensor: ``[num_query, num_reference]``
    finite distances. A NaN would sort last and an Inf tie with the excluded self-matches,
    so either would give a silently wrong recall; ``source`` names the re-ranker."""
    if not isinstance(distances, Tensor | np.ndarray):
        raise ArgumentTypeError(
            f"{source} must return a [Q, R] tensor of distances, got {type(distances).__name__}"
        )
    dist = torch.as_tensor(distances)
    if dist.is_complex() or dist.dtype == torch.bool:
        raise ArgumentTypeError(f"{source} must return real distances, got dtype {dist.dtype}")
    if tuple(dist.shape) != (num_query, num_reference):
        raise ValueError(
            f"{source} returned distances of shape {tuple(dist.shape)}; expected "
            f"({num_query}, {num_reference}) = (queries, reference items)"
        )
    dist = dist.detach().double().cpu()
    bad = ~torch.isfinite(dist)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{source} returned {int(bad.sum())} NaN/Inf distances (first at [{row}, {col}]: "
            f"{float(dist[row, col])}); re-ranked metrics would be silently wrong. Check its "
            "parameters and inputs (use a large finite distance for 'never')"
        )
    return dist


def ranking_metrics(
    distances: ArrayLike,
    query_labels: Any,
    reference_labels: Any,
    k: int | Sequence[int] = (1, 2, 4, 8),
    exclude: Optional[Tensor] = None,
    label_kind: LabelKind = "auto",
    level_names: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """``recall@k``, ``map@r``, ``r_precision``, ``mrr`` and ``unscorable_queries`` from a
    ``[Q, R]`` distance matrix (ascending; ties by lower reference row), with the
    definitions and label kinds of :func:`lightning_metric.retrieval.retrieval_metrics`.
    ``exclude [Q]``: the reference row of each query itself (``-1``: none), never retrieved
    (:mod:`~lightning_metric.retrieval.protocol`)."""
    ks = check_k(k)
    kind = label_kind_of(query_labels, label_kind, "query_labels")
    qlab = normalize_labels(query_labels, kind, _length(query_labels), "query_labels").cpu()
    ref_kind = label_kind_of(reference_labels, label_kind, "reference_labels")
    if ref_kind != kind:
        raise ValueError(f"`query_labels` are {kind} labels but `reference_labels` are {ref_kind}")
    rlab = normalize_labels(
        reference_labels, kind, _length(reference_labels), "reference_labels"
    ).cpu()
    nq, nr = len(qlab), len(rlab)
    dist = check_reranked(distances, nq, nr, "`distances`").clone()
    ex: Optional[Tensor] = None
    if exclude is not None:
        ex = check_labels("exclude", exclude, length=nq).cpu()
        if bool(((ex < -1) | (ex >= nr)).any()):
            bad = int(ex[(ex < -1) | (ex >= nr)][0])
            raise ValueError(
                f"`exclude` holds {bad}: each entry must be a reference row in [0, {nr}) or "
                "-1 (no own entry)"
            )
        rows = (ex >= 0).nonzero()[:, 0]
        dist[rows, ex[rows]] = float("inf")
    candidates = num_candidates(nr, ex)
    check_top_k(ks[-1], candidates)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :candidates]
    levels = build_levels(kind, qlab, rlab, level_names)
    scoring = Scoring(
        "cosine", map_at_r=True, mrr=True, precision=False, chunk_size=None, fast=None
    )
    return ranked_metrics(order, levels, ex, ks, scoring)


def _length(labels: Any) -> int:
    return len(labels) if hasattr(labels, "__len__") else 0
