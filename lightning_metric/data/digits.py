"""DigitsDataModule: sklearn's bundled 8x8 digits, train on some digits, evaluate on the rest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from lightning_metric.checks import check_fraction
from lightning_metric.data.augment import RandomAffineNoise
from lightning_metric.data.base import ArrayDataModule, ArrayDataset, remap_labels


def _check_digits(name: str, digits: Sequence[int]) -> list[int]:
    values = list(digits)
    bad = [d for d in values if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9]
    if not values or bad:
        raise ValueError(f"{name} must be a non-empty list of digits 0-9, got {list(digits)!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a digit, got {values!r}")
    return sorted(values)


class DigitsDataModule(ArrayDataModule):
    """sklearn's ``load_digits`` (1,797 8x8 images, shipped with scikit-learn): seconds to train.

    Train on ``train_classes`` (default 0-4) and evaluate retrieval on the unseen
    ``eval_classes`` (default: the other digits), whose samples are split per digit by ``seed``
    into val (``val_fraction``) and test. Pixel values are scaled to [0, 1]. Meant for smoke
    tests and examples.

    Args:
        batch_size: training batch size (also evaluation unless ``eval_batch_size``).
        train_classes: the digits trained on.
        eval_classes: the digits evaluated on; default: the other digits.
        val_fraction: fraction of each evaluation digit's samples in val (test gets the rest).
        **kwargs: the arguments of :class:`ArrayDataModule` (``num_workers``, ``seed``,
            ``augment``, ``m_per_class``, ...). With ``num_folds``, the folds split the
            ``train_classes`` (val and test keep the evaluation digits, so they are no fold).
    """

    save_init_hyperparameters = True

    def __init__(
        self,
        batch_size: int = 64,
        *,
        train_classes: Sequence[int] = (0, 1, 2, 3, 4),
        eval_classes: Optional[Sequence[int]] = None,
        val_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        train = _check_digits("train_classes", train_classes)
        if eval_classes is None:
            held_out = [d for d in range(10) if d not in train]
            if not held_out:
                raise ValueError(
                    "train_classes uses all ten digits, so none are left to evaluate on; "
                    "pass fewer train_classes or explicit eval_classes"
                )
        else:
            held_out = _check_digits("eval_classes", eval_classes)
        overlap = sorted(set(train) & set(held_out))
        if overlap:
            raise ValueError(
                f"train_classes {train} and eval_classes {held_out} overlap in {overlap}; "
                "evaluation is on unseen classes"
            )
        check_fraction("val_fraction", val_fraction)
        self.train_classes = train
        self.eval_classes = held_out
        self.val_fraction = val_fraction
        self.image_size = 8
        self.in_channels = 1
        self.check_folds()

    def split_class_ids(self) -> dict[str, list[Any]]:
        """The digits of each split (val and test share the evaluation digits)."""
        return {"train": self.train_classes, "val": self.eval_classes, "test": self.eval_classes}

    def make_augment(self) -> RandomAffineNoise:
        # At 8x8 one pixel is 12% of the side: keep shifts and shear gentle.
        return RandomAffineNoise(degrees=8.0, translate=0.06, shear_degrees=5.0, noise_std=0.03)

    def build_datasets(self) -> dict[str, ArrayDataset]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.float32)  # [1797, 8, 8], values 0..16
        targets = bunch.target.astype(np.int64)
        rng = np.random.default_rng(self.seed)
        val_rows, test_rows = [], []
        for digit in self.eval_classes:
            rows = rng.permutation(np.flatnonzero(targets == digit))
            n_val = min(max(1, round(self.val_fraction * len(rows))), len(rows) - 1)
            val_rows.append(rows[:n_val])
            test_rows.append(rows[n_val:])
        split_rows = {
            "train": np.flatnonzero(np.isin(targets, self.train_classes)),
            "val": np.sort(np.concatenate(val_rows)),
            "test": np.sort(np.concatenate(test_rows)),
        }
        datasets = {}
        for name, rows in split_rows.items():
            classes = np.asarray(self.train_classes if name == "train" else self.eval_classes)
            datasets[name] = ArrayDataset(
                images[rows],
                remap_labels(targets[rows], classes),
                classes=classes.tolist(),
                scale=1.0 / 16.0,
            )
        return datasets
