"""Exact k-nearest-neighbour search.

CPU tensors and numpy arrays go through FAISS' brute-force kernels (``faiss.knn``, no index
copy), one query chunk at a time so peak memory stays ``O(N * D + chunk * k)``. Tensors on an
accelerator go through chunked matmul + top-k in torch; on CUDA an optional float16 candidate
pass is re-scored in float32 and checked against a rounding-error bound, so the neighbours are
always those of the exact float32 search.

Ties are broken deterministically: equal scores rank the lower reference index first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import (
    ArgumentTypeError,
    check_finite_rows,
    check_int,
    check_metric,
    check_top_k,
)
from lightning_metric.retrieval.protocol import kept_columns, order_ties, repeats_queries

__all__ = [
    "Metric",
    "Neighbors",
    "Similarity",
    "as_tensor",
    "check_embeddings",
    "knn",
    "prepare",
    "search_prepared",
]

# The one type of a similarity name; checks.METRICS holds the same values for run time.
Similarity = Literal["cosine", "ip", "l2"]
# Old name of Similarity (it read like torchmetrics' Metric class); kept for callers outside
# retrieval/ until they move.
Metric = Similarity
# Elements of the [chunk, reference] score block materialised at once by the torch path.
_TORCH_BLOCK_ELEMENTS = 1 << 27
# Queries per FAISS call: FAISS blocks the GEMM itself, and every extra call repeats its
# per-call set-up over the whole reference set (a few percent at 16k queries per call); the
# result buffers of 65k queries x k stay tens of MB.
_FAISS_CHUNK = 1 << 16


_faiss_threads: ContextVar[int | None] = ContextVar("_faiss_threads", default=None)


@contextmanager
def single_threaded_bookkeeping() -> Iterator[None]:
    """Run torch's small CPU ops single-threaded; FAISS keeps the caller's thread count.

    Element-wise ops on ``[queries, k]`` tensors gain nothing from threads, but OpenMP
    barriers stall badly when the cores are oversubscribed (every op waits for a core that
    another process holds). torch and FAISS may share one OpenMP runtime, so FAISS calls set their
    thread count explicitly (:func:`faiss_threads_for`).
    """
    threads = torch.get_num_threads()
    if threads == 1 or _faiss_threads.get() is not None:
        yield
        return
    token = _faiss_threads.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _faiss_threads.reset(token)


@contextmanager
def faiss_threads_for(queries: int) -> Iterator[None]:
    """Run FAISS with the caller's thread count (see :func:`single_threaded_bookkeeping`),
    but at most one thread per query of a search of ``queries`` rows.

    FAISS parallelises a search over its queries, so threads beyond the query count have
    nothing to do; yet every parallel region still wakes them, and on busy cores that wake-up
    costs far more than the search itself (one query against 200k binary codes: 1-2 ms on one
    thread, 40-90 ms on two, with the other core loaded).
    """
    import faiss

    previous = faiss.omp_get_max_threads()
    threads = max(1, min(_faiss_threads.get() or previous, queries))
    if threads == previous:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _faiss_knn(
    xq: np.ndarray, xb: np.ndarray, k: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    with faiss_threads_for(xq.shape[0]):
        return faiss.knn(xq, xb, k, metric=metric)


class Neighbors(NamedTuple):
    """Result of :func:`knn`.

    ``values`` are similarities (``cosine``/``ip``, descending) or squared euclidean
    distances (``l2``, ascending); ``indices`` index the reference rows.
    """

    values: Tensor
    indices: Tensor


def as_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    """Convert an array-like to a tensor without copying when possible."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_embeddings(x: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D [num_items, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: nothing to evaluate")
    if not x.is_floating_point():
        raise ArgumentTypeError(f"`{name}` must be a floating point tensor, got dtype {x.dtype}")
    check_finite_rows(name, x)


