"""A tiny LightningModule with identity embeddings, clustered data for it and a quiet Trainer:
what the RecallAtK and retrieval tests in several folders validate, with no MetricLearningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from lightning_metric.callbacks import RecallAtK


def clustered(
    n: int, num_classes: int, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(n) % num_classes
    x = centers[labels] + 0.7 * torch.randn(n, dim, generator=g)
    return x, labels


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"x": self.x[i], "label": self.labels[i], "index": i}


class Tiny(pl.LightningModule):
    """Identity embedding; optionally returns the step-output contract."""

    def __init__(self, return_outputs: bool = True) -> None:
        super().__init__()
        self.return_outputs = return_outputs
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x + 0 * self.dummy, dim=1)

    def _step(self, batch):  # type: ignore[no-untyped-def]
        if not self.return_outputs:
            return None
        return {"embeddings": self(batch["x"]), "labels": batch["label"], "index": batch["index"]}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        return self._step(batch)

    def test_step(self, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        return self._step(batch)


def trainer(cb: RecallAtK) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
