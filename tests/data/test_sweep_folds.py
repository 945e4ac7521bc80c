"""A table of bad and unusual inputs to cross-validation folds (``num_folds``, ``fold``,
:func:`class_folds`). Bad rows: ``(id, call, exception type, regex naming the value)``, each
raised at construction (or where the class list is first needed, before any training).
Unusual but valid rows: ``(id, call, check)`` with the check computed from the classes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_datasets_layouts import FAST, _write, _write_inshop, _write_sop

from lightning_metric.checks import ArgumentTypeError
from lightning_metric.data import (
    ArrayDataModule,
    ArrayDataset,
    DigitsDataModule,
    GlyphsDataModule,
    ImageFolderDataModule,
    InShopDataModule,
    SOPDataModule,
    class_folds,
)


def _folder(root: Path, num_classes: int) -> str:
    for c in range(num_classes):
        for j in range(2):
            _write(root / f"c{c}" / f"{j}.png")
    return str(root)


def _sop(root: Path) -> str:
    _write_sop(root)  # train classes 1-5
    return str(root)


def _inshop(root: Path) -> str:
    _write_inshop(root, [["train", "train"]] * 3 + [["query", "gallery"]] * 2)
    return str(root)


class _Arrays(ArrayDataModule):
    """Two training classes, two val classes and two test classes; ``classes`` and ``scale`` chosen per row."""

    image_size = 2

    def __init__(self, *, classes: bool = True, val_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(batch_size=2, **kwargs)
        self.with_classes = classes
        self.val_scale = val_scale

    def build_datasets(self) -> dict[str, ArrayDataset]:
        images = torch.zeros(4, 2, 2, dtype=torch.uint8)
        labels = torch.tensor([0, 0, 1, 1])
        named = self.with_classes
        return {
            "train": ArrayDataset(images, labels, [1, 2] if named else None),
            "val": ArrayDataset(images, labels, [3, 4] if named else None, self.val_scale),
            "test": ArrayDataset(images, labels, [5, 6] if named else None),
        }


def _num_classes(make: Callable[[], Any]) -> Callable[[Path], Any]:
    """Build, then read ``num_classes`` (what the CLI does right after construction)."""
    return lambda tmp: make().num_classes


def _setup(make: Callable[[], Any]) -> Callable[[Path], Any]:
    return lambda tmp: make().setup()


BAD: list[tuple[str, Callable[[Path], Any], type[BaseException], str]] = [
    ("num_folds=1", lambda t: DigitsDataModule(num_folds=1, fold=0), ValueError,
     r"`num_folds` must be an integer >= 2, got 1"),
    ("num_folds=0", lambda t: DigitsDataModule(num_folds=0, fold=0), ValueError,
     r"`num_folds` must be an integer >= 2, got 0"),
    ("num_folds<0", lambda t: GlyphsDataModule(num_folds=-3, fold=0), ValueError,
     r"`num_folds` must be an integer >= 2, got -3"),
    ("num_folds bool", lambda t: DigitsDataModule(num_folds=True, fold=0), ArgumentTypeError,
     r"`num_folds` must be an integer >= 2, got True of type bool"),
    ("num_folds float", lambda t: DigitsDataModule(num_folds=2.0, fold=0), ArgumentTypeError,
     r"`num_folds` must be an integer >= 2, got 2\.0 of type float"),
    ("num_folds str", lambda t: DigitsDataModule(num_folds="3", fold=0), ArgumentTypeError,
     r"`num_folds` must be an integer >= 2, got '3' of type str"),
    ("fold missing", lambda t: DigitsDataModule(num_folds=3), ValueError,
     r"num_folds=3 needs fold.*an integer in \[0, 2\]"),
    ("fold without num_folds", lambda t: DigitsDataModule(fold=0), ValueError,
     r"fold=0 is set but num_folds is None"),
    ("fold == num_folds", lambda t: DigitsDataModule(num_folds=2, fold=2), ValueError,
     r"`fold` must be an integer in \[0, 1\], got 2"),
    ("fold < 0", lambda t: DigitsDataModule(num_folds=4, fold=-1), ValueError,
     r"`fold` must be an integer in \[0, 3\], got -1"),
    ("fold bool", lambda t: DigitsDataModule(num_folds=2, fold=False), ArgumentTypeError,
     r"`fold` must be an integer in \[0, 1\], got False of type bool"),
    ("fold float", lambda t: DigitsDataModule(num_folds=2, fold=1.0), ArgumentTypeError,
     r"`fold` must be an integer in \[0, 1\], got 1\.0 of type float"),
    ("digits: more folds than train digits",
     lambda t: DigitsDataModule(num_folds=6, fold=0), ValueError,
     r"DigitsDataModule: num_folds=6 is larger than the 5 classes of the cross-validation "
     r"pool .*\[0, 1, 2, 3, 4\].*use num_folds <= 5"),
    ("digits: one train digit",
     lambda t: DigitsDataModule(train_classes=[3], num_folds=2, fold=0), ValueError,
     r"num_folds=2 is larger than the 1 classes .*\[3\].*use more training classes"),
    ("folder: pool of 3 classes",
     lambda t: ImageFolderDataModule(_folder(t, 4), num_folds=4, fold=0, **FAST), ValueError,
     r"ImageFolderDataModule: num_folds=4 is larger than the 3 classes"),
    ("glyphs: checked when num_classes is read",
     _num_classes(lambda: GlyphsDataModule(max_classes=8, num_folds=9, fold=0)), ValueError,
     r"GlyphsDataModule: num_folds=9 is larger than the 6 classes"),
    ("glyphs: checked at setup",
     _setup(lambda: GlyphsDataModule(max_classes=8, num_folds=7, fold=6)), ValueError,
     r"num_folds=7 is larger than the 6 classes .*use num_folds <= 6"),
    ("sop: 5 train classes", lambda t: SOPDataModule(_sop(t), num_folds=6, fold=0, **FAST),
     ValueError, r"SOPDataModule: num_folds=6 is larger than the 5 classes .*\[1, 2, 3, 4, 5\]"),
    ("in-shop: 3 train items",
     lambda t: InShopDataModule(_inshop(t), num_folds=4, fold=3, **FAST), ValueError,
     r"InShopDataModule: num_folds=4 is larger than the 3 classes"),
    ("in-shop: val without folds", lambda t: InShopDataModule(_inshop(t), **FAST).dataset("val"),
     ValueError, r"`split` must be one of \('train', 'query', 'gallery'\), got 'val'"),
    ("fold_classes without folds", lambda t: DigitsDataModule().fold_classes, ValueError,
     r"DigitsDataModule has num_folds=None: set num_folds and fold"),
    ("datasets without classes",
     _num_classes(lambda: _Arrays(classes=False, num_folds=2, fold=0)), ValueError,
     r"the train split of _Arrays has no `classes`"),
    ("train and val scales differ",
     _setup(lambda: _Arrays(val_scale=0.5, num_folds=2, fold=0)), ValueError,
     r"different pixel scales \[0\.0039\d*, 0\.5\]"),
    ("class_folds: repeated class", lambda t: class_folds([1, 2, 2, 3], 2, 0), ValueError,
     r"class_ids must not repeat a class, got \[2\] repeated"),
    ("class_folds: one fold", lambda t: class_folds([1, 2, 3], 1, 0), ValueError,
     r"`num_folds` must be an integer >= 2, got 1"),
    ("class_folds: too many folds", lambda t: class_folds(["a", "b"], 3, 0), ValueError,
     r"num_folds=3 is larger than the 2 classes .*use num_folds <= 2"),
    ("class_folds: no classes", lambda t: class_folds([], 2, 0), ValueError,
     r"num_folds=2 is larger than the 0 classes"),
    ("class_folds: float seed", lambda t: class_folds([1, 2], 2, 0.5), ArgumentTypeError,
     r"`seed` must be an integer, got 0\.5"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"), [row[1:] for row in BAD], ids=[row[0] for row in BAD]
)
def test_bad_input(
    tmp_path: Path, call: Callable[[Path], Any], error: type[BaseException], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path)


def _leave_one_class_out(t: Path) -> None:
    dm = DigitsDataModule(num_folds=5, fold=2)
    assert [len(f) for f in dm.fold_classes] == [1] * 5
    assert sorted(c for f in dm.fold_classes for c in f) == [0, 1, 2, 3, 4]
    assert dm.num_classes == 4
    dm.setup()
    assert dm.dataset("val").classes == dm.fold_classes[2]


def _numpy_ints(t: Path) -> None:
    dm = DigitsDataModule(num_folds=np.int64(2), fold=np.int64(1))
    assert (dm.num_folds, dm.fold) == (2, 1) and type(dm.num_folds) is int
    assert dm.fold_classes == DigitsDataModule(num_folds=2, fold=0).fold_classes


def _negative_seed(t: Path) -> None:
    dm = DigitsDataModule(num_folds=2, fold=0, seed=-4)
    assert dm.fold_classes == [f.tolist() for f in class_folds([0, 1, 2, 3, 4], 2, -4)]


def _folder_names_sort_as_strings(t: Path) -> None:
    root = t / "folder"
    for name in ("c10", "c2", "c1", "b", "c3", "A"):
        for j in range(2):
            _write(root / name / f"{j}.png")
    dm = ImageFolderDataModule(str(root), val_classes=["c2"], test_classes=["c3"], num_folds=2,
                               fold=0, **FAST)  # fmt: skip
    assert dm.cv_pool_classes == ["A", "b", "c1", "c10", "c2"]  # val's c2 joins the pool
    assert sorted(c for f in dm.fold_classes for c in f) == dm.cv_pool_classes


def _uneven_folds(t: Path) -> None:
    folds = class_folds(range(7), 3, seed=0)
    assert sorted(len(f) for f in folds) == [2, 2, 3]


UNUSUAL: list[tuple[str, Callable[[Path], None]]] = [
    ("num_folds == pool size", _leave_one_class_out),
    ("numpy integers", _numpy_ints),
    ("negative seed", _negative_seed),
    ("folder names", _folder_names_sort_as_strings),
    ("7 classes in 3 folds", _uneven_folds),
]


@pytest.mark.parametrize("check", [row[1] for row in UNUSUAL], ids=[row[0] for row in UNUSUAL])
def test_unusual_input(tmp_path: Path, check: Callable[[Path], None]) -> None:
    check(tmp_path)


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [row[0] for row in BAD] + [row[0] for row in UNUSUAL]
    assert len(BAD) >= 20 and len(ids) == len(set(ids))