def check_reference(
    query: Tensor, reference: Tensor | np.ndarray, query_name: str, name: str
) -> Tensor:
    """``reference`` as embeddings searchable for ``query``: same dimension, same device."""
    r = as_tensor(reference, name)
    check_embeddings(r, name)
    if r.shape[1] != query.shape[1]:
        raise ValueError(
            f"query and reference dims differ: `{query_name}` has dim {query.shape[1]}, "
            f"`{name}` has dim {r.shape[1]}"
        )
    if r.device != query.device:
        raise ValueError(f"`{query_name}` is on {query.device} but `{name}` is on {r.device}")
    return r


def check_exclude(exclude: Tensor | np.ndarray, num_queries: int, num_reference: int) -> Tensor:
    """``exclude`` as int64 ``[Q]`` reference rows in ``[-1, R)`` (``-1``: exclude nothing)."""
    ex = as_tensor(exclude, "exclude")
    if ex.is_floating_point() or ex.is_complex() or ex.dtype == torch.bool:
        raise ArgumentTypeError(
            f"`exclude` must hold integer reference row numbers, got dtype {ex.dtype}"
        )
    if ex.shape != (num_queries,):
        raise ValueError(
            f"`exclude` must have shape [{num_queries}] (one entry per query), "
            f"got {tuple(ex.shape)}"
        )
    ex = ex.to(torch.int64)
    if ex.numel():
        lo, hi = int(ex.min()), int(ex.max())
        if lo < -1 or hi >= num_reference:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"`exclude` values must be reference rows in [0, {num_reference}) or -1 for "
                f"none, got {bad}"
            )
    return ex


def prepare(x: Tensor, metric: Similarity) -> Tensor:
    """Detach, cast to contiguous float32 and L2-normalise for ``cosine``."""
    x = x.detach()
    if x.device.type == "cpu" or x.dtype != torch.float32:
        x = x.float()
    if metric == "cosine":
        norms = torch.linalg.vector_norm(x, dim=1)
        # Model outputs are usually unit-norm already; dividing again only moves the last bit
        # and costs a copy of the whole set.
        if not bool(((norms - 1).abs() <= 1e-6).all()):
            x = x / norms.clamp_min(1e-12)[:, None]
    return x.contiguous()


