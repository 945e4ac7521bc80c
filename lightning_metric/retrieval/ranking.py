"""Retrieval and verification metrics as pure functions of embeddings and labels.

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
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_k,
    check_labels,
)
from lightning_metric.retrieval.knn import (
    Metric,
    as_tensor,
    check_embeddings,
    prepare,
    same_rows,
    search_prepared,
    single_threaded_bookkeeping,
)

__all__ = [
    "check_k",
    "retrieval_metrics",
    "retrieval_metrics_per_class",
    "verification_metrics",
]

Average = Literal["micro", "macro"]
# Neighbour-label entries held at once while scoring (bounds memory for large classes).
_SCORE_BLOCK_ELEMENTS = 1 << 22


def _check_labels(labels: Tensor | np.ndarray, n: int, name: str, emb_name: str) -> Tensor:
    lab = check_labels(name, labels)
    if lab.shape[0] != n:
        raise ValueError(
            f"`{name}` has {lab.shape[0]} entries but `{emb_name}` has {n} rows; "
            "they must have the same length"
        )
    return lab


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
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    reference_embeddings: Tensor | np.ndarray | None,
    reference_labels: Tensor | np.ndarray | None,
    query_mask: Tensor | np.ndarray | None,
    reference_mask: Tensor | np.ndarray | None,
    metric: Metric,
) -> _Setup:
    check_choice("metric", metric, ("cosine", "ip", "l2"))
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    lab = _check_labels(labels, emb.shape[0], "labels", "embeddings").to(emb.device)
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
        ref = as_tensor(reference_embeddings, "reference_embeddings")
        check_embeddings(ref, "reference_embeddings")
        if ref.shape[1] != emb.shape[1]:
            raise ValueError(
                f"query and reference dims differ: embeddings have dim {emb.shape[1]}, "
                f"reference_embeddings have dim {ref.shape[1]}"
            )
        if ref.device != emb.device:
            raise ValueError(f"embeddings are on {emb.device}, reference on {ref.device}")
        rlab = _check_labels(
            reference_labels,
            ref.shape[0],
            "reference_labels",
            "reference_embeddings",
        ).to(emb.device)
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
        stacklevel=4,
    )


@dataclass
class _PerQuery:
    labels: Tensor  # contiguous class id of every scorable query
    values: dict[str, Tensor]  # metric name -> float64 [num_scorable]
    num_queries: int
    num_unscorable: int


def _score(
    s: _Setup,
    ks: tuple[int, ...],
    map_at_r: bool,
    mrr: bool,
    precision: bool,
    chunk_size: int | None,
    fast: bool | None,
    metric: Metric,
) -> _PerQuery:
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    if s.num_candidates < 1:
        raise ValueError(
            f"there is only {s.reference.shape[0]} item to search and a query never retrieves "
            "itself: retrieval metrics need at least 2 items"
        )
    if ks[-1] > s.num_candidates:
        raise ValueError(
            f"k={ks[-1]} is larger than the number of reference items a query can retrieve "
            f"({s.num_candidates}); use k <= {s.num_candidates}"
        )
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
    chunk = chunk_size or max(1, min(16384, _SCORE_BLOCK_ELEMENTS // depth))
    dev = s.query.device
    names = [f"recall@{k}" for k in ks]
    names += [f"precision@{k}" for k in ks] if precision else []
    names += ["map@r", "r_precision"] if map_at_r else []
    names += ["mrr"] if mrr else []
    out = {n: torch.empty(scorable.numel(), dtype=torch.float64, device=dev) for n in names}
    ranks = torch.arange(1, depth + 1, device=dev, dtype=torch.float64)
    for start in range(0, scorable.numel(), chunk):
        sl = slice(start, min(start + chunk, scorable.numel()))
        rows = scorable[sl]
        ex = s.exclude[rows] if s.exclude is not None else None
        nn = search_prepared(s.query[rows], s.reference, depth, metric, ex, None, fast)
        match = s.reference_labels[nn.indices] == s.query_labels[rows][:, None]
        hits = match.cumsum(1)
        for k in ks:
            out[f"recall@{k}"][sl] = (hits[:, k - 1] > 0).double()
            if precision:
                out[f"precision@{k}"][sl] = hits[:, k - 1].double() / k
        if map_at_r:
            rc = r_count[sl]
            relevant = match & (ranks[None, :] <= rc[:, None])
            cum = relevant.cumsum(1).double()
            ap = (cum / ranks * relevant).sum(1)
            out["map@r"][sl] = ap / rc
            out["r_precision"][sl] = relevant.sum(1).double() / rc
        if mrr:
            m = match[:, :r_max]
            first = m.double().argmax(1)
            out["mrr"][sl] = torch.where(m.any(1), 1.0 / (first + 1.0), 0.0)
    result.values = out
    return result


def _clustering(s: _Setup, seed: int) -> dict[str, float]:
    import faiss
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = s.query.float().cpu().numpy()
    labels = s.query_labels.cpu().numpy()
    num_clusters = len(np.unique(labels))
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=20, seed=seed, verbose=False)
    km.train(x)
    _, assigned = km.index.search(x, 1)
    return {
        "nmi": float(normalized_mutual_info_score(labels, assigned[:, 0])),
        "ami": float(adjusted_mutual_info_score(labels, assigned[:, 0])),
    }


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
    """
    check_choice("average", average, ("micro", "macro"))
    ks = check_k(k)
    with single_threaded_bookkeeping():
        s = _setup(
            embeddings,
            labels,
            reference_embeddings,
            reference_labels,
            query_mask,
            reference_mask,
            metric,
        )
        pq = _score(s, ks, map_at_r, mrr, precision, chunk_size, fast, metric)
    out: dict[str, float] = {}
    if pq.num_unscorable == pq.num_queries:
        _warn_unscorable(pq.num_queries)
    else:
        for name, values in pq.values.items():
            if average == "micro":
                out[name] = float(values.mean())
            else:
                out[name] = float(_class_means(values, pq.labels)[1].mean())
    out["unscorable_queries"] = float(pq.num_unscorable)
    if clustering:
        out.update(_clustering(s, seed))
    return out


