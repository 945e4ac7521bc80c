"""Retrieval metrics with the reference set kept sharded across DDP ranks.

The gathered path (:class:`~lightning_metric.retrieval.RetrievalMetrics` by default) copies
every embedding to every rank: ``N * D * 4`` bytes per rank, several times over while it
orders and prepares them. Here each rank keeps only the rows it embedded (DistributedSampler
padding dropped), and

1. the one-process order of every row is worked out from the per-rank row counts alone
   (:func:`interleaved_positions`, the order ``distributed.unpad_gathered`` gives), so each
   row knows its global query position and reference id without any gather;
2. ``R`` of every query comes from a class histogram summed over ranks, ``R_max`` and the
   search depth from an all-reduce: the depth is global, as in one process;
3. each rank's scorable queries are broadcast in blocks; every rank searches its reference
   rows ``depth + 1`` deep (its share of the top ``depth``, even when the query's own row is
   among them) and sends (score, global id, label) to the block's owner, which merges them
   with :func:`merge_candidates`: equal scores by lower global id, the order exact search
   gives in one process (:func:`~.protocol.order_ties`);
4. per-query values are computed by the same functions as in one process and gathered in
   query order, so the means are the same float sums.

Peak embedding memory per rank is its ``N / W`` rows (a view of them is searched when its
reference rows are consecutive, as when a query loader precedes a gallery loader) and one
query block; the bookkeeping is a few integers per local row, the table of class labels
(built from every rank's distinct labels) with its histogram and, at the end, the
per-query values (8 bytes per query and metric, on every rank).

Not shardable, refused by :class:`~lightning_metric.retrieval.RetrievalMetrics` at
construction: re-ranking (needs the whole distance matrix), clustering (a k-means over all
queries), multi-label and hierarchical labels, ``binary_rescore``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_metric.distributed import padding_count, rank, unpad_gathered, world_size
from lightning_metric.retrieval.knn import Similarity, check_embeddings, prepare, search_prepared
from lightning_metric.retrieval.quantization import (
    Calibration,
    EncodedReference,
    Precision,
    binarize,
    prefix,
    quantize_int8,
)
from lightning_metric.retrieval.ranking import (
    Average,
    PerQuery,
    Scoring,
    averaged,
    match_values,
    warn_unscorable,
)

__all__ = [
    "Layout",
    "ShardedOptions",
    "interleaved_positions",
    "layout",
    "merge_candidates",
    "repeats_local",
    "sharded_metrics",
]

# Candidate entries (block queries x ranks x depth) merged at once by a block's owner.
_MERGE_BLOCK_ELEMENTS = 1 << 22
# Queries broadcast at once at most.
_BLOCK_QUERIES = 1 << 14


def interleaved_positions(counts: Sequence[int], rank: int, padded: int = 0) -> Tensor:
    """Position in one-process order of each of rank ``rank``'s rows, ``-1`` for padding.

    DistributedSampler gives rank ``r`` the items at positions ``r, r + W, ...``; with
    ``counts[r]`` rows on rank ``r`` the order is that of ``r + i * W`` over all rows (as
    :func:`~lightning_metric.distributed.unpad_gathered` sorts them), and the last
    ``padded`` positions are the sampler's padding.

    >>> interleaved_positions([3, 2], 0).tolist(), interleaved_positions([3, 2], 1).tolist()
    ([0, 2, 4], [1, 3])
    >>> interleaved_positions([2, 2], 1, padded=1).tolist()
    [1, -1]
    """
    n = torch.tensor(list(counts), dtype=torch.int64)
    i = torch.arange(int(n[rank]), dtype=torch.int64)
    before = (torch.arange(len(n)) < rank).long()
    # Rows of rank r' ahead of row i: min(n_r', i + 1) for r' < rank, min(n_r', i) after it.
    pos = torch.minimum(n[None, :], i[:, None] + before[None, :]).sum(1)
    kept = int(n.sum()) - padded
    return torch.where(pos < kept, pos, torch.full_like(pos, -1))


def merge_candidates(
    values: Tensor, ids: Tensor, labels: Tensor, depth: int, descending: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``depth`` of each row of candidates ``[Q, n]`` from several shards: best
    value first, equal values by lower global id (:func:`~.protocol.order_ties`), so the
    list is the one exact search over all rows gives. Empty slots carry the worst value
    (``-inf`` descending, ``+inf`` ascending) and a larger id than any real one.

    >>> v = torch.tensor([[0.5, 0.9, 0.5, float("-inf")]])
    >>> i, lab = torch.tensor([[7, 4, 3, 99]]), torch.tensor([[1, 2, 3, -1]])
    >>> [t.tolist() for t in merge_candidates(v, i, lab, 2, True)[1:]]
    [[[4, 3]], [[2, 3]]]
    """
    order = torch.argsort(ids, dim=1, stable=True)
    v, i, lab = values.gather(1, order), ids.gather(1, order), labels.gather(1, order)
    order = torch.argsort(v, dim=1, descending=descending, stable=True)[:, :depth]
    return v.gather(1, order), i.gather(1, order), lab.gather(1, order)


