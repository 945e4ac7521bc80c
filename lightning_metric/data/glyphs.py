"""GlyphsDataModule: the embedded benchmark of characters rendered from matplotlib's fonts."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightning_metric.checks import check_fraction, check_positive_int
from lightning_metric.data.base import ArrayDataModule, ArrayDataset, remap_labels
from lightning_metric.data.glyph_render import (
    FONT_FILES,
    GlyphTable,
    RenderParams,
    load_glyph_table,
)


def split_classes(
    num_classes: int,
    train_fraction: float,
    val_fraction: float,
    seed: int,
    max_classes: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-disjoint train/val/test class ids (each sorted), drawn by ``seed``.

    ``max_classes`` first keeps a random subset of that many classes (quick experiments).
    Counts are ``round(fraction * n)`` for train and val; test gets the rest.
    """
    _check_split_arguments(train_fraction, val_fraction, max_classes)
    order = np.random.default_rng(seed).permutation(num_classes)
    if max_classes is not None:
        order = order[:max_classes]
    n = len(order)
    n_train = round(train_fraction * n)
    n_val = round(val_fraction * n)
    n_test = n - n_train - n_val
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(
            f"{n} classes split by train_fraction={train_fraction}, val_fraction={val_fraction} "
            f"leave an empty split (train {n_train}, val {n_val}, test {n_test}); use more "
            "classes (max_classes) or other fractions"
        )
    train = np.sort(order[:n_train])
    val = np.sort(order[n_train : n_train + n_val])
    test = np.sort(order[n_train + n_val :])
    return train, val, test


def _check_split_arguments(
    train_fraction: float, val_fraction: float, max_classes: Optional[int]
) -> None:
    """The arguments of :func:`split_classes` (also checked when the data module is built,
    long before the class table is loaded and split)."""
    check_fraction("train_fraction", train_fraction)
    check_fraction("val_fraction", val_fraction)
    if train_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"train_fraction + val_fraction must be < 1 so the test split keeps some classes, "
            f"got {train_fraction} + {val_fraction} = {train_fraction + val_fraction}"
        )
    if max_classes is not None:
        check_positive_int("max_classes", max_classes)


class GlyphsDataModule(ArrayDataModule):
    """Characters rendered from the 16 DejaVu and STIXGeneral fonts matplotlib ships.

    Each class is one Unicode code point that renders (non-empty) in at least ``min_fonts`` of
    the fonts; each image is that character in one font, 32x32 grayscale (ink bright, values in
    [0, 1]). About 2,200 classes and 30,000 images; no download, rendering takes a few seconds
    and is cached as ``glyphs-<hash>.npz`` in ``cache_dir`` (default ``$LIGHTNING_METRIC_CACHE``
    or ``~/.cache/lightning_metric``).

    Code points drawn alike in at least half the fonts they share (Latin A, Greek Alpha,
    Cyrillic A; hyphen and hyphen-minus; ...) cannot be told apart and are merged into the
    lowest code point of their group: see ``merged_codepoints`` / ``num_merged``. Code points
    present in enough cmaps but rendering empty (spaces) are dropped: ``num_dropped``.

    Classes are split by ``seed`` into disjoint train / val / test sets, so validation and test
    measure retrieval on classes the model never saw. Training labels are ``[0, num_classes)``;
    val/test labels are likewise ``[0, n)`` within their split, and every split dataset has
    ``classes[label]`` = the code point.

    ``seed`` draws the class split as well as the shuffle and augmentation. With
    ``m_per_class``: every glyph class has at least ``min_fonts`` images, so m up to 12 needs
    no padding.

    Args:
        batch_size: training batch size (also evaluation unless ``eval_batch_size``).
        train_fraction: fraction of classes used for training.
        val_fraction: fraction of classes for validation; test gets the rest.
        cache_dir: where the rendered glyphs are cached.
        image_size: canvas side in pixels (font size and baseline scale with it).
        min_fonts: a code point becomes a class if it renders in at least this many fonts
            (at most the number of fonts, 16).
        max_classes: keep only this many classes (by seed) before splitting, for quick runs.
        **kwargs: the arguments of :class:`ArrayDataModule` (``num_workers``, ``seed``,
            ``augment``, ``eval_batch_size``, ``predict_split``, ``m_per_class``,
            ``num_folds``, ``fold``: cross-validation folds of the train and val classes).
    """

    save_init_hyperparameters = True

    def __init__(
        self,
        batch_size: int = 256,
        *,
        train_fraction: float = 0.65,
        val_fraction: float = 0.175,
        cache_dir: Optional[str] = None,
        image_size: int = 32,
        min_fonts: int = 12,
        max_classes: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        _check_split_arguments(train_fraction, val_fraction, max_classes)
        # Checks image_size and min_fonts.
        self.render_params = RenderParams.for_image_size(image_size, min_fonts=min_fonts)
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir
        self.image_size = image_size
        self.in_channels = 1
        self.min_fonts = min_fonts
        self.max_classes = max_classes
        self._table: Optional[GlyphTable] = None
        self._splits: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    # The table is loaded on first use, not in __init__, so building the object stays cheap;
    # `num_classes` needs it, and LightningCLI reads that right after instantiation (cache load:
    # well under a second; first-ever render: a few seconds).
    @property
    def table(self) -> GlyphTable:
        if self._table is None:
            start = time.perf_counter()
            self._table = load_glyph_table(self.render_params, self.cache_dir)
            table = self._table
            rank_zero_info(
                f"GlyphsDataModule: {table.num_classes} classes, {len(table.images)} images from "
                f"{len(FONT_FILES)} fonts (loaded in {time.perf_counter() - start:.1f} s); "
                f"merged {len(table.merged)} look-alike code points into their group's lowest "
                f"code point, dropped {len(table.dropped)} code points that render empty"
            )
        return self._table

    @property
    def class_splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Class ids (indices into ``table.codepoints``) of the train, val and test splits."""
        if self._splits is None:
            self._splits = split_classes(
                self.table.num_classes,
                self.train_fraction,
                self.val_fraction,
                self.seed,
                self.max_classes,
            )
        return self._splits

    def split_class_ids(self) -> dict[str, list[Any]]:
        """The code points of the train, val and test classes (before any folds)."""
        codepoints = self.table.codepoints
        names = ("train", "val", "test")
        return {n: codepoints[c].tolist() for n, c in zip(names, self.class_splits, strict=True)}

    @property
    def merged_codepoints(self) -> dict[int, int]:
        """Merged code point -> the code point (class) it was merged into."""
        return dict(self.table.merged)

    @property
    def num_merged(self) -> int:
        return len(self.table.merged)

    @property
    def num_dropped(self) -> int:
        return len(self.table.dropped)

    def prepare_data(self) -> None:
        # Rank 0 renders and writes the cache before the other ranks need it; the write is
        # atomic, so ranks that race here anyway cannot corrupt it.
        load_glyph_table(self.render_params, self.cache_dir)

    def build_datasets(self) -> dict[str, ArrayDataset]:
        table = self.table
        datasets = {}
        for name, classes in zip(("train", "val", "test"), self.class_splits, strict=True):
            rows = np.flatnonzero(np.isin(table.labels, classes))
            datasets[name] = ArrayDataset(
                table.images[rows],
                remap_labels(table.labels[rows], classes),
                classes=table.codepoints[classes].tolist(),
            )
        return datasets