def knn(
    query: Tensor | np.ndarray,
    reference: Tensor | np.ndarray | None = None,
    k: int = 1,
    metric: Similarity = "cosine",
    *,
    exclude: Tensor | None = None,
    chunk_size: int | None = None,
    fast: bool | None = None,
) -> Neighbors:
    """Exact ``k`` nearest neighbours of every query row among the reference rows.

    Args:
        query: ``[Q, D]`` query embeddings.
        reference: ``[R, D]`` reference embeddings. ``None`` searches ``query`` leave-one-out:
            every query's own row is excluded by index, so exact duplicates are still found.
            A ``reference`` that is ``query`` itself, or holds exactly the same rows, is
            searched leave-one-out too (with a warning): otherwise every query would find
            itself first. Pass ``exclude`` to keep full control.
        k: number of neighbours per query, ``1 <= k <= number of candidates``.
        metric: ``"cosine"`` (rows L2-normalised first), ``"ip"`` (inner product) or ``"l2"``
            (squared euclidean distance).
        exclude: optional ``[Q]`` integer reference row to exclude per query (``-1`` for
            none), for a reference set that contains some queries.
        chunk_size: queries per search call; default bounds memory automatically.
        fast: CUDA only: find candidates with a float16 matmul and re-score them in float32
            (default ``True`` for ``cosine`` on CUDA). The result is identical to the exact
            search; rows whose candidate set cannot be proven complete are searched exactly.

    Returns:
        :class:`Neighbors` ``(values [Q, k], indices [Q, k])`` on the query's device.

    Example: four points on a line, each searched against the others (leave-one-out);
    ``l2`` values are squared distances:

    >>> import torch
    >>> points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    >>> nearest = knn(points, k=1, metric="l2")
    >>> nearest.indices[:, 0].tolist(), nearest.values[:, 0].tolist()
    ([1, 0, 1, 2], [1.0, 1.0, 4.0, 16.0])
    """
    check_metric(metric)
    k = check_int("k", k, minimum=1)
    q = as_tensor(query, "query")
    check_embeddings(q, "query")
    if (
        reference is not None
        and exclude is None
        and repeats_queries(q, as_tensor(reference, "reference"))
    ):
        # Every query would find itself at rank 1 (recall 1.0 from self-matches).
        warnings.warn(
            "knn: `reference` holds the same rows as `query`; each query's own row is "
            "excluded (leave-one-out, as reference=None does)",
            UserWarning,
            stacklevel=2,
        )
        reference = None
    leave_one_out = reference is None
    if leave_one_out:
        if exclude is not None:
            raise ValueError("`exclude` cannot be combined with `reference=None` (leave-one-out)")
        r = q
        exclude = torch.arange(q.shape[0], device=q.device)
    else:
        r = check_reference(q, reference, "query", "reference")  # type: ignore[arg-type]
        if exclude is not None:
            exclude = check_exclude(exclude, q.shape[0], r.shape[0]).to(q.device)
    if r.shape[0] < 2 and leave_one_out:
        raise ValueError(
            f"`query` has only {r.shape[0]} item: leave-one-out search needs at least 2 items"
        )
    num_candidates = r.shape[0] - (1 if leave_one_out else 0)
    what = "reference items a query can retrieve" + (", itself excluded" if leave_one_out else "")
    check_top_k(k, num_candidates, what)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if fast and metric != "cosine":
        raise ValueError(f"`fast=True` is only supported for metric='cosine', got {metric!r}")
    with single_threaded_bookkeeping():
        qp = prepare(q, metric)
        rp = qp if leave_one_out else prepare(r, metric)
        return search_prepared(qp, rp, k, metric, exclude, chunk_size, fast)


def search_prepared(
    q: Tensor,
    r: Tensor,
    k: int,
    metric: Similarity,
    exclude: Tensor | None,
    chunk_size: int | None = None,
    fast: bool | None = None,
) -> Neighbors:
    """:func:`knn` on inputs already checked and passed through :func:`prepare`."""
    if q.device.type == "cpu":
        values, indices = _knn_faiss(q, r, k, metric, exclude, chunk_size)
    else:
        use_fast = (metric == "cosine" and q.device.type == "cuda") if fast is None else fast
        values, indices = _knn_torch(q, r, k, metric, exclude, chunk_size, use_fast)
    return Neighbors(values, indices)


# ---------------------------------------------------------------- FAISS (CPU) path


