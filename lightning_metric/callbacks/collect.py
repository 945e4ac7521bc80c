"""Collecting embeddings, labels and dataset indices from evaluation steps, across DDP ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_metric.batch import step_embeddings
from lightning_metric.distributed import world_size
from lightning_metric.retrieval.accumulator import ROLE_CODES, EmbeddingAccumulator
from lightning_metric.retrieval.sharded import layout

__all__ = [
    "Collected",
    "EmbeddingCollector",
    "EvaluationCallback",
    "Stage",
    "Step",
    "dataset_size",
    "flat_loaders",
    "loader_dataset",
    "stage_loaders",
]

Stage = Literal["val", "test", "predict"]
# The trainer attribute holding each stage's loaders.
_LOADERS = {"val": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}


class Step(NamedTuple):
    """One evaluation batch: its ``stage``, what ``*_step`` returned (``outputs``), the
    ``batch`` and the loader it came from."""

    stage: Stage
    outputs: Any
    batch: Any
    dataloader_idx: int


class EvaluationCallback(Callback):
    """Lightning's per-stage evaluation hooks routed to three methods that get the stage, so
    a callback collecting validation, test or predict batches writes each step once.

    Subclasses set ``stages`` (the stages they act on) and override :meth:`epoch_start`,
    :meth:`batch_end` and :meth:`epoch_end`; hooks of other stages do nothing.
    """

    stages: tuple[Stage, ...] = ()

    def epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """A validation / test / predict epoch of ``stage`` begins."""

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Step) -> None:
        """A batch went through ``*_step`` (see :class:`Step`)."""

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """The epoch of ``stage`` ended (every rank calls this)."""

    def _epoch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage
    ) -> None:
        if stage in self.stages:
            self.epoch_start(trainer, pl_module, stage)

    def _batch_end(self, stage: Stage, *args: Any) -> None:
        trainer, pl_module, outputs, batch, _batch_idx, *idx = args
        if stage in self.stages:
            self.batch_end(trainer, pl_module, Step(stage, outputs, batch, idx[0] if idx else 0))

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage in self.stages:
            self.epoch_end(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "test")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "predict")

    # Lightning passes (trainer, pl_module, outputs, batch, batch_idx[, dataloader_idx]).
    def on_validation_batch_end(self, *args: Any) -> None:  # type: ignore[override]
        self._batch_end("val", *args)

    def on_test_batch_end(self, *args: Any) -> None:  # type: ignore[override]
        self._batch_end("test", *args)

    def on_predict_batch_end(self, *args: Any) -> None:  # type: ignore[override]
        self._batch_end("predict", *args)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "predict")


class Collected(NamedTuple):
    """The rows of one evaluation loader over all ranks (CPU), and the dataset behind it."""

    dataset_index: Tensor
    embeddings: Tensor
    labels: Tensor
    dataset: Any


class EmbeddingCollector:
    """Accumulates ``(embeddings, labels, index)`` per batch on CPU and returns them gathered
    from all ranks, without DistributedSampler's padding, in single-process order: the
    gathering of :class:`~lightning_metric.retrieval.accumulator.EmbeddingAccumulator`, the
    one ``RetrievalMetrics`` uses. A single process keeps every row.

    Embeddings come from the step's output ``{"embeddings", "labels"[, "index"]}`` (what
    ``MetricLearningModule`` returns), else from ``pl_module(batch["x"])``.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        # CPU between batches: the rows of a whole evaluation set stay off the accelerator.
        self._rows = EmbeddingAccumulator(compute_on_cpu=True)

    def reset(self) -> None:
        self._rows.reset()

    def __len__(self) -> int:
        return len(self._rows)

    def update(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        embeddings, labels, index = step_embeddings(pl_module, outputs, batch, self.owner)
        labels = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
        if index is not None:
            index = torch.as_tensor(index).detach().long().cpu().reshape(-1)
        self._rows.update(embeddings.detach().float().cpu(), labels, index)

    def compute(
        self, device: torch.device, dataset_size: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(index, embeddings, labels)`` over all ranks, on CPU; every rank must call this.

        ``dataset_size`` (``len(dataset)``) tells exactly how many gathered rows are padding;
        without it the padding is inferred from the indexes.
        """
        if not len(self._rows):
            raise ValueError(f"{self.owner}: no batches were collected")
        if dataset_size is not None:
            self._rows.set_dataset_size(dataset_size)
        indexes = self._rows.indexes
        if world_size() > 1 and any(bool((i < 0).any()) for i in indexes):  # type: ignore[union-attr]
            raise ValueError(
                f"{self.owner}: under DDP batches need an 'index' entry (dataset position) "
                "to remove DistributedSampler padding"
            )
        # NCCL gathers device tensors only; gloo accepts CPU ones.
        rows = self._rows.to(device).compute()
        self._rows.to("cpu")
        index = rows.indexes if bool((rows.indexes >= 0).all()) else torch.arange(len(rows.labels))
        return index.cpu(), rows.embeddings.cpu(), rows.labels.cpu()

    def local(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, dataloader_idx: int
    ) -> tuple[Tensor, Collected]:
        """This rank's rows without DistributedSampler's padding and without gathering
        anything, with each row's position in one-process order: ``(position, rows)``; every
        rank must call this (the ranks exchange their row counts)."""
        loaders = stage_loaders(trainer, stage)
        size = dataset_size(loaders, dataloader_idx)
        rows = self._rows.local_rows()
        if bool((rows.indexes < 0).any()):
            raise ValueError(
                f"{self.owner}: under DDP batches need an 'index' entry (dataset position) "
                "to remove DistributedSampler padding"
            )
        device = pl_module.device  # NCCL exchanges device tensors only
        roles = torch.full_like(rows.roles, ROLE_CODES["both"]).to(device)
        sizes = {} if size is None else {ROLE_CODES["both"]: size}
        position = layout(roles, rows.indexes.to(device), sizes, device).query.cpu()
        kept = position >= 0
        return position[kept], Collected(
            rows.indexes[kept],
            rows.embeddings[kept],
            rows.labels[kept],
            loader_dataset(loaders, dataloader_idx),
        )

    def collected(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, dataloader_idx: int
    ) -> Collected:
        """:meth:`compute` for loader ``dataloader_idx`` of ``stage`` (padding counted from
        its ``len(dataset)``), with that dataset."""
        loaders = stage_loaders(trainer, stage)
        size = dataset_size(loaders, dataloader_idx)
        index, embeddings, labels = self.compute(pl_module.device, size)
        return Collected(index, embeddings, labels, loader_dataset(loaders, dataloader_idx))


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


def stage_loaders(trainer: pl.Trainer, stage: Stage) -> Any:
    """``trainer.{val,test,predict}_dataloaders`` of ``stage``."""
    return getattr(trainer, _LOADERS[stage])


def dataset_size(loaders: Any, dataloader_idx: int = 0) -> int | None:
    """``len()`` of the dataset behind loader ``dataloader_idx``, None when unknown."""
    try:
        return len(loader_dataset(loaders, dataloader_idx))
    except TypeError:  # no dataset, or an iterable dataset without a length
        return None
