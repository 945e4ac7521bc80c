"""Compact embeddings: Matryoshka prefixes, int8 and binary codes, and exact search on codes.

What each precision keeps of a ``d``-dimensional (prefix) vector:

- ``float32``: everything, ``4 * d`` bytes.
- ``int8``: each coordinate to 1/255 of its range in the reference set, ``d`` bytes. The
  per-dimension ranges are a :class:`Calibration` computed once from the reference
  (calibration) set by :func:`calibrate` and stored with the codes; queries are coded with the
  reference's ranges, never their own, so one query gets the codes it gets in any batch. A
  value outside the range saturates at the end code. The codes are FAISS's
  ``ScalarQuantizer(QT_8bit)`` codes minus 128 (``codes.view(torch.uint8) ^ 0x80`` gives
  FAISS's), encoded and decoded with the same formulas, so a FAISS scalar-quantizer index
  trained with these ranges holds the same vectors.
- ``binary``: the sign of each coordinate, ``ceil(d / 8)`` bytes, packed as
  ``np.packbits(x > 0, axis=1)`` (FAISS's ``IndexBinaryFlat`` layout): no range, no
  calibration; distances are Hamming distances.
- ``binary_rescore``: the binary codes find ``rescore_multiplier * k`` candidates, which are
  re-ranked by the float vectors. The in-memory search structure is the binary codes; the
  float vectors are read only for the candidates (from disk or a memory map in a deployment),
  so :func:`bytes_per_vector` counts the codes alone.

Search is exact for the codes: :func:`search_codes` ranks int8 codes by the similarity of
the float query to the *decoded* references (asymmetric, what FAISS's
``IndexScalarQuantizer`` computes; an int8 query is decoded first) and binary codes by
Hamming distance. Both run through :func:`~.knn.search_prepared`, so the self-match rules
(``exclude``, :mod:`~.protocol`) and the ties (lower reference row first) are those of float
retrieval. :func:`~lightning_metric.retrieval.retrieval_metrics` takes ``dim`` and
``quantization`` to score one prefix x precision; ``RecallAtK(dims=..., precisions=...)``
logs the whole grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_metric.checks import (
    ArgumentTypeError,
    check_choice,
    check_dims,
    check_int,
    check_range,
    check_top_k,
)
from lightning_metric.retrieval.knn import (
    Neighbors,
    as_tensor,
    check_embeddings,
    check_exclude,
    search_prepared,
)
from lightning_metric.retrieval.protocol import num_candidates, order_ties

__all__ = [
    "PRECISIONS",
    "Calibration",
    "Precision",
    "binarize",
    "bytes_per_vector",
    "calibrate",
    "check_dims",
    "check_precisions",
    "dequantize_int8",
    "hamming",
    "prefix",
    "quantize_int8",
    "rescore",
    "search_codes",
]

Precision = Literal["float32", "int8", "binary", "binary_rescore"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Levels of an 8-bit code; FAISS's QT_8bit uses the same 255 steps over [low, high].
_STEPS = 255.0
# Elements of the [queries, candidates, dim] block gathered at once by rescore.
_RESCORE_BLOCK_ELEMENTS = 1 << 24
# Popcount of every byte value, for hamming().
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
# Bit weights of one packed byte, most significant first (np.packbits' order).
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-dimension ranges ``low [d]`` and ``high [d]`` (float32) of int8 codes.

    >>> c = Calibration(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.5]))
    >>> c.dim, Calibration.from_dict(c.to_dict()).high.tolist()
    (2, [1.0, 0.5])
    """

    low: Tensor
    high: Tensor

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.ndim != 1 or value.numel() == 0:
                raise ArgumentTypeError(
                    f"Calibration `{name}` must be a non-empty 1-D tensor [dim], got "
                    f"{type(value).__name__}"
                    + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"Calibration `{name}` holds NaN or Inf: {value.tolist()}")
            # Frozen: set through object.__setattr__ (the stored ranges are float32 copies).
            object.__setattr__(self, name, value.detach().to(torch.float32).clone())
        if self.low.shape != self.high.shape:
            raise ValueError(
                f"Calibration `low` and `high` must have the same dimension, got "
                f"{self.low.numel()} and {self.high.numel()}"
            )
        bad = (self.low > self.high).nonzero()[:, 0]
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"Calibration `low` must be <= `high` in every dimension, got "
                f"low={float(self.low[i])} > high={float(self.high[i])} in dimension {i}"
            )

    @property
    def dim(self) -> int:
        return self.low.numel()

    def to_dict(self) -> dict[str, list[float]]:
        """``{"low": [...], "high": [...]}``; float32 values survive a JSON round trip."""
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        if not isinstance(data, dict) or set(data) != {"low", "high"}:
            raise ValueError(
                "a calibration record must be a dict with exactly the keys 'low' and 'high', "
                f"got {data!r:.200}"
            )
        try:
            low = torch.tensor(data["low"], dtype=torch.float32)
            high = torch.tensor(data["high"], dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"a calibration record's 'low' and 'high' must be lists of numbers, got "
                f"{data!r:.200}"
            ) from err
        return cls(low, high)


