"""Which references are relevant to a query: one label, several labels, or a label hierarchy.

- ``single``: ``labels [N]`` integer class ids; relevant = same id.
- ``multi_label``: a multi-hot ``[N, L]`` matrix (bool, or 0/1 with ``label_kind=
  "multi_label"``) or a list of label lists; relevant = at least one shared label. An item
  with no label is refused (it could never be relevant, nor scored).
- ``hierarchical``: ``labels [N, levels]`` integer ids, coarse to fine (e.g. product category,
  then product id); every level is evaluated as a single label and its metrics get the suffix
  ``/<level name>`` (``level_names``, default ``level0``, ``level1``, ...). A fine label under
  two coarse labels is refused.

``label_kind="auto"`` reads the kind from the input: 1-D integers are single labels, a bool
matrix or a list of lists is multi-label; a 2-D integer matrix is ambiguous (multi-hot or
hierarchical?) and must be named. ``R`` (MAP@R, R-precision) is the number of relevant
references, the query's own row not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import ArgumentTypeError, check_choice, check_labels

__all__ = [
    "LABEL_KINDS",
    "LabelKind",
    "Level",
    "build_levels",
    "check_hierarchy",
    "label_kind_of",
    "normalize_labels",
    "pad_multi_hot",
    "relevant_counts",
]

LabelKind = Literal["auto", "single", "multi_label", "hierarchical"]
LABEL_KINDS = ("auto", "single", "multi_label", "hierarchical")
# Query x reference label-overlap entries computed at once when counting multi-label R.
_OVERLAP_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Level:
    """Relevance at one level. ``single``: ``query``/``reference`` are contiguous class ids
    (``classes`` maps them back); ``multi``: bool multi-hot rows."""

    name: str  # key suffix: "" for a lone level, else "/<level name>"
    multi: bool
    query: Tensor
    reference: Tensor
    classes: Tensor | None

    def counts(self, exclude: Tensor | None) -> Tensor:
        """``R [Q]``: relevant references of each query, its excluded row not counted."""
        if not self.multi:
            counts = torch.bincount(self.reference, minlength=len(self.classes))  # type: ignore[arg-type]
            r = counts[self.query]
        else:
            q, ref = self.query.float(), self.reference.float()
            r = torch.empty(q.shape[0], dtype=torch.int64, device=q.device)
            step = max(1, _OVERLAP_BLOCK_ELEMENTS // max(ref.shape[0], 1))
            for start in range(0, q.shape[0], step):
                r[start : start + step] = (q[start : start + step] @ ref.T > 0).sum(1)
        if exclude is not None:
            own = exclude >= 0
            rows = own.nonzero()[:, 0]
            own_relevant = torch.zeros_like(own)
            own_relevant[rows] = self.matrix(rows, exclude[rows][:, None])[:, 0]
            r = r - own_relevant.long()
        return r

    def matrix(self, rows: Tensor, neighbours: Tensor) -> Tensor:
        """Bool ``[len(rows), depth]``: which ``neighbours`` (reference rows, ``-1`` for none)
        of the query ``rows`` are relevant to them."""
        # Exact search always fills every slot; only given neighbour lists hold -1.
        missing = bool((neighbours < 0).any()) if neighbours.numel() else False
        nn = neighbours.clamp(min=0) if missing else neighbours
        if not self.multi:
            match = self.reference[nn] == self.query[rows][:, None]
        else:
            match = (self.reference[nn] & self.query[rows][:, None, :]).any(-1)
        return match & (neighbours >= 0) if missing else match

    def group(self) -> Tensor:
        """Class id of each query, for per-class (macro) averages: single labels only."""
        if self.multi:
            raise ValueError(
                "average='macro' and per-class metrics need one class per query; multi-label "
                "items belong to several: use average='micro'"
            )
        return self.query


def label_kind_of(labels: Any, label_kind: str, name: str = "labels") -> str:
    """The kind (``single`` / ``multi_label`` / ``hierarchical``) of ``labels``."""
    check_choice("label_kind", label_kind, LABEL_KINDS)
    if label_kind != "auto":
        return label_kind
    if isinstance(labels, list | tuple) and all(
        isinstance(item, list | tuple | set | frozenset) for item in labels
    ):
        return "multi_label"
    if isinstance(labels, Tensor | np.ndarray) and labels.ndim == 2:
        if labels.dtype in (torch.bool, np.bool_):
            return "multi_label"
        raise ValueError(
            f"`{name}` is a 2-D {labels.dtype} matrix of shape {tuple(labels.shape)}: pass "
            "label_kind='multi_label' for a 0/1 multi-hot matrix [N, num_labels] or "
            "label_kind='hierarchical' for class ids [N, levels] (coarse to fine)"
        )
    return "single"


def _multi_hot(labels: Any, name: str, length: int, num_labels: int | None) -> Tensor:
    """``labels`` as a bool ``[length, L]`` matrix, every row with at least one label."""
    if isinstance(labels, list | tuple):
        ids: list[list[int]] = []
        for i, item in enumerate(labels):
            if not isinstance(item, list | tuple | set | frozenset):
                raise ArgumentTypeError(
                    f"`{name}` as a list must hold one list of label ids per item, got "
                    f"{item!r} for item {i}"
                )
            for v in item:
                if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 0:
                    raise ValueError(
                        f"`{name}`: item {i} has label {v!r}; label ids must be integers >= 0"
                    )
            ids.append([int(v) for v in item])
        if len(ids) != length:
            raise ValueError(f"`{name}` must have {length} entries, got {len(ids)}")
        width = max((max(item) + 1 for item in ids if item), default=0)
        width = max(width, num_labels or 0)
        hot = torch.zeros(length, width, dtype=torch.bool)
        for i, item in enumerate(ids):
            hot[i, item] = True
    else:
        t = torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(
                f"`{name}` must be a multi-hot tensor/array [N, L] or a list of label lists, "
                f"got {type(labels).__name__}"
            )
        if t.ndim != 2:
            raise ValueError(
                f"`{name}` must be a multi-hot matrix [N, num_labels], got shape {tuple(t.shape)}"
            )
        if t.shape[0] != length:
            raise ValueError(f"`{name}` must have {length} rows, got {t.shape[0]}")
        if t.dtype != torch.bool:
            if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
                bad = t[(t != 0) & (t != 1)][:1].tolist() if not t.is_complex() else [t.dtype]
                raise ValueError(
                    f"`{name}` must be a 0/1 multi-hot matrix, found the value {bad[0]}"
                )
            t = t != 0
        hot = t
    empty = ~hot.any(1) if hot.shape[1] else torch.ones(length, dtype=torch.bool)
    if bool(empty.any()):
        first = empty.nonzero()[:5, 0].tolist()
        raise ValueError(
            f"`{name}`: {int(empty.sum())} item(s) have no label (first rows: {first}); every "
            "multi-label item needs at least one label to be relevant to anything"
        )
    return hot


def _hierarchy(labels: Any, name: str, length: int) -> Tensor:
    """``labels`` as int64 ``[length, levels]``, coarse to fine and consistent."""
    t = torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must be an integer tensor/array [N, levels] for hierarchical labels, got "
            f"{type(labels).__name__}"
        )
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"hierarchical `{name}` must be 2-D [N, levels], got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ArgumentTypeError(f"`{name}` must hold integer class ids, got dtype {t.dtype}")
    if t.shape[0] != length:
        raise ValueError(f"`{name}` must have {length} rows, got {t.shape[0]}")
    return t.to(torch.int64)


def check_hierarchy(labels: Tensor, name: str = "labels") -> None:
    """Each class of a level lies under exactly one class of the level before it."""
    for level in range(1, labels.shape[1]):
        pairs = torch.unique(labels[:, level - 1 : level + 1], dim=0)
        fine, counts = torch.unique(pairs[:, 1], return_counts=True)
        if bool((counts > 1).any()):
            bad = int(fine[counts > 1][0])
            parents = pairs[pairs[:, 1] == bad, 0][:2].tolist()
            raise ValueError(
                f"`{name}` is not a hierarchy: label {bad} of level {level} lies under "
                f"labels {parents[0]} and {parents[1]} of level {level - 1}; columns must go "
                "from coarse to fine, each class under one parent"
            )


def normalize_labels(labels: Any, kind: str, length: int, name: str = "labels") -> Tensor:
    """Checked ``labels`` of one kind: int64 ``[N]`` (single), bool ``[N, L]``
    (multi-label) or int64 ``[N, levels]`` (hierarchical)."""
    if kind == "single":
        return check_labels(name, labels, length=length)
    if kind == "multi_label":
        return _multi_hot(labels, name, length, None)
    return _hierarchy(labels, name, length)


def pad_multi_hot(query: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Two multi-hot matrices with the same number of label columns (missing ones False)."""
    width = max(query.shape[1], reference.shape[1])
    return _pad(query, width), _pad(reference, width)