def _knn_faiss(
    q: Tensor, r: Tensor, k: int, metric: Similarity, exclude: Tensor | None, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    xq, xb = q.numpy(), r.numpy()
    need = k + (1 if exclude is not None else 0)
    chunk = chunk_size or _FAISS_CHUNK
    nq = xq.shape[0]
    out_v = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        vals, idx = _faiss_search_complete(xq[start:stop], xb, need, metric)
        ex = exclude[start:stop] if exclude is not None else None
        vals, idx = _drop_excluded(vals, idx, k, ex)
        out_v[start:stop] = vals.numpy()
        out_i[start:stop] = idx.numpy()
    return torch.from_numpy(out_v), torch.from_numpy(out_i)


def _faiss_search_complete(
    xq: np.ndarray, xb: np.ndarray, need: int, metric: Similarity, slack: int = 1
) -> tuple[Tensor, Tensor]:
    """FAISS top-``need`` of ``xq`` against ``xb`` (flat, no index), ties by lower index."""
    import faiss

    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def search(queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        return _faiss_knn(np.ascontiguousarray(queries), xb, depth, faiss_metric)

    return search_complete(search, xq, xb.shape[0], need, metric != "l2", slack)


def search_complete(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    xq: np.ndarray,
    num_reference: int,
    need: int,
    descending: bool,
    slack: int = 1,
) -> tuple[Tensor, Tensor]:
    """Top-``need`` per row from a FAISS-style ``search(queries, depth)``, in (value, lower
    index first) order, for flat search and FAISS indexes alike.

    FAISS returns an arbitrary subset of a group of equal values at its cut-off, so ``slack``
    extra results are requested (one is enough to see whether the group at position ``need``
    goes on past it; more only costs time at the GEMM limit); rows whose tie group at
    position ``need`` reaches the last returned value are searched again, twice as deep,
    until the group is complete.
    """
    depth = min(num_reference, need + slack)
    vals_np, idx_np = search(xq, depth)
    vals, idx = _sort_ties_by_index(torch.from_numpy(vals_np), torch.from_numpy(idx_np), descending)
    rows = torch.arange(xq.shape[0])
    cur = vals
    while depth < num_reference:
        unsure = (cur[:, need - 1] == cur[:, depth - 1]).nonzero()[:, 0]
        if unsure.numel() == 0:
            break
        rows = rows[unsure]
        depth = min(num_reference, 2 * depth)
        v_np, i_np = search(xq[rows.numpy()], depth)
        cur, cur_i = _sort_ties_by_index(torch.from_numpy(v_np), torch.from_numpy(i_np), descending)
        vals[rows, :need], idx[rows, :need] = cur[:, :need], cur_i[:, :need]
    return vals[:, :need], idx[:, :need]


def _drop_excluded(
    vals: Tensor, idx: Tensor, k: int, exclude: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Remove each row's excluded reference item (if returned) and keep ``k`` columns."""
    if exclude is not None and idx.shape[1] > k:
        cols = kept_columns(idx, exclude, k)
        return vals.gather(1, cols), idx.gather(1, cols)
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


def _sort_ties_by_index(vals: Tensor, idx: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """Order each row by value, equal values by index (input rows are sorted by value)."""
    if vals.shape[1] < 2:
        return vals, idx
    tied = (vals[:, 1:] == vals[:, :-1]).any(1).nonzero()[:, 0]
    if tied.numel() == 0:
        return vals, idx
    if tied.numel() < vals.shape[0]:
        vals, idx = vals.clone(), idx.clone()
        vals[tied], idx[tied] = order_ties(vals[tied], idx[tied], descending)
        return vals, idx
    return order_ties(vals, idx, descending)


# ---------------------------------------------------------------- torch (accelerator) path


def _scores(q: Tensor, r: Tensor, metric: Similarity) -> Tensor:
    s = q @ r.T
    if metric == "l2":
        # Squared distance, negated so that larger is better for top-k.
        s = 2 * s - (q * q).sum(1, keepdim=True) - (r * r).sum(1)[None, :]
    return s


def _torch_chunk(num_reference: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size:
        return chunk_size
    elements = _TORCH_BLOCK_ELEMENTS
    if device.type == "cuda":
        # A score block of a few GB keeps the GEMMs large; 1/16 of free memory leaves room
        # for top-k workspace and the float16 copy of the reference.
        free, _ = torch.cuda.mem_get_info(device)
        elements = max(elements, free // 16 // 4)
    return max(1, min(8192, elements // max(num_reference, 1)))


def _knn_torch(
    q: Tensor,
    r: Tensor,
    k: int,
    metric: Similarity,
    exclude: Tensor | None,
    chunk_size: int | None,
    fast: bool,
) -> tuple[Tensor, Tensor]:
    nq = q.shape[0]
    out_v = torch.empty((nq, k), dtype=torch.float32, device=q.device)
    out_i = torch.empty((nq, k), dtype=torch.int64, device=q.device)
    chunk = _torch_chunk(r.shape[0], chunk_size, q.device)
    # TF32 would silently make the "exact" search approximate.
    with _no_tf32():
        r16 = r.half() if fast else None
        for start in range(0, nq, chunk):
            stop = min(start + chunk, nq)
            ex = exclude[start:stop] if exclude is not None else None
            if r16 is not None:
                v, i = _fast_chunk(q[start:stop], r, r16, k, ex)
            else:
                v, i = _exact_chunk(q[start:stop], r, k, metric, ex)
            out_v[start:stop], out_i[start:stop] = v, i
    return out_v, out_i


class _no_tf32:
    def __enter__(self) -> None:
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _mask_excluded(s: Tensor, exclude: Tensor | None) -> None:
    if exclude is None:
        return
    rows = (exclude >= 0).nonzero()[:, 0]
    s[rows, exclude[rows]] = -torch.inf


def _exact_chunk(
    q: Tensor, r: Tensor, k: int, metric: Similarity, exclude: Tensor | None
) -> tuple[Tensor, Tensor]:
    s = _scores(q, r, metric)
    _mask_excluded(s, exclude)
    v, i = topk_lowest_index(s, k)
    return (-v if metric == "l2" else v), i


def topk_lowest_index(s: Tensor, k: int, slack: int = 8) -> tuple[Tensor, Tensor]:
    """Row-wise top-``k`` of ``s`` (descending), equal values ordered by column index.

    ``torch.topk`` makes no promise about which of several equal values it returns, so a few
    extra candidates are taken and ordered lexicographically; rows whose tie group at the
    cut-off may extend past the candidates fall back to a full stable sort.
    """
    n = s.shape[1]
    kc = min(n, k + slack)
    v, i = torch.topk(s, kc, dim=1)
    v, i = _sort_ties_by_index(v, i, descending=True)
    if kc < n:
        unsure = (v[:, kc - 1] == v[:, k - 1]).nonzero()[:, 0]
        if unsure.numel():
            sv, si = torch.sort(s[unsure], dim=1, descending=True, stable=True)
            v[unsure, :k], i[unsure, :k] = sv[:, :k], si[:, :k]
    return v[:, :k], i[:, :k]


def _fp16_error_bound(dim: int) -> float:
    """Bound on |fp16 matmul score - exact score| for unit-norm rows.

    Rounding q and r to float16 moves q.r by at most (2u + u^2) |q||r| (u = 2^-11, relative)
    plus dim * 2^-25 for subnormals, float32 accumulation adds dim * 2^-24, and rounding the
    float16 output adds half an ulp at |score| <= 1 + eps (2^-11).
    """
    u = 2.0**-11
    return 1.25 * (2 * u + u * u + dim * 2.0**-25 * 2 + dim * 2.0**-24 + 2.0**-11)


def _fast_chunk(
    q: Tensor, r: Tensor, r16: Tensor, k: int, exclude: Tensor | None, extra: int = 32
) -> tuple[Tensor, Tensor]:
    n = r.shape[0]
    kc = min(n, k + extra)
    approx = q.half() @ r16.T
    _mask_excluded(approx, exclude)
    a_v, cand = torch.topk(approx, kc, dim=1)
    del approx
    # Exact float32 scores of the candidates, then the exact order among them.
    exact = torch.bmm(r[cand], q[:, :, None])[:, :, 0]
    if exclude is not None:
        exact = exact.masked_fill(cand == exclude[:, None], -torch.inf)
    v, i = order_ties(exact, cand, descending=True)
    if kc == n:
        return v[:, :k], i[:, :k]
    # Anything outside the candidates scores at most a_v[:, -1] + bound exactly; if the k-th
    # exact score is strictly above that, no outsider can enter or tie into the top k.
    bound = _fp16_error_bound(q.shape[1])
    unsure = ~(v[:, k - 1] > a_v[:, -1].float() + bound)
    unsure |= ~torch.isfinite(a_v[:, -1])
    rows = unsure.nonzero()[:, 0]
    v, i = v[:, :k].clone(), i[:, :k].clone()
    if rows.numel():
        ev, ei = _exact_chunk(q[rows], r, k, "ip", exclude[rows] if exclude is not None else None)
        v[rows], i[rows] = ev, ei
    return v, i