def _embeddings(x: Any, name: str) -> Tensor:
    t = as_tensor(x, name)
    check_embeddings(t, name)
    return t


def calibrate(reference: Tensor, quantile: float | None = None) -> Calibration:
    """int8 ranges from the reference (calibration) set, never from the queries.

    ``quantile=None`` takes each dimension's min and max, so every reference vector is coded
    without clipping (the default: unit-norm embeddings rarely have outliers worth cutting,
    and clipping the reference moves the items that are searched). ``quantile=q`` in
    ``(0, 0.5)`` takes the ``q`` and ``1 - q`` order statistics instead (nearest rank: data
    values), trading saturated outliers for finer steps on heavy-tailed dimensions.

    >>> x = torch.tensor([[0.0, -2.0], [1.0, 4.0], [0.5, 1.0]])
    >>> c = calibrate(x)
    >>> c.low.tolist(), c.high.tolist()
    ([0.0, -2.0], [1.0, 4.0])
    """
    x = _embeddings(reference, "reference").detach().float()
    if quantile is None:
        return Calibration(x.amin(0), x.amax(0))
    q = check_range("quantile", quantile, 0.0, 0.5, low_open=True, high_open=True)
    n = x.shape[0]
    # torch.quantile refuses large inputs; kthvalue is the exact order statistic.
    lo_rank = int(q * (n - 1)) + 1
    hi_rank = n - int(q * (n - 1))
    return Calibration(x.kthvalue(lo_rank, 0).values, x.kthvalue(hi_rank, 0).values)


