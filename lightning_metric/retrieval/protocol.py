"""The retrieval protocol: which rows query, which are searched, what a query may not match
and how ``k`` is clamped. kNN, the metrics, re-ranking, :class:`RetrievalMetrics`, the
``RecallAtK`` callback and ``search --evaluate`` all decide these here.

- Leave-one-out (one set): every row queries all the others; its own row is excluded.
- Query / reference masks over one set: a row in both sets never retrieves itself (its
  reference position is its ``exclude`` entry, :func:`exclusion`).
- A reference set passed separately that holds exactly the query rows (the same set passed
  twice) is searched leave-one-out with a warning (:func:`repeats_queries`): otherwise every
  query would find its own copy at rank 1 and score recall 1.0.
- ``exclude [Q]``: the reference row each query may not retrieve, ``-1`` for none. It is left
  out of the ranking (:func:`kept_columns`, :func:`without_excluded`) and of the query's
  ``R`` when relevant to it.
- Equal scores rank the lower reference row first (:func:`order_ties`), as exact search gives
  them, whatever order an approximate index or ``torch.topk`` returned them in.
- ``k`` beyond the retrievable items raises in the functions (:func:`check_top_k`) and is
  clamped with a warning in the training-time shells (:func:`clamp_k`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_metric.checks import ArgumentTypeError

__all__ = [
    "check_mask",
    "clamp_k",
    "exclusion",
    "kept_columns",
    "num_candidates",
    "order_ties",
    "repeats_queries",
    "without_excluded",
]


def check_mask(mask: object, n: int, name: str) -> Tensor:
    """A bool ``[n]`` tensor (numpy arrays converted) that selects at least one row."""
    import numpy as np

    m = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
    if not isinstance(m, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(mask).__name__}"
        )
    if m.dtype != torch.bool or m.shape != (n,):
        raise ValueError(
            f"`{name}` must be a bool tensor of shape [{n}], got dtype {m.dtype} "
            f"and shape {tuple(m.shape)}"
        )
    if not bool(m.any()):
        raise ValueError(f"`{name}` selects no items: nothing to evaluate")
    return m


def exclusion(query_mask: Tensor, reference_mask: Tensor) -> Tensor:
    """``exclude [Q]`` of a query/reference split given by masks over one set: for each
    query row, its position among the reference rows when it is one of them, else ``-1``.

    >>> import torch
    >>> exclusion(torch.tensor([True, True, False]), torch.tensor([False, True, True])).tolist()
    [-1, 0]
    """
    position = torch.cumsum(reference_mask.long(), 0) - 1
    return torch.where(reference_mask, position, torch.full_like(position, -1))[query_mask]


def num_candidates(num_reference: int, exclude: Tensor | None) -> int:
    """The fewest reference rows any query can retrieve (one less when some query's own row
    is among them)."""
    if exclude is None or exclude.numel() == 0:
        return num_reference
    return num_reference - (1 if bool((exclude >= 0).any()) else 0)


def repeats_queries(
    query: Tensor,
    reference: Tensor,
    query_labels: Tensor | None = None,
    reference_labels: Tensor | None = None,
    names: tuple[str, str] = ("embeddings", "reference_embeddings"),
) -> bool:
    """Whether ``reference`` is the query set passed again (same rows in the same order):
    the caller then searches leave-one-out and warns. Same rows with other labels raise:
    neither reading of that input is safe."""
    if not _same_rows(query, reference):
        return False
    if (
        query_labels is not None
        and reference_labels is not None
        and (
            query_labels.shape != reference_labels.shape
            or not torch.equal(query_labels, reference_labels.to(query_labels.device))
        )
    ):
        raise ValueError(
            f"`{names[1]}` holds the same rows as `{names[0]}` but their labels differ: "
            "pass one set with its labels for leave-one-out, or the real reference set"
        )
    return True


def _same_rows(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)


def clamp_k(ks: Sequence[int], candidates: int, stacklevel: int = 3) -> dict[int, int]:
    """Each requested ``k`` -> the ``k`` used: at most ``candidates``, with a warning when
    one is clamped (``recall@k`` is then the recall over all retrievable items)."""
    used = {k: min(k, candidates) for k in ks}
    if any(k != v for k, v in used.items()):
        warnings.warn(
            f"k={max(ks)} exceeds the {candidates} retrievable items: recall@k and "
            f"precision@k for k > {candidates} are computed at k={candidates}",
            UserWarning,
            stacklevel=stacklevel,
        )
    return used


def kept_columns(indices: Tensor, exclude: Tensor | None, k: int) -> Tensor:
    """Column numbers ``[Q, k]`` of each row's first ``k`` entries once its excluded
    reference row (``exclude``, ``-1`` for none) is skipped; gather values and indices with
    them. ``indices`` may hold ``-1`` (not found); those are never the excluded row. Rows
    need ``k + 1`` columns when their excluded row is present.

    >>> import torch
    >>> kept_columns(torch.tensor([[5, 2, 7], [1, 3, 4]]), torch.tensor([2, -1]), 2).tolist()
    [[0, 2], [0, 1]]
    """
    if exclude is not None and exclude.shape != indices.shape[:1]:
        # A shorter exclude would broadcast: every row would skip the first query's row.
        raise ValueError(
            f"exclude must hold one reference row per query, shape [{indices.shape[0]}], got "
            f"shape {list(exclude.shape)} for indices of shape {list(indices.shape)}"
        )
    cols = torch.arange(k, device=indices.device)[None, :].expand(indices.shape[0], k)
    if exclude is None or indices.shape[1] <= k:
        return cols.contiguous()
    is_own = (indices == exclude[:, None]) & (exclude[:, None] >= 0)
    # Column of the excluded item, or past the k kept columns when it was not returned.
    pos = torch.where(is_own.any(1), is_own.int().argmax(1), k)
    return cols + (cols >= pos[:, None]).long()


def without_excluded(indices: Tensor, exclude: Tensor | None, fill: int = -1) -> Tensor:
    """``indices [Q, n]`` with each row's excluded reference row (``exclude``, ``-1`` for
    none) removed, the entries after it moved up and the freed last place set to ``fill``
    (``-1``: not found); a row whose excluded row was not returned is unchanged. For neighbour
    lists whose width must stay ``n`` (:func:`kept_columns` keeps ``k`` columns instead).

    >>> import torch
    >>> without_excluded(torch.tensor([[5, 2, 7], [1, 3, 4]]), torch.tensor([2, 9])).tolist()
    [[5, 7, -1], [1, 3, 4]]
    """
    pad = torch.full((indices.shape[0], 1), fill, dtype=indices.dtype, device=indices.device)
    padded = torch.cat([indices, pad], dim=1)
    return padded.gather(1, kept_columns(padded, exclude, indices.shape[1]))


def order_ties(values: Tensor, indices: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """Each row of ``(values, indices) [Q, n]`` ordered best value first (``descending`` for
    similarities, ascending for distances), equal values by lower index: the order exact
    search gives. An approximate index or ``torch.topk`` lists ties in an order of its own,
    which would move hits across the k cut-offs.

    >>> import torch
    >>> v, i = order_ties(torch.tensor([[0.5, 0.9, 0.5]]), torch.tensor([[7, 4, 3]]), True)
    >>> v.tolist(), i.tolist()
    ([[0.8999999761581421, 0.5, 0.5]], [[4, 3, 7]])
    """
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(
            "values and indices must be [queries, neighbours] of the same shape, got "
            f"{list(values.shape)} and {list(indices.shape)}"
        )
    # Two stable sorts = lexicographic (value, index) order.
    order = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.argsort(values, dim=1, descending=descending, stable=True)
    return values.gather(1, order), indices.gather(1, order)
