"""In-memory image datasets and the DataModule plumbing the built-in datasets share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_metric.checks import check_positive_int
from lightning_metric.data.augment import BatchCollate, RandomAffineNoise
from lightning_metric.data.samplers import MPerClassSampler

Split = Literal["train", "val", "test"]


class ArrayDataset(Dataset[dict[str, torch.Tensor]]):
    """Images held in memory; item ``i`` is ``{"x": float [C, H, W], "label": int64, "index": i}``.

    ``index`` is the position inside *this* dataset, so duplicates that a DistributedSampler pads
    in can be recognised after gathering. ``classes[label]`` is the original class id
    (a code point for glyphs, a digit for digits).
    """

    def __init__(
        self,
        images: Union[np.ndarray, torch.Tensor],
        labels: Union[np.ndarray, torch.Tensor],
        classes: Optional[Sequence[int]] = None,
        scale: float = 1.0 / 255.0,
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N = {images.shape[0]} images, got {tuple(labels.shape)}"
            )
        # Kept in the compact stored dtype (uint8 for glyphs); converted per batch.
        self.images = images.contiguous()
        self.labels = labels
        self.scale = scale
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "x": self.images[index].to(torch.float32) * self.scale,
            "label": self.labels[index],
            "index": index,
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i = i % len(self)
        return self._batch(torch.tensor(i, dtype=torch.int64))

    @property
    def num_classes(self) -> int:
        return int(self.labels.max().item()) + 1 if len(self) else 0


def remap_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Map each label to its position in ``classes`` (which must contain every label)."""
    order = np.argsort(classes)
    pos = np.searchsorted(classes[order], labels)
    return order[pos].astype(np.int64)


class ArrayDataModule(pl.LightningDataModule):
    """Shared loaders for the built-in in-memory datasets; subclasses fill ``self.datasets``.

    Batches are dicts ``{"x": float32 [B, C, H, W], "label": int64 [B], "index": int64 [B]}``.
    Training shuffles with a generator seeded from ``seed`` and drops the last partial batch
    (a batch of one breaks BatchNorm in the neck). Under DDP, Lightning swaps in its
    DistributedSampler as usual.

    With ``m_per_class`` set, training batches come from :class:`MPerClassSampler`: ``m``
    samples of each of ``batch_size // m_per_class`` classes (pair losses with miners need
    positives in every batch). It splits batches across DDP ranks itself and works with either
    value of ``Trainer(use_distributed_sampler=...)``.
    """

    image_size: int
    in_channels: int = 1

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        eval_batch_size: Optional[int] = None,
        predict_split: Split = "test",
        m_per_class: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if m_per_class is not None:
            check_positive_int("m_per_class", m_per_class)
            if batch_size % m_per_class:
                raise ValueError(
                    f"batch_size must be a multiple of m_per_class: batch_size {batch_size} is "
                    f"not divisible by m_per_class {m_per_class}"
                )
        if eval_batch_size is not None:
            check_positive_int("eval_batch_size", eval_batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if predict_split not in ("train", "val", "test"):
            raise ValueError(
                f"predict_split must be one of 'train', 'val', 'test', got {predict_split!r}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.predict_split: Split = predict_split
        self.m_per_class = m_per_class
        self.datasets: dict[str, ArrayDataset] = {}

    # -- hooks for subclasses -------------------------------------------------------------
    def build_datasets(self) -> dict[str, ArrayDataset]:
        raise NotImplementedError

    def make_augment(self) -> RandomAffineNoise:
        """The training augmentation; override to change its strength."""
        return RandomAffineNoise()

    # -- LightningDataModule ----------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()

    def dataset(self, split: Split) -> ArrayDataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be one of 'train', 'val', 'test', got {split!r}")
        self.setup()
        return self.datasets[split]

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        train = self.dataset("train")
        if self.batch_size > len(train):
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the training split "
                f"({len(train)} samples): training drops the last partial batch, so no batch "
                "would be left; lower batch_size"
            )
        # Mixing the rank in keeps the augmentation streams of DDP ranks independent.
        seed = self.seed + 1_000_003 * self._rank()
        augment = self.make_augment() if self.augment else None
        collate = BatchCollate(augment, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        if self.m_per_class is not None:
            # Same seed on every rank: all ranks must derive the same epoch plan to split it.
            sampler = MPerClassSampler(train.labels, self.m_per_class, self.batch_size, self.seed)
            return DataLoader(
                train,
                batch_sampler=sampler,
                collate_fn=collate,
                generator=generator,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, split: Split) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=BatchCollate(None),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)