@dataclass
class Layout:
    """Where this rank's rows sit in the one-process evaluation (``-1``: not there)."""

    query: Tensor  # [n] position among all queries
    reference: Tensor  # [n] reference id (position among the reference rows)
    own: Tensor  # [n] bool: a query whose own row is a reference (excluded from its list)
    num_queries: int
    num_references: int
    any_own: bool  # some query anywhere has its own row among the references
    split: bool  # some rows only query or are only searched (a query/gallery protocol)


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


def _all_gather_counts(n: int, device: torch.device) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    return [int(p) for p in parts]


def _gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def _positions(
    rows: Tensor, index: Tensor, has_index: bool, dataset_size: int | None, device: torch.device
) -> tuple[Tensor, int]:
    """One-process positions of this rank's ``rows`` of one role, and how many are kept."""
    world, me = world_size(), rank()
    counts = _all_gather_counts(rows.numel(), device)
    g = sum(counts)
    if dataset_size is None and has_index:
        # Padding inferred from repeated indexes: needs every index once (8 bytes per row);
        # RecallAtK passes the dataset size, which needs only the counts.
        gathered = _gather_rows(index[rows], counts)
        ranks = torch.repeat_interleave(
            torch.arange(world, device=device), torch.tensor(counts, device=device)
        )
        keep = unpad_gathered(ranks, world, gathered, None)
        pos = torch.full((g,), -1, dtype=torch.int64, device=device)
        pos[keep] = torch.arange(keep.numel(), device=device)
        start = sum(counts[:me])
        return pos[start : start + counts[me]], int(keep.numel())
    padded = padding_count(
        torch.tensor(counts), world, torch.empty(0, dtype=torch.int64), None, dataset_size
    )
    return interleaved_positions(counts, me, padded).to(device), g - padded


def layout(
    roles: Tensor, index: Tensor, dataset_sizes: dict[int, int], device: torch.device
) -> Layout:
    """:class:`Layout` of this rank's rows (``roles``: the accumulator's codes, bit 1 query,
    bit 2 reference) in the order one process would see them: rows by role code, each role
    in sampler order without its padding."""
    local = torch.tensor([int(bool((index >= 0).all()))], device=device)
    has_index = bool(_all_reduce(local, dist.ReduceOp.MIN))
    present = torch.zeros(4, dtype=torch.int64, device=device)
    present[roles.long().unique()] = 1
    present = _all_reduce(present, dist.ReduceOp.MAX)
    n = roles.numel()
    query = torch.full((n,), -1, dtype=torch.int64, device=device)
    reference = torch.full((n,), -1, dtype=torch.int64, device=device)
    queries = references = 0
    for code in (1, 2, 3):
        if not present[code]:
            continue
        rows = (roles == code).nonzero()[:, 0]
        pos, kept = _positions(rows, index, has_index, dataset_sizes.get(code), device)
        valid = pos >= 0
        if code & 1:
            query[rows[valid]] = queries + pos[valid]
            queries += kept
        if code & 2:
            reference[rows[valid]] = references + pos[valid]
            references += kept
    own = (query >= 0) & (reference >= 0)
    split = bool(present[1] or present[2])
    return Layout(query, reference, own, queries, references, bool(present[3]), split)