def _warn_unscorable(n: int) -> None:
    warnings.warn(
        f"none of the {n} queries has another item of its class in the reference set, so "
        "recall@k, precision@k, map@r, r_precision and mrr are unavailable (not reported)",
        UserWarning,
        stacklevel=3,
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
    ks = check_k(k)
    with single_threaded_bookkeeping():
        s = _setup(
            embeddings,
            labels,
            reference_embeddings,
            reference_labels,
            query_mask,
            reference_mask,
            metric,
        )
        pq = _score(s, ks, map_at_r, mrr, precision, chunk_size, fast, metric)
    if pq.num_unscorable == pq.num_queries:
        _warn_unscorable(pq.num_queries)
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


def verification_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None = None,
    *,
    pairs: Tensor | np.ndarray | None = None,
    is_same: Tensor | np.ndarray | None = None,
    far: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    metric: Literal["cosine", "ip"] = "cosine",
    max_items: int = 20000,
) -> dict[str, float]:
    """Face-verification metrics: TAR@FAR (= 1 - FNMR@FMR) and the equal error rate.

    Either ``labels`` (every unordered pair of the ``N`` items is scored; genuine pairs share
    a label) or ``pairs`` ``[P, 2]`` item indices with ``is_same`` ``[P]`` booleans (the
    protocol's pair list). A pair is accepted when its similarity is above the threshold;
    the threshold for each target FAR is the lowest one whose false accept rate on the
    impostor pairs is <= the target. FAR targets below ``1 / num_impostor_pairs`` cannot be
    measured and are left out with a warning.

    Returns:
        ``{"tar@far=1e-03": ..., "fnmr@fmr=1e-03": ..., "threshold@far=1e-03": ...,
        "eer": ...}``.
    """
    check_choice("metric", metric, ("cosine", "ip"))
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    x = prepare(emb, metric)
    fars = tuple(float(f) for f in far)
    for f in fars:
        if not 0.0 < f < 1.0:
            raise ValueError(f"`far` values must lie in (0, 1), got {f}")
    if (labels is None) == (pairs is None):
        raise ValueError("pass exactly one of `labels` (all pairs) or `pairs` + `is_same`")
    if labels is not None:
        n = x.shape[0]
        if n > max_items:
            raise ValueError(
                f"all-pairs verification of {n} items needs {n * (n - 1) // 2} scores; "
                f"pass `pairs` or raise max_items (currently {max_items})"
            )
        lab = _check_labels(labels, n, "labels", "embeddings").to(x.device)
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        scores = (x @ x.T)[i, j]
        same = lab[i] == lab[j]
    else:
        if pairs is None or is_same is None:
            raise ValueError("`pairs` needs `is_same`, one boolean per pair")
        p = as_tensor(pairs, "pairs").to(x.device)
        same = as_tensor(is_same, "is_same").to(x.device)
        if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise ArgumentTypeError(f"`pairs` must hold integer item indices, got dtype {p.dtype}")
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"`pairs` must be an int tensor [P, 2], got {tuple(p.shape)}")
        same = _check_is_same(same)
        if same.shape != (p.shape[0],):
            raise ValueError(
                f"`is_same` must have one entry per pair ({p.shape[0]}), got {tuple(same.shape)}"
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= x.shape[0]):
            raise ValueError(
                f"`pairs` indices must lie in [0, {x.shape[0]}), got range "
                f"[{int(p.min())}, {int(p.max())}]"
            )
        scores = (x[p[:, 0]] * x[p[:, 1]]).sum(1)
    genuine, impostor = scores[same].double(), scores[~same].double()
    if genuine.numel() == 0 or impostor.numel() == 0:
        raise ValueError(
            f"verification needs genuine and impostor pairs, got {genuine.numel()} genuine "
            f"and {impostor.numel()} impostor pairs"
        )
    imp_desc = torch.sort(impostor, descending=True).values
    n_imp = impostor.numel()
    out: dict[str, float] = {}
    skipped = []
    for f in fars:
        allowed = int(np.floor(f * n_imp + 1e-9))
        if allowed < 1:
            skipped.append(f)
            continue
        # Accept score > t: at most `allowed` impostors may lie strictly above t.
        t = imp_desc[allowed] if allowed < n_imp else imp_desc[-1] - 1.0
        tar = float((genuine > t).double().mean())
        out[f"tar@far={f:.0e}"] = tar
        out[f"fnmr@fmr={f:.0e}"] = 1.0 - tar
        out[f"threshold@far={f:.0e}"] = float(t)
    if skipped:
        warnings.warn(
            f"FAR targets {skipped} need more than {n_imp} impostor pairs to be measured; left out",
            UserWarning,
            stacklevel=2,
        )
    out["eer"] = _eer(genuine, impostor)
    return out


def _check_is_same(same: Tensor) -> Tensor:
    # A float (a score, a probability) would be cast silently: 0.3 -> True.
    if same.dtype == torch.bool:
        return same
    if same.is_floating_point() or same.is_complex():
        raise ArgumentTypeError(
            f"`is_same` must be booleans (or integers 0/1), one per pair, got dtype {same.dtype}"
        )
    bad = (same != 0) & (same != 1)
    if bool(bad.any()):
        raise ValueError(
            f"`is_same` must be booleans (or integers 0/1), got value {int(same[bad][0])}"
        )
    return same.bool()


def _eer(genuine: Tensor, impostor: Tensor) -> float:
    thresholds = torch.cat([genuine, impostor]).unique()
    g = torch.sort(genuine).values
    i = torch.sort(impostor).values
    # Accept score >= t: FRR = share of genuine below t, FAR = share of impostors at/above t.
    frr = torch.searchsorted(g, thresholds, right=False).double() / g.numel()
    far = 1.0 - torch.searchsorted(i, thresholds, right=False).double() / i.numel()
    best = int(torch.argmin((frr - far).abs()))
    return float((frr[best] + far[best]) / 2)
