"""A tiny LightningModule with identity embeddings, clustered data for it, a quiet Trainer and
validation on several DDP ranks: what the RecallAtK and retrieval tests in several folders
validate, with no MetricLearningModule."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from ddp_harness import FileRendezvousDDP
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

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


class DumpMetrics(Callback):
    """Writes every rank's logged metrics, to check that all ranks agree, and the warnings
    raised while validating."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catcher.__exit__(None, None, None)
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(values))
        said = [str(w.message) for w in self._caught]
        (Path(self.folder) / f"warnings{trainer.global_rank}.json").write_text(json.dumps(said))


def validate_on_ranks(
    devices: int, folder: Path, loaders: list[DataLoader] | DataLoader, callbacks: list[Callback]
) -> dict[str, float]:
    """``Tiny`` validated on ``devices`` CPU processes; every rank must log the same metrics."""
    folder.mkdir()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FileRendezvousDDP(folder) if devices > 1 else "auto",
        callbacks=[*callbacks, DumpMetrics(str(folder))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(Tiny(), loaders, verbose=False)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    assert len(ranks) == devices
    said = [w for p in folder.glob("warnings*.json") for w in json.loads(p.read_text())]
    # RecallAtK logs values every rank already shares: Lightning's sync_dist advice is noise.
    assert not [w for w in said if "sync_dist" in w], said
    for other in ranks[1:]:
        assert other == ranks[0]
    return ranks[0]
