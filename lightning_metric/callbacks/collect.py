"""Collecting embeddings, labels and dataset indices from evaluation steps, across DDP ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_metric.batch import step_embeddings
from lightning_metric.distributed import gather_uneven, rank, unpad_gathered, world_size

__all__ = ["EmbeddingCollector", "dataset_size", "flat_loaders", "loader_dataset"]


class EmbeddingCollector:
    """Accumulates ``(embeddings, labels, index)`` per batch on CPU and returns them gathered
    from all ranks, without DistributedSampler's padding, in single-process order
    (:func:`lightning_metric.distributed.unpad_gathered`); a single process keeps every row.

    Embeddings come from the step's output ``{"embeddings", "labels"[, "index"]}`` (what
    ``MetricLearningModule`` returns), else from ``pl_module(batch["x"])``.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.reset()

    def reset(self) -> None:
        self._embeddings: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._index: list[Tensor] = []
        self._has_index = True

    def __len__(self) -> int:
        return sum(len(e) for e in self._embeddings)

    def update(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        embeddings, labels, index = step_embeddings(pl_module, outputs, batch, self.owner)
        self._embeddings.append(embeddings.detach().float().cpu())
        self._labels.append(torch.as_tensor(labels).detach().long().cpu().reshape(-1))
        if index is None:
            self._has_index = False
        else:
            self._index.append(torch.as_tensor(index).detach().long().cpu().reshape(-1))

    def compute(
        self, device: torch.device, dataset_size: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(index, embeddings, labels)`` over all ranks; every rank must call this.

        ``dataset_size`` (``len(dataset)``) tells exactly how many gathered rows are padding;
        without it the padding is inferred from the indexes.
        """
        if not self._embeddings:
            raise ValueError(f"{self.owner}: no batches were collected")
        emb = torch.cat(self._embeddings)
        labels = torch.cat(self._labels)
        index = torch.cat(self._index) if self._has_index else None
        ranks = torch.full((len(emb),), rank(), dtype=torch.int64)
        world = world_size()
        if world > 1:
            # NCCL gathers device tensors only; gloo accepts CPU ones.
            if index is None:
                raise ValueError(
                    f"{self.owner}: under DDP batches need an 'index' entry (dataset position) "
                    "to remove DistributedSampler padding"
                )
            emb = gather_uneven(emb.to(device)).cpu()
            labels = gather_uneven(labels.to(device)).cpu()
            index = gather_uneven(index.to(device)).cpu()
            ranks = gather_uneven(ranks.to(device)).cpu()
        if index is None:
            index = torch.arange(len(emb))
        keep = unpad_gathered(ranks, world, index, dataset_size)
        return index[keep], emb[keep], labels[keep]


def loader_dataset(loaders: Any, dataloader_idx: int = 0) -> Any:
    """The dataset behind Lightning's ``trainer.{val,predict}_dataloaders`` (or None)."""
    loaders = flat_loaders(loaders)
    loader = loaders[dataloader_idx] if 0 <= dataloader_idx < len(loaders) else None
    return getattr(loader, "dataset", None)


def flat_loaders(loaders: Any) -> list[Any]:
    """Lightning's ``trainer.*_dataloaders`` (one loader, a list or a dict) as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, list | tuple):
        return list(loaders)
    return [loaders]


def dataset_size(loaders: Any, dataloader_idx: int = 0) -> int | None:
    """``len()`` of the dataset behind loader ``dataloader_idx``, None when unknown."""
    try:
        return len(loader_dataset(loaders, dataloader_idx))
    except TypeError:  # no dataset, or an iterable dataset without a length
        return None