@dataclass
class _Shard:
    """This rank's reference rows, sorted by global id, ready to search."""

    vectors: Tensor  # prepared float [n, d]
    encoded: EncodedReference | None
    ids: Tensor  # [n] global reference ids, ascending
    labels: Tensor  # [n]
    descending: bool


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]``, a view when ``rows`` is a run of consecutive rows (leave-one-out: all of
    them; a gallery loader after a query loader: the gallery's), else a copy."""
    if rows.numel() == 0:
        return x[rows]
    first = int(rows[0])
    run = torch.arange(first, first + rows.numel(), device=rows.device)
    if bool((rows == run).all()):
        return x[first : first + rows.numel()]
    return x[rows]


def _shard(
    x: Tensor,
    labels: Tensor,
    lay: Layout,
    metric: Similarity,
    precision: Precision,
    rescore_multiplier: int,
) -> tuple[_Shard, Tensor]:
    """The reference shard and the prepared query rows (same ``x`` rows, one copy)."""
    prepared = prepare(x, metric)
    rows = (lay.reference >= 0).nonzero()[:, 0]
    rows = rows[torch.argsort(lay.reference[rows])]
    vectors = _take(prepared, rows)
    search_metric: Literal["ip", "l2"] = "l2" if metric == "l2" else "ip"
    encoded = None
    if precision == "int8":
        # Ranges of the whole reference set (min and max are exact over ranks), never a shard's.
        low = vectors.amin(0) if len(vectors) else torch.full((x.shape[1],), float("inf"))
        high = vectors.amax(0) if len(vectors) else torch.full((x.shape[1],), float("-inf"))
        low = _all_reduce(low.to(x.device), dist.ReduceOp.MIN)
        high = _all_reduce(high.to(x.device), dist.ReduceOp.MAX)
        calibration = Calibration(low, high)
        codes = quantize_int8(vectors, calibration)
        encoded = EncodedReference(
            precision, vectors, codes, calibration, search_metric, rescore_multiplier
        )
    elif precision == "binary":
        encoded = EncodedReference(
            precision, vectors, binarize(vectors), None, search_metric, rescore_multiplier
        )
    descending = metric != "l2" and precision != "binary"
    return _Shard(vectors, encoded, lay.reference[rows], labels[rows], descending), prepared


def _local_candidates(shard: _Shard, block: Tensor, own: Tensor, depth: int) -> Tensor:
    """``[b, depth + 1, 3]`` float64 (score, global id, label) of the shard's best rows for
    each query of ``block``, the query's own row (global id ``own``, ``-1``: none) blanked."""
    b, width = block.shape[0], depth + 1
    worst = float("-inf") if shard.descending else float("inf")
    out = torch.empty((b, width, 3), dtype=torch.float64, device=block.device)
    out[..., 0], out[..., 1], out[..., 2] = worst, float(2**62), -1.0
    n = shard.ids.numel()
    if n == 0 or b == 0:
        return out
    k = min(width, n)
    if shard.encoded is None:
        metric: Similarity = "ip" if shard.descending else "l2"
        found = search_prepared(block, shard.vectors, k, metric, None)
    else:
        found = shard.encoded.search(block, k, None)
    ids = shard.ids[found.indices]
    mine = ids == own[:, None]
    out[:, :k, 0] = found.values.double().masked_fill(mine, worst)
    out[:, :k, 1] = ids.double().masked_fill(mine, float(2**62))
    out[:, :k, 2] = shard.labels[found.indices].double().masked_fill(mine, -1.0)
    return out


def _search(
    shard: _Shard,
    queries: Tensor,
    own: Tensor,
    depth: int,
    on_block: Callable[[Tensor, Tensor], None],
) -> None:
    """Every rank's queries against every rank's shard; ``on_block(rows, labels)`` is
    called on the owner of each block with its merged neighbour lists."""
    world, me = world_size(), rank()
    device = queries.device
    counts = _all_gather_counts(queries.shape[0], device)
    dim = queries.shape[1]
    step = max(1, min(_BLOCK_QUERIES, _MERGE_BLOCK_ELEMENTS // ((depth + 1) * world)))
    for source in range(world):
        for start in range(0, counts[source], step):
            b = min(step, counts[source] - start)
            if source == me:
                block = queries[start : start + b].contiguous()
                block_own = own[start : start + b].contiguous()
            else:
                block = torch.empty((b, dim), dtype=queries.dtype, device=device)
                block_own = torch.empty((b,), dtype=torch.int64, device=device)
            dist.broadcast(block, src=source)
            dist.broadcast(block_own, src=source)
            found = _local_candidates(shard, block, block_own, depth)
            parts = [torch.empty_like(found) for _ in range(world)] if source == me else None
            dist.gather(found, parts, dst=source)
            if parts is not None:
                merged = torch.cat(parts, dim=1)
                _, _, labels = merge_candidates(
                    merged[..., 0], merged[..., 1], merged[..., 2], depth, shard.descending
                )
                on_block(torch.arange(start, start + b, device=device), labels.long())


def _check_local(x: Tensor) -> None:
    """Bad embeddings on one rank raise on every rank (the others would wait in a
    collective until the group's timeout)."""
    error: Exception | None = None
    try:
        check_embeddings(x, "embeddings")
    except (ValueError, TypeError) as exc:
        error = exc
    bad = _all_reduce(torch.tensor([int(error is not None)], device=x.device), dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(bad):
        raise ValueError("RetrievalMetrics(shard_reference=True): another rank got bad embeddings")


@dataclass
class ShardedOptions:
    """What :func:`sharded_metrics` computes (RetrievalMetrics' own arguments)."""

    metric: Similarity
    map_at_r: bool
    mrr: bool
    precision: bool
    average: Average


def sharded_metrics(
    embeddings: Tensor,
    labels: Tensor,
    lay: Layout,
    ks: tuple[int, ...],
    o: ShardedOptions,
    dim: int | None = None,
    quantization: Precision = "float32",
    rescore_multiplier: int = 4,
) -> dict[str, float]:
    """:func:`~lightning_metric.retrieval.retrieval_metrics` of the rows of every rank
    (single labels) at the cut-offs ``ks`` (already clamped to the candidates), with each
    rank holding only its own rows. Every rank returns the same values."""
    device = embeddings.device
    _check_local(embeddings)
    x = embeddings if dim is None else prefix(embeddings, dim)
    shard, prepared = _shard(x, labels, lay, o.metric, quantization, rescore_multiplier)
    ref_rows = (lay.reference >= 0).nonzero()[:, 0]
    # R: the class histogram of all reference rows, minus the query's own row. Classes are
    # numbered by the sorted table of every rank's labels (any int64 labels, as in one
    # process; its size is the number of classes, not the label range).
    local_classes = torch.unique(labels)
    classes = torch.unique(
        _gather_rows(local_classes, _all_gather_counts(local_classes.numel(), device))
    )
    class_of = torch.searchsorted(classes, labels)
    histogram = _all_reduce(torch.bincount(class_of[ref_rows], minlength=classes.numel()))
    is_query = lay.query >= 0
    qrows = is_query.nonzero()[:, 0]
    qrows = qrows[torch.argsort(lay.query[qrows])]
    r = histogram[class_of[qrows]] - lay.own[qrows].long()
    scorable = r > 0
    scored = int(_all_reduce(scorable.sum().reshape(1)))
    unscorable = lay.num_queries - scored
    local_max = r[scorable].max() if bool(scorable.any()) else r.new_zeros(())
    r_max = int(_all_reduce(local_max.reshape(1), dist.ReduceOp.MAX))
    depth = max(ks[-1], r_max if (o.map_at_r or o.mrr) else 0)
    scoring = Scoring(o.metric, o.map_at_r, o.mrr, o.precision, None, None)
    empty = torch.zeros((0, depth), dtype=torch.bool)
    names = list(match_values(empty, r.new_zeros(0), ks, scoring, max(r_max, 1)))
    rows = qrows[scorable]
    own = torch.where(lay.own[rows], lay.reference[rows], torch.full_like(rows, -1))
    values = torch.empty((rows.numel(), len(names) + 2), dtype=torch.float64, device=device)
    values[:, 0] = lay.query[rows].double()
    values[:, 1] = labels[rows].double()
    query_labels, query_r = labels[rows], r[scorable]

    def on_block(block_rows: Tensor, neighbour_labels: Tensor) -> None:
        match = neighbour_labels == query_labels[block_rows][:, None]
        per_query = match_values(match, query_r[block_rows], ks, scoring, r_max)
        for j, name in enumerate(names):
            values[block_rows, j + 2] = per_query[name]

    if scored:
        _search(shard, _take(prepared, rows), own, depth, on_block)
    del shard, prepared
    counts = _all_gather_counts(values.shape[0], device)
    everything = _gather_rows(values, counts)
    everything = everything[torch.argsort(everything[:, 0])]
    pq = PerQuery(
        everything[:, 1].long() if o.average == "macro" else None,
        # Contiguous, as in one process: a strided column may be summed in another order.
        {name: everything[:, j + 2].contiguous() for j, name in enumerate(names)},
        lay.num_queries,
        unscorable,
    )
    if unscorable == lay.num_queries:
        warn_unscorable(lay.num_queries)
    return averaged(pq, o.average)


def repeats_local(embeddings: Tensor, labels: Tensor, roles: Tensor, lay: Layout) -> bool:
    """Whether the reference rows are the query rows again, on every rank (the same set
    loaded twice is split over the ranks the same way): the caller then evaluates the
    queries leave-one-out. Sharded counterpart of :func:`~.protocol.repeats_queries`."""
    device = embeddings.device
    if lay.any_own or lay.num_queries != lay.num_references:
        return False
    q = ((roles == 1) & (lay.query >= 0)).nonzero()[:, 0]
    ref = ((roles == 2) & (lay.reference >= 0)).nonzero()[:, 0]
    q = q[torch.argsort(lay.query[q])]
    ref = ref[torch.argsort(lay.reference[ref])]
    same = q.numel() == ref.numel() and bool(
        torch.equal(embeddings[q], embeddings[ref]) and torch.equal(labels[q], labels[ref])
    )
    return bool(_all_reduce(torch.tensor([int(same)], device=device), dist.ReduceOp.MIN))


def warn_repeated() -> None:
    warnings.warn(
        "RetrievalMetrics: the reference items are the query items again (same "
        "embeddings and labels); evaluating them leave-one-out instead, so that no "
        "query retrieves itself",
        UserWarning,
        stacklevel=4,
    )