def build_levels(
    kind: str, query: Tensor, reference: Tensor, level_names: Sequence[str] | None = None
) -> list[Level]:
    """One :class:`Level` per evaluated level from normalised labels of the query rows and
    of the reference rows (:func:`normalize_labels`; ``reference is query`` when the same
    rows are both)."""
    if level_names is not None and kind != "hierarchical":
        raise ValueError(f"`level_names` is for hierarchical labels, but the labels are {kind}")
    if kind == "single":
        return [_single("", query, reference)]
    if kind == "multi_label":
        q, r = pad_multi_hot(query, reference)
        return [Level("", True, q, r.to(q.device), None)]
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"`labels` have {query.shape[1]} levels but `reference_labels` have "
            f"{reference.shape[1]}"
        )
    check_hierarchy(query if reference is query else torch.cat([query, reference.to(query.device)]))
    names = _level_names(level_names, query.shape[1])
    return [_single(f"/{names[j]}", query[:, j], reference[:, j]) for j in range(query.shape[1])]


def _level_names(level_names: Sequence[str] | None, levels: int) -> list[str]:
    if level_names is None:
        return [f"level{j}" for j in range(levels)]
    names = list(level_names)
    if len(names) != levels or len(set(names)) != levels:
        raise ValueError(
            f"`level_names` must be {levels} distinct names (one per label column), got {names}"
        )
    for n in names:
        if not isinstance(n, str) or not n or "/" in n:
            raise ValueError(
                f"`level_names` entries must be non-empty strings without '/', got {n!r}"
            )
    return names


