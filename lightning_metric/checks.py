"""Argument validation shared by every entry point, so the same bad value gets the same message.

Small pure functions: each takes the argument's public name and its value, returns the
normalised value (or ``None``) and raises where the value enters. Wrong *types* raise
:class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError`` so callers that
caught ``ValueError`` before keep working. Messages name the argument, the bad value and what
was expected.

Training-side checks are appended at the end of this module.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ArgumentTypeError",
    "check_choice",
    "check_factory_string",
    "check_finite_rows",
    "check_fraction",
    "check_int",
    "check_k",
    "check_labels",
    "check_num_classes",
    "check_positive_int",
    "check_positive_real",
    "check_range",
    "check_real",
    "check_training_size",
    "object_name",
]

T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError`` for callers that catch that)."""


def _is_int(value: object) -> bool:
    # bool is an int subclass but never a count; numpy integers are ints for every purpose here.
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def object_name(obj: object) -> str:
    """How messages name an argument that is a class, a ``functools.partial`` or an instance."""
    if obj is None:
        return "None"
    return (
        getattr(obj, "__name__", None)
        or getattr(getattr(obj, "func", None), "__name__", None)
        or type(obj).__name__
    )


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int; rejects bool, float (even 1.0) and str."""
    if minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None or maximum is not None:
        expected = f"an integer >= {minimum}" if minimum is not None else f"an integer <= {maximum}"
    else:
        expected = "an integer"
    if not _is_int(value):
        raise ArgumentTypeError(
            f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}"
        )
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"`{name}` must be {expected}, got {v}")
    return v


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1."""
    return check_int(name, value, minimum=1)


def check_fraction(name: str, value: Any) -> float:
    """A real number strictly between 0 and 1."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{name}` must be a fraction in (0, 1), got {value!r} of type {type(value).__name__}"
        )
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")
    return float(value)


def check_k(k: Any, name: str = "k") -> tuple[int, ...]:
    """An int >= 1 or a non-empty sequence of them; returns the sorted, deduplicated tuple."""
    if _is_int(k):
        ks: tuple[Any, ...] = (k,)
    elif isinstance(k, Sequence | np.ndarray | Tensor) and not isinstance(k, str | bytes):
        ks = tuple(k.tolist()) if isinstance(k, np.ndarray | Tensor) else tuple(k)
    else:
        raise ArgumentTypeError(
            f"`{name}` must be an integer >= 1 or a sequence of them, got {k!r} "
            f"of type {type(k).__name__}"
        )
    if not ks:
        raise ValueError(f"`{name}` must contain at least one value, got an empty sequence")
    for v in ks:
        if not _is_int(v):
            raise ArgumentTypeError(
                f"`{name}` values must be integers, got {v!r} of type {type(v).__name__} in {k!r}"
            )
        if v < 1:
            raise ValueError(f"`{name}` values must be >= 1, got {v} in {k!r}")
    return tuple(sorted({int(v) for v in ks}))


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    """``value`` must be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def check_labels(
    name: str,
    labels: Tensor | np.ndarray,
    num_classes: int | None = None,
    length: int | None = None,
) -> Tensor:
    """A 1-D integer tensor or array (returned as an int64 tensor), optionally of ``length``
    entries in ``[0, num_classes)``. Strings, floats and bools are refused, not cast."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise ArgumentTypeError(
                f"`{name}` must hold integer class ids, got dtype {labels.dtype}"
                + (
                    " (strings: map them to integer ids first)"
                    if labels.dtype.kind in "USO"
                    else ""
                )
            )
        labels = torch.from_numpy(labels)
    if not isinstance(labels, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must be a torch.Tensor or numpy array of integer class ids, got "
            f"{type(labels).__name__}"
        )
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [num_items], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ArgumentTypeError(f"`{name}` must hold integer class ids, got dtype {labels.dtype}")
    if length is not None and labels.shape[0] != length:
        raise ValueError(f"`{name}` must have {length} entries, got {labels.shape[0]}")
    labels = labels.to(torch.int64)
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"`{name}` must be in [0, {num_classes}) (num_classes={num_classes}), "
                f"got label {bad}"
            )
    return labels


def check_finite_rows(name: str, x: Tensor) -> None:
    """Every row of the 2-D ``x`` is free of NaN and Inf; the error counts the bad rows."""
    # One reduction is enough when all is well; overflow to inf only costs the detailed pass.
    if bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    num_bad = int(bad.sum())
    if num_bad:
        first = bad.nonzero()[:5, 0].tolist()
        raise ValueError(
            f"`{name}` has {num_bad} of {x.shape[0]} rows containing NaN or Inf "
            f"(first rows: {first}); check the model output before evaluating"
        )


# --- training side (module, heads) ---


def check_real(name: str, value: Any) -> float:
    """``value`` as a float; rejects bool, str and None (a type error, not a failed comparison
    deep inside a range check)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    unit: str = "",
) -> float:
    """A finite real number in an interval: closed ends unless ``low_open`` / ``high_open``.

    >>> check_range("margin", 0.3, 0.0, 1.0, unit=" (cosine units)")
    0.3
    >>> check_range("scale", 0, 0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `scale` must be a finite number > 0, got 0
    """
    v = check_real(name, value)
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    if not (math.isfinite(v) and above and below):
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            where = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            where = "a finite number"
        raise ValueError(f"`{name}` must be {where}{unit}, got {value!r}")
    return v


