"""EmbeddingAccumulator: embeddings, labels and dataset indices of an evaluation, gathered
from every DDP rank without DistributedSampler's padding.

The one collect/gather/unpad pipeline: :class:`~lightning_metric.retrieval.RetrievalMetrics`
computes its metrics on what it returns, and the callbacks' ``EmbeddingCollector``
(pictures, index writer) returns it as arrays.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_metric.checks import ArgumentTypeError, check_choice, check_int, check_labels
from lightning_metric.distributed import rank, unpad_gathered, world_size

__all__ = ["ROLE_CODES", "EmbeddingAccumulator", "Gathered", "Role"]

Role = Literal["both", "query", "reference"]
# Bit 1: queries, bit 2: is searched; "both" items do both.
ROLE_CODES: dict[str, int] = {"query": 1, "reference": 2, "both": 3}


class Gathered(NamedTuple):
    """Rows of every rank in single-process order; ``indexes`` is -1 where none was given."""

    embeddings: Tensor
    labels: Tensor
    indexes: Tensor
    roles: Tensor


class EmbeddingAccumulator(Metric):
    """Accumulates embeddings, labels, dataset indices and roles; :meth:`compute` returns
    them gathered from all ranks as :class:`Gathered`.

    States are concatenated across DDP ranks by torchmetrics. The rows DistributedSampler
    added to pad the last batches are dropped (only those: items that share a dataset index,
    as in a ConcatDataset, all count) and the rest are put in single-process order, so every
    rank and any number of ranks see the same rows. The padding is known exactly when
    ``update`` gets ``dataset_size=len(dataset)``; otherwise it is inferred from ``indexes``,
    which must then be unique per item (an error says so when they are not). A single process
    keeps every row it was given.
    """

    is_differentiable = False
    full_state_update = False

    embeddings: list[Tensor] | Tensor
    labels: list[Tensor] | Tensor
    indexes: list[Tensor] | Tensor
    roles: list[Tensor] | Tensor
    ranks: list[Tensor] | Tensor

    def __init__(self, compute_on_cpu: bool = False, sync_on_compute: bool = True) -> None:
        super().__init__(compute_on_cpu=compute_on_cpu, sync_on_compute=sync_on_compute)
        self._warned_no_index = False
        self._dataset_sizes: dict[int, int] = {}
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("indexes", default=[], dist_reduce_fx="cat")
        self.add_state("roles", default=[], dist_reduce_fx="cat")
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indexes: Tensor | None = None,
        role: Role = "both",
        dataset_size: int | None = None,
    ) -> None:
        """Add a batch: ``embeddings [B, D]``, ``labels [B]`` (or ``[B, L]``: multi-hot or
        hierarchical, stored as int64), dataset ``indexes [B]``.

        ``dataset_size``: ``len(dataset)`` of the loader the batch comes from; under DDP it
        tells exactly how many gathered rows are DistributedSampler padding.
        """
        check_choice("role", role, tuple(ROLE_CODES))
        code = ROLE_CODES[role]
        if dataset_size is not None:
            self.set_dataset_size(dataset_size, role)
        if embeddings.ndim != 2:
            raise ValueError(
                f"`embeddings` must be 2-D [batch, dim], got shape {tuple(embeddings.shape)}"
            )
        n = embeddings.shape[0]
        if labels.ndim not in (1, 2) or labels.shape[0] != n:
            raise ValueError(
                f"`labels` must have shape [{n}] (class ids) or [{n}, L] (multi-label or "
                f"hierarchical) to match embeddings, got {tuple(labels.shape)}"
            )
        if labels.ndim == 1:
            labels = check_labels("labels", labels)  # a float label would be truncated silently
        elif labels.is_floating_point() or labels.is_complex():
            raise ArgumentTypeError(
                f"`labels` must hold integer ids or a bool multi-hot matrix, got dtype "
                f"{labels.dtype}"
            )
        if indexes is None:
            indexes = torch.full((n,), -1, dtype=torch.int64, device=embeddings.device)
        elif indexes.shape != (n,):
            raise ValueError(
                f"`indexes` must have shape [{n}] to match embeddings, got {tuple(indexes.shape)}"
            )
        elif indexes.is_floating_point() or indexes.dtype == torch.bool:
            raise ArgumentTypeError(
                f"`indexes` must hold integer dataset indices, got dtype {indexes.dtype}"
            )
        elif bool((indexes < 0).any()):
            raise ValueError(
                f"`indexes` must be >= 0 dataset indices, got min {int(indexes.min())}"
            )
        self.embeddings.append(embeddings.detach())  # type: ignore[union-attr]
        self.labels.append(labels.detach().to(torch.int64))  # type: ignore[union-attr]
        self.indexes.append(indexes.detach().to(device=embeddings.device, dtype=torch.int64))  # type: ignore[union-attr]
        self.roles.append(  # type: ignore[union-attr]
            torch.full((n,), code, dtype=torch.int8, device=embeddings.device)
        )
        self.ranks.append(  # type: ignore[union-attr]
            torch.full((n,), rank(), dtype=torch.int32, device=embeddings.device)
        )

    def set_dataset_size(self, dataset_size: int, role: Role = "both") -> None:
        """``len(dataset)`` of the ``role`` rows: under DDP it tells exactly how many gathered
        rows are DistributedSampler padding."""
        check_choice("role", role, tuple(ROLE_CODES))
        self._dataset_sizes[ROLE_CODES[role]] = check_int("dataset_size", dataset_size, minimum=1)

    def reset(self) -> None:
        super().reset()
        self._dataset_sizes = {}

    def __len__(self) -> int:
        """Rows collected on this rank."""
        return sum(len(e) for e in self.embeddings)  # type: ignore[union-attr]

    def compute(self) -> Gathered:  # type: ignore[override]
        return self._gathered()

    def local_rows(self) -> Gathered:
        """This rank's rows as they were updated, padding included, nothing gathered."""
        name = type(self).__name__
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise ValueError(f"{name}: no rows were collected")
        emb = _concatenate_freeing(self.embeddings)  # type: ignore[arg-type]
        # The states become the one concatenated tensor, the same rows: the sharded paths'
        # memory is this rank's rows once, not the batches beside their concatenation.
        self.embeddings = [emb]
        return Gathered(
            emb,
            dim_zero_cat(self.labels).to(emb.device),
            dim_zero_cat(self.indexes).to(emb.device),
            dim_zero_cat(self.roles).to(emb.device),
        )

    def _gathered(self) -> Gathered:
        """The rows of all ranks, padding dropped; call it inside ``compute`` (which syncs)."""
        name = type(self).__name__
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise ValueError(f"{name}.compute() called before any update()")
        emb = dim_zero_cat(self.embeddings)
        labels = dim_zero_cat(self.labels).to(emb.device)
        index = dim_zero_cat(self.indexes).to(emb.device)
        roles = dim_zero_cat(self.roles).to(emb.device)
        ranks = dim_zero_cat(self.ranks).to(emb.device)
        has_index = bool((index >= 0).all())
        world = world_size()
        if world > 1 and not has_index and not self._dataset_sizes and not self._warned_no_index:
            self._warned_no_index = True
            warnings.warn(
                f"{name} got no dataset indexes or dataset_size under DDP: samples "
                "that DistributedSampler repeats to pad the last batch are counted twice",
                UserWarning,
                stacklevel=3,
            )
        # Per role (a query set and a gallery set are separate datasets), in role order.
        keep = []
        for code in sorted(set(roles.tolist())):
            rows = (roles == code).nonzero()[:, 0]
            kept = unpad_gathered(
                ranks[rows],
                world,
                index[rows] if has_index else None,
                self._dataset_sizes.get(code),
            )
            keep.append(rows[kept])
        order = torch.cat(keep)
        return Gathered(emb[order], labels[order], index[order], roles[order])


def _concatenate_freeing(parts: list[Tensor] | Tensor) -> Tensor:
    """``torch.cat(parts)``, each part dropped from the list once copied, so the rows are
    held about once (plus one batch), not twice, while they are concatenated."""
    if isinstance(parts, Tensor):
        return parts
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    out = first.new_empty((sum(p.shape[0] for p in parts), *first.shape[1:]))
    del first
    start = 0
    while parts:
        part = parts.pop(0)
        out[start : start + part.shape[0]] = part
        start += part.shape[0]
        del part
    return out
