"""Collecting embeddings, labels and dataset indices from evaluation steps, across DDP ranks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_metric.batch import step_embeddings
from lightning_metric.distributed import dedupe_by_index, gather_uneven, world_size

__all__ = ["EmbeddingCollector", "loader_dataset"]


class EmbeddingCollector:
    """Accumulates ``(embeddings, labels, index)`` per batch on CPU and returns them gathered
    from all ranks, deduplicated by dataset index and ordered by it.

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

    def compute(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(index, embeddings, labels)`` over all ranks; every rank must call this."""
        if not self._embeddings:
            raise ValueError(f"{self.owner}: no batches were collected")
        emb = torch.cat(self._embeddings)
        labels = torch.cat(self._labels)
        index = torch.cat(self._index) if self._has_index else None
        if world_size() > 1:
            # NCCL gathers device tensors only; gloo accepts CPU ones.
            if index is None:
                raise ValueError(
                    f"{self.owner}: under DDP batches need an 'index' entry (dataset position) "
                    "to remove DistributedSampler padding"
                )
            emb = gather_uneven(emb.to(device)).cpu()
            labels = gather_uneven(labels.to(device)).cpu()
            index = gather_uneven(index.to(device)).cpu()
        if index is None:
            index = torch.arange(len(emb))
        index, emb, labels = dedupe_by_index(index, emb, labels)
        return index, emb, labels


def loader_dataset(loaders: Any, dataloader_idx: int = 0) -> Any:
    """The dataset behind Lightning's ``trainer.{val,predict}_dataloaders`` (or None)."""
    if isinstance(loaders, list | tuple):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return getattr(loaders, "dataset", None)