def prefix(embeddings: Tensor, dim: int) -> Tensor:
    """The Matryoshka prefix of size ``dim``: the first ``dim`` coordinates, L2-normalised
    (float32; an all-zero prefix stays zero, as in :func:`~.knn.prepare`).

    >>> prefix(torch.tensor([[3.0, 4.0, 12.0]]), 2).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    x = _embeddings(embeddings, "embeddings")
    d = check_int("dim", dim, minimum=1, maximum=x.shape[1])
    return torch.nn.functional.normalize(x.detach()[:, :d].float(), dim=1)


def _check_calibration(calibration: Any, dim: int, what: str) -> Calibration:
    if not isinstance(calibration, Calibration):
        raise ArgumentTypeError(
            f"`calibration` must be a Calibration (from calibrate(reference)), got "
            f"{type(calibration).__name__}"
        )
    if calibration.dim != dim:
        raise ValueError(
            f"`calibration` has {calibration.dim} dimensions but {what} has {dim}: calibrate "
            f"on reference vectors of the same dimension (for a prefix: "
            f"calibrate(prefix(reference, {dim})))"
        )
    return calibration


def quantize_int8(x: Tensor, calibration: Calibration) -> Tensor:
    """int8 codes ``[N, d]`` of ``x`` with the reference's ranges: FAISS's ``QT_8bit`` code
    ``trunc(255 * clamp((x - low) / (high - low), 0, 1))`` minus 128. A dimension with
    ``low == high`` codes everything as -128.

    >>> c = Calibration(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0]))
    >>> quantize_int8(torch.tensor([[0.0, 1.0], [1.0, -3.0], [0.5, 0.0]]), c).tolist()
    [[-128, 127], [127, -128], [-1, -1]]
    """
    t = _embeddings(x, "embeddings")
    c = _check_calibration(calibration, t.shape[1], "`embeddings`")
    low, high = c.low.to(t.device), c.high.to(t.device)
    span = high - low
    scaled = torch.where(span > 0, (t.detach().float() - low) / span.clamp_min(1e-38), 0.0)
    codes = (_STEPS * scaled.clamp(0.0, 1.0)).to(torch.int32)  # truncation, as FAISS
    return (codes - 128).to(torch.int8)


def dequantize_int8(codes: Tensor, calibration: Calibration) -> Tensor:
    """float32 vectors ``[N, d]`` of int8 codes: the centre of each code's step,
    ``low + (code + 128 + 0.5) / 255 * (high - low)`` (FAISS's decoding).

    >>> c = Calibration(torch.tensor([0.0]), torch.tensor([255.0]))
    >>> dequantize_int8(torch.tensor([[-128], [0], [127]], dtype=torch.int8), c).tolist()
    [[0.5], [128.5], [255.5]]
    """
    codes = _codes(codes, torch.int8, "codes")
    c = _check_calibration(calibration, codes.shape[1], "`codes`")
    low, high = c.low.to(codes.device), c.high.to(codes.device)
    return low + ((codes.to(torch.float32) + 128.0) + 0.5) / _STEPS * (high - low)


def binarize(x: Tensor) -> Tensor:
    """Sign bits ``x > 0`` packed 8 to a byte, ``uint8 [N, ceil(d / 8)]``, in
    ``np.packbits(x > 0, axis=1)`` order (first coordinate in the high bit; the last byte
    padded with zero bits): the layout of FAISS's ``IndexBinaryFlat``.

    >>> binarize(torch.tensor([[1.0, -1.0, 0.0, 2.0, 0.5, -3.0, 1.0, 1.0, 4.0]])).tolist()
    [[155, 128]]
    """
    t = _embeddings(x, "embeddings")
    n, d = t.shape
    bits = torch.zeros(n, -(-d // 8) * 8, dtype=torch.uint8, device=t.device)
    bits[:, :d] = t.detach() > 0
    weights = _BIT_WEIGHTS.to(t.device)
    return (bits.view(n, -1, 8) * weights).sum(2, dtype=torch.uint8)


def _codes(codes: Any, dtype: torch.dtype, name: str) -> Tensor:
    c = as_tensor(codes, name)
    if c.dtype != dtype or c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be non-empty {dtype} codes [num_items, width], got dtype {c.dtype} "
            f"and shape {tuple(c.shape)}"
            + (" (binary codes are uint8 from binarize())" if dtype == torch.uint8 else "")
            + (" (int8 codes come from quantize_int8())" if dtype == torch.int8 else "")
        )
    return c


def _signs(codes: Tensor) -> Tensor:
    """±1 float32 vectors of packed bits (padding bits read as -1 on every side, a constant
    that leaves the ranking unchanged)."""
    bits = (codes[:, :, None] & _BIT_WEIGHTS.to(codes.device)) > 0
    return bits.reshape(codes.shape[0], -1).to(torch.float32) * 2 - 1


def hamming(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Hamming distances ``int64 [len(a), len(b)]`` of packed binary codes
    (memory ``len(a) * len(b) * width`` bytes: for small sets; search uses :func:`search_codes`).

    >>> x = binarize(torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]]))
    >>> hamming(x, x).tolist()
    [[0, 2], [2, 0]]
    """
    a = _codes(a, torch.uint8, "a")
    b = _codes(b, torch.uint8, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`a` has {a.shape[1]} bytes per code but `b` has {b.shape[1]}")
    xor = torch.bitwise_xor(a[:, None, :], b[None, :, :])
    return _POPCOUNT.to(a.device)[xor.long()].sum(2)


def bytes_per_vector(dim: int, precision: Precision) -> int:
    """Bytes one vector takes in the search structure (``binary_rescore``: the binary codes;
    its float vectors are read for the candidates only).

    >>> [bytes_per_vector(64, p) for p in ("float32", "int8", "binary", "binary_rescore")]
    [256, 64, 8, 8]
    """
    d = check_int("dim", dim, minimum=1)
    check_choice("precision", precision, PRECISIONS)
    return {"float32": 4 * d, "int8": d}.get(precision, -(-d // 8))


def check_precisions(precisions: Any, name: str = "precisions") -> tuple[Precision, ...]:
    """A non-empty sequence of distinct names from :data:`PRECISIONS`."""
    if isinstance(precisions, str | bytes) or not isinstance(precisions, Sequence):
        raise ArgumentTypeError(
            f"`{name}` must be a list of precisions from {PRECISIONS}, got {precisions!r}"
        )
    if not precisions:
        raise ValueError(f"`{name}` must hold at least one of {PRECISIONS}, got an empty list")
    for i, p in enumerate(precisions):
        check_choice(f"{name}[{i}]", p, PRECISIONS)
    if len(set(precisions)) != len(precisions):
        raise ValueError(f"`{name}` lists a precision twice: {list(precisions)}")
    return tuple(precisions)


def search_codes(
    query: Tensor,
    codes: Tensor,
    k: int,
    precision: Literal["int8", "binary"],
    *,
    calibration: Calibration | None = None,
    exclude: Tensor | None = None,
    metric: Literal["ip", "l2"] = "ip",
) -> Neighbors:
    """Exact ``k`` nearest reference codes of every query.

    - ``"int8"``: ``query`` float ``[Q, d]`` (or int8 codes, decoded first) against the
      decoded ``codes`` (``calibration`` of the reference), by inner product (descending) or
      squared L2 distance (ascending); the decoded vectors are not re-normalised.
    - ``"binary"``: ``query`` packed codes (or float vectors, binarized) against packed
      ``codes``, by Hamming distance (ascending, int64 values; ``metric`` is not used).

    ``exclude [Q]``: the reference row each query may not retrieve (``-1``: none), as in
    :func:`~.knn.knn`; ``torch.arange(N)`` searches a set leave-one-out. Ties: lower row first.

    >>> x = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
    >>> nn = search_codes(x, binarize(x), 1, "binary", exclude=torch.arange(3))
    >>> nn.indices[:, 0].tolist(), nn.values[:, 0].tolist()
    ([1, 0, 1], [1, 1, 2])
    """
    check_choice("precision", precision, ("int8", "binary"))
    check_choice("metric", metric, ("ip", "l2"))
    reference = _codes(codes, torch.int8 if precision == "int8" else torch.uint8, "codes")
    q = as_tensor(query, "query")
    is_code = q.dtype == reference.dtype
    q = _codes(q, reference.dtype, "query") if is_code else _embeddings(q, "query")
    if q.device != reference.device:
        raise ValueError(f"`query` is on {q.device} but `codes` are on {reference.device}")
    if precision == "int8":
        if calibration is None:
            raise ValueError(
                "int8 codes need their `calibration` (the reference set's ranges from "
                "calibrate()), got None"
            )
        c = _check_calibration(calibration, reference.shape[1], "`codes`")
        _check_width(q.shape[1], reference.shape[1], "dimensions")
        q = dequantize_int8(q, c) if is_code else q.float()
        r = dequantize_int8(reference, c)
    else:
        q = q if is_code else binarize(q)
        _check_width(q.shape[1], reference.shape[1], "bytes per code")
        # Hamming = (bits - <signs, signs>) / 2: the same order, in exact integers.
        q, r, metric = _signs(q), _signs(reference), "ip"
    ex = None if exclude is None else check_exclude(exclude, q.shape[0], r.shape[0]).to(q.device)
    check_top_k(k, num_candidates(r.shape[0], ex))
    nn = search_prepared(q.contiguous(), r.contiguous(), k, metric, ex, fast=False)
    if precision == "binary":
        bits = r.shape[1]
        return Neighbors(((bits - nn.values.round().long()) // 2), nn.indices)
    return nn


def _check_width(query: int, reference: int, unit: str) -> None:
    if query != reference:
        raise ValueError(
            f"`query` has {query} {unit} but the reference codes have {reference}: use the "
            "same prefix size (and precision) for both"
        )


def rescore(
    query: Tensor,
    reference: Tensor,
    candidates: Tensor,
    k: int,
    metric: Literal["ip", "l2"] = "ip",
) -> Neighbors:
    """The ``k`` best of each query's ``candidates [Q, C]`` (reference rows, e.g. from
    :func:`search_codes` at depth ``rescore_multiplier * k``) by the float vectors: inner
    product (descending) or squared L2 distance (ascending); ties: lower row first.

    >>> q = torch.tensor([[1.0, 0.0]])
    >>> ref = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    >>> rescore(q, ref, torch.tensor([[0, 1, 2]]), 2).indices.tolist()
    [[2, 1]]
    """
    check_choice("metric", metric, ("ip", "l2"))
    q = _embeddings(query, "query").float()
    r = _embeddings(reference, "reference").float()
    cand = as_tensor(candidates, "candidates")
    if cand.is_floating_point() or cand.dtype == torch.bool or cand.shape[:1] != q.shape[:1]:
        raise ValueError(
            f"`candidates` must be integer reference rows [{q.shape[0]}, C], got dtype "
            f"{cand.dtype} and shape {tuple(cand.shape)}"
        )
    if cand.ndim != 2 or (cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= len(r))):
        raise ValueError(
            f"`candidates` must be a 2-D array of reference rows in [0, {len(r)}), got shape "
            f"{tuple(cand.shape)}"
            + (f" and values in [{int(cand.min())}, {int(cand.max())}]" if cand.numel() else "")
        )
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"`query` has dim {q.shape[1]} but `reference` has dim {r.shape[1]}: re-score with "
            "the float vectors of the same prefix"
        )
    k = check_top_k(k, cand.shape[1], "candidates per query")
    cand = cand.to(device=q.device, dtype=torch.int64)
    values = torch.empty(cand.shape, dtype=torch.float32, device=q.device)
    step = max(1, _RESCORE_BLOCK_ELEMENTS // max(1, cand.shape[1] * q.shape[1]))
    for start in range(0, q.shape[0], step):
        block = r[cand[start : start + step]]  # [b, C, d]
        qb = q[start : start + step, :, None]
        if metric == "ip":
            values[start : start + step] = torch.bmm(block, qb)[:, :, 0]
        else:
            values[start : start + step] = ((block - qb.transpose(1, 2)) ** 2).sum(2)
    v, i = order_ties(values, cand, descending=metric == "ip")
    return Neighbors(v[:, :k].contiguous(), i[:, :k].contiguous())


@dataclass(frozen=True)
class EncodedReference:
    """A prepared reference set coded at one precision, searched by :meth:`search`: what
    :func:`~lightning_metric.retrieval.retrieval_metrics` uses for ``quantization``."""

    precision: Precision
    vectors: Tensor  # the prepared float reference, for re-scoring
    codes: Tensor
    calibration: Calibration | None
    metric: Literal["ip", "l2"]
    rescore_multiplier: int

    def search(self, query: Tensor, k: int, exclude: Tensor | None) -> Neighbors:
        """``k`` neighbours of prepared float ``query`` rows, ``exclude`` as in knn."""
        coded: Literal["int8", "binary"] = "int8" if self.precision == "int8" else "binary"
        if self.precision != "binary_rescore":
            return search_codes(
                query,
                self.codes,
                k,
                coded,
                calibration=self.calibration,
                exclude=exclude,
                metric=self.metric,
            )
        depth = min(self.rescore_multiplier * k, num_candidates(len(self.vectors), exclude))
        found = search_codes(query, self.codes, depth, "binary", exclude=exclude)
        return rescore(query, self.vectors, found.indices, k, self.metric)


def encode_reference(
    reference: Tensor,
    precision: Precision,
    metric: str,
    rescore_multiplier: int = 4,
) -> EncodedReference:
    """Code a reference set, already :func:`~.knn.prepare`-d for ``metric``, at a precision
    other than ``float32``; int8 ranges come from these reference rows. ``cosine`` searches
    by inner product: the rows are unit-norm already, and decoded vectors are compared as
    they are."""
    check_choice("quantization", precision, PRECISIONS[1:])
    m = check_int("rescore_multiplier", rescore_multiplier, minimum=1)
    search_metric: Literal["ip", "l2"] = "l2" if metric == "l2" else "ip"
    calibration = None
    if precision == "int8":
        calibration = calibrate(reference)
        codes = quantize_int8(reference, calibration)
    else:
        codes = binarize(reference)
    return EncodedReference(precision, reference, codes, calibration, search_metric, m)