def _pad(hot: Tensor, width: int) -> Tensor:
    if hot.shape[1] == width:
        return hot
    return torch.cat([hot, hot.new_zeros(hot.shape[0], width - hot.shape[1])], 1)


def _single(name: str, query: Tensor, reference: Tensor) -> Level:
    """Contiguous class ids of both sides (bincount needs them small)."""
    reference = reference.to(query.device)
    classes, inverse = torch.unique(torch.cat([query, reference]), return_inverse=True)
    return Level(name, False, inverse[: len(query)], inverse[len(query) :], classes)


def relevant_counts(
    query_labels: Any,
    reference_labels: Any,
    exclude: Tensor | None = None,
    label_kind: LabelKind = "auto",
) -> Tensor:
    """``R [Q]`` of every query against a reference set (not for hierarchical labels): the
    references relevant to it, its ``exclude`` row (``-1``: none) not counted.

    >>> import torch
    >>> relevant_counts(torch.tensor([3, 5]), torch.tensor([3, 3, 5]), torch.tensor([0, -1]))
    tensor([1, 1])
    """
    kind = label_kind_of(query_labels, label_kind, "query_labels")
    if kind == "hierarchical":
        raise ValueError("relevant_counts takes single or multi-label items, not a hierarchy")
    q = normalize_labels(query_labels, kind, len(query_labels), "query_labels")
    r = normalize_labels(reference_labels, kind, len(reference_labels), "reference_labels")
    return build_levels(kind, q, r)[0].counts(exclude)
