"""One pure function per ranking metric, on a relevance matrix (torchmetrics' functional style).

Every function takes ``relevance``: a bool ``[Q, depth]`` tensor saying which of each query's
ranked neighbours (nearest first, the query itself already left out) are relevant to it, and
returns one float64 value per query ``[Q]``; averaging is the caller's choice. ``map_at_r``
and ``r_precision`` also take ``relevant_counts`` ``R [Q]``: how many references are relevant
to each query, found or not (``>= 1``: a query with ``R = 0`` cannot be scored and is left
out by the caller). Definitions (DESIGN.md):

- ``recall_at_k``: 1 when a relevant item is among the ``k`` nearest (= CMC@k = hit rate).
- ``precision_at_k``: fraction of relevant items among the ``k`` nearest.
- ``map_at_r``, ``r_precision``: "A Metric Learning Reality Check" (Musgrave et al., 2020).
- ``mrr``: reciprocal rank of the first relevant neighbour in the given columns, 0 if none.

:func:`~lightning_metric.retrieval.retrieval_metrics` searches, builds the relevance matrix
(single label, multi-label or hierarchical: :mod:`~.relevance`) and composes these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metric.checks import ArgumentTypeError, check_int

__all__ = ["map_at_r", "mrr", "precision_at_k", "r_precision", "recall_at_k"]


def check_relevance(relevance: object, name: str = "relevance") -> Tensor:
    """A bool ``[Q, depth]`` tensor (integers, 0/1 floats and 1-D inputs are refused)."""
    if not isinstance(relevance, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must be a bool torch.Tensor [num_queries, depth], got "
            f"{type(relevance).__name__}"
        )
    if relevance.dtype != torch.bool:
        raise ArgumentTypeError(
            f"`{name}` must be a bool tensor (True = relevant neighbour), got dtype "
            f"{relevance.dtype}; compare labels to build it"
        )
    if relevance.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D [num_queries, depth], got shape {tuple(relevance.shape)}"
        )
    return relevance


def check_relevant_counts(relevant_counts: object, relevance: Tensor) -> Tensor:
    """``R [Q]``: integers ``>= 1``, at least the relevant entries of each row, and no deeper
    than the ranking (a shorter ranking would count the unsearched ranks as misses)."""
    if not isinstance(relevant_counts, Tensor):
        raise ArgumentTypeError(
            f"`relevant_counts` must be an integer torch.Tensor [num_queries], got "
            f"{type(relevant_counts).__name__}"
        )
    r = relevant_counts
    if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        raise ArgumentTypeError(f"`relevant_counts` must hold integers, got dtype {r.dtype}")
    nq, depth = relevance.shape
    if r.shape != (nq,):
        raise ValueError(
            f"`relevant_counts` must have shape [{nq}] (one R per relevance row), "
            f"got {tuple(r.shape)}"
        )
    if nq == 0:
        return r
    low = int(r.min())
    if low < 1:
        row = int((r < 1).nonzero()[0, 0])
        raise ValueError(
            f"`relevant_counts` must be >= 1, got R={low} for query {row}: a query with no "
            "relevant reference cannot be scored, leave it out"
        )
    high = int(r.max())
    if high > depth:
        raise ValueError(
            f"`relevance` holds {depth} ranks per query but R={high} (query "
            f"{int(r.argmax())}): rank at least max(R) neighbours"
        )
    found = relevance.sum(1)
    over = found > r
    if bool(over.any()):
        row = int(over.nonzero()[0, 0])
        raise ValueError(
            f"query {row} has {int(found[row])} relevant neighbours in `relevance` but "
            f"R={int(r[row])} relevant references: R must count every relevant reference"
        )
    return r


def _check_k(k: object, depth: int) -> int:
    k = check_int("k", k, minimum=1)
    if k > depth:
        raise ValueError(f"k={k} is deeper than the {depth} ranks in `relevance`")
    return k


def recall_at_k(relevance: Tensor, k: int) -> Tensor:
    """1.0 for each query with a relevant item among its ``k`` nearest, else 0.0.

    >>> import torch
    >>> relevance = torch.tensor([[False, True, False], [False, False, False]])
    >>> recall_at_k(relevance, 1).tolist(), recall_at_k(relevance, 2).tolist()
    ([0.0, 0.0], [1.0, 0.0])
    """
    rel = check_relevance(relevance)
    k = _check_k(k, rel.shape[1])
    return rel[:, :k].any(1).double()


def precision_at_k(relevance: Tensor, k: int) -> Tensor:
    """Fraction of relevant items among each query's ``k`` nearest.

    >>> import torch
    >>> precision_at_k(torch.tensor([[True, False, True, True]]), 4).tolist()
    [0.75]
    """
    rel = check_relevance(relevance)
    k = _check_k(k, rel.shape[1])
    return rel[:, :k].sum(1).double() / k


def _relevant_in_r(relevance: Tensor, relevant_counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rel = check_relevance(relevance)
    r = check_relevant_counts(relevant_counts, rel)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    return rel & (ranks[None, :] <= r[:, None]), r, ranks


def map_at_r(relevance: Tensor, relevant_counts: Tensor) -> Tensor:
    """MAP@R: ``(1/R) sum_{i <= R} P(i) rel(i)``, ``P(i)`` the precision at rank ``i``.

    Two relevant references, found at ranks 1 and 3: ``(1/2)(1/1 + 0) = 0.5``:

    >>> import torch
    >>> map_at_r(torch.tensor([[True, False, True]]), torch.tensor([2])).tolist()
    [0.5]
    """
    relevant, r, ranks = _relevant_in_r(relevance, relevant_counts)
    cum = relevant.cumsum(1).double()
    return (cum / ranks * relevant).sum(1) / r


def r_precision(relevance: Tensor, relevant_counts: Tensor) -> Tensor:
    """Fraction of relevant items among each query's ``R`` nearest.

    >>> import torch
    >>> r_precision(torch.tensor([[True, False, True]]), torch.tensor([2])).tolist()
    [0.5]
    """
    relevant, r, _ = _relevant_in_r(relevance, relevant_counts)
    return relevant.sum(1).double() / r


def mrr(relevance: Tensor) -> Tensor:
    """Reciprocal rank of the first relevant neighbour among the given columns, 0 if none
    (:func:`~lightning_metric.retrieval.retrieval_metrics` passes the ``R_max`` nearest).

    >>> import torch
    >>> mrr(torch.tensor([[False, False, True], [False, False, False]])).tolist()
    [0.3333333333333333, 0.0]
    """
    rel = check_relevance(relevance)
    # In float64: an integer tensor plus a Python float would be float32 (1/3 off by 1e-8).
    first = rel.double().argmax(1).double()
    return torch.where(rel.any(1), 1.0 / (first + 1.0), 0.0)