def check_positive_real(name: str, value: Any) -> float:
    """A finite real number > 0 (a learning rate, a temperature)."""
    return check_range(name, value, 0.0, low_open=True)


def check_num_classes(value: Any, name: str = "num_classes") -> int:
    """The class count of a classification objective: an integer >= 2.

    With one class the softmax is 1 whatever the embedding: the loss is exactly 0 and every
    gradient zero, so training would run and learn nothing.
    """
    n = check_int(name, value)
    if n < 2:
        raise ValueError(
            f"`{name}` must be an integer >= 2, got {n}: with a single class the softmax is "
            "always 1, so the loss is exactly 0 and no gradient reaches the model (training "
            "would silently learn nothing)"
        )
    return n


# --- FAISS index factory (EmbeddingIndex) ---

_TRANSFORM = re.compile(r"(PCA|OPQ|RR|ITQ|L2norm)")


def check_factory_string(factory: Any, dim: int | None = None) -> str:
    """A FAISS ``index_factory`` string; its PQ sub-vector count ``M`` must divide ``dim``
    (unless a transform such as ``OPQ``/``PCA`` changes the dimension first; not checked
    while ``dim`` is unknown)."""
    if not isinstance(factory, str) or not factory.strip():
        raise ArgumentTypeError(
            f"`factory` must be a FAISS index-factory string such as 'Flat', 'HNSW32', "
            f"'IVF1024,Flat' or 'IVF1024,PQ16', got {factory!r}"
        )
    factory = factory.strip()
    parts = [p.strip() for p in factory.split(",")]
    if dim is None or any(_TRANSFORM.match(p) for p in parts):
        return factory
    for part in parts:
        m = re.fullmatch(r"(?:IVF\d+(?:_HNSW\d+)?)?PQ(\d+)(?:x\d+)?(?:fs|fsr|np)?", part)
        if m and int(m.group(1)) > 0 and dim % int(m.group(1)):
            divisors = [d for d in range(2, dim + 1) if dim % d == 0 and d <= 64][-4:]
            raise ValueError(
                f"`factory` {factory!r}: PQ{m.group(1)} splits each vector into "
                f"{m.group(1)} sub-vectors, but the embedding dimension {dim} is not divisible "
                f"by {m.group(1)}; use PQ M with M dividing {dim}, e.g. "
                + " / ".join(f"PQ{d}" for d in divisors)
            )
    return factory


def check_training_size(factory: str, num_vectors: int, needed: int) -> None:
    """An index that must be trained (IVF lists, PQ codebooks) gets enough vectors."""
    if num_vectors < needed:
        ivf = re.search(r"IVF(\d+)", factory)
        hint = (
            f"use fewer IVF lists (e.g. IVF{max(1, num_vectors // 39)}, FAISS wants ~39 "
            "vectors per list) or "
            if ivf and int(ivf.group(1)) == needed
            else ""
        )
        raise ValueError(
            f"`factory` {factory!r} must be trained on at least {needed} vectors (one per IVF "
            f"list, 256 per 8-bit PQ codebook), but {num_vectors} embeddings were given; "
            f"{hint}index more embeddings, or use 'Flat' / 'HNSW32', which need no training"
        )


# --- retrieval: metric names, neighbour counts ---

__all__ += ["METRICS", "check_metric", "check_top_k"]

# Every similarity search, metric and index accepts these (the ``Metric`` type of
# :mod:`lightning_metric.retrieval.knn`); verification takes a subset.
METRICS = ("cosine", "ip", "l2")


def check_metric(value: T, allowed: Sequence[str] = METRICS, name: str = "metric") -> T:
    """``value`` must be one of ``allowed`` metric names (default: all of :data:`METRICS`)."""
    check_choice(name, value, tuple(allowed))  # type: ignore[arg-type]
    return value


def check_top_k(k: Any, available: int, what: str = "reference items a query can retrieve") -> int:
    """A neighbour count: an integer >= 1 and at most the ``available`` candidates, which
    ``what`` names in the message."""
    k = check_int("k", k, minimum=1)
    if k > available:
        raise ValueError(
            f"k={k} is larger than the number of {what} ({available}); use k <= {available}"
        )
    return k


# --- Matryoshka prefixes (retrieval grids and training) ---

__all__ += ["check_dims"]


def check_dims(dims: Any, name: str = "dims", maximum: int | None = None) -> tuple[int, ...]:
    """A non-empty, strictly increasing sequence of prefix sizes >= 1 (Matryoshka dims),
    none above ``maximum`` (the embedding size) when it is given."""
    if isinstance(dims, str | bytes) or not isinstance(dims, Sequence):
        raise ArgumentTypeError(
            f"`{name}` must be a list of prefix sizes such as [32, 64, 128], got {dims!r}"
        )
    if not dims:
        raise ValueError(f"`{name}` must hold at least one prefix size, got an empty list")
    out = tuple(check_int(f"{name}[{i}]", d, minimum=1) for i, d in enumerate(dims))
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(
            f"`{name}` must be strictly increasing (each prefix larger than the one before), "
            f"got {list(out)}; e.g. {sorted(set(out))}"
        )
    if maximum is not None and out[-1] > maximum:
        raise ValueError(
            f"`{name}` = {list(out)} asks for a prefix of {out[-1]} coordinates, but the "
            f"embedding has only {maximum}; use sizes <= {maximum}, e.g. "
            f"{[d for d in out if d < maximum] + [maximum]}"
        )
    return out
