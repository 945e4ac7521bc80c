"""Class-disjoint k-fold cross-validation (``num_folds``, ``fold``) in every built-in data module,
checked against the data module's own splits without folds."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_datasets_layouts import FAST, _png_bytes, _write, _write_inshop, _write_sop

from lightning_metric.data import (
    ArrayDataModule,
    ArrayDataset,
    CUB200DataModule,
    DigitsDataModule,
    GlyphsDataModule,
    ImageFolderDataModule,
    InShopDataModule,
    SOPDataModule,
    class_folds,
    select_classes,
)
from lightning_metric.data.glyphs import split_classes
from lightning_metric.data.preprocess import Preprocessing

# -- the pure function ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(2, 2), (5, 2), (7, 3), (10, 10), (23, 4)])
def test_class_folds_partition_the_classes_in_near_equal_folds(n: int, k: int) -> None:
    ids = [3 * i + 1 for i in range(n)]
    folds = class_folds(ids, k, seed=4)
    assert len(folds) == k
    flat = [int(c) for f in folds for c in f]
    assert sorted(flat) == ids and len(set(flat)) == n  # every class exactly once
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(f.tolist() == sorted(f.tolist()) for f in folds)


def test_class_folds_depend_on_the_classes_and_seed_only() -> None:
    ids = [f"class_{c}" for c in range(12)]
    folds = [f.tolist() for f in class_folds(ids, 3, seed=7)]
    assert [f.tolist() for f in class_folds(ids[::-1], 3, seed=7)] == folds  # order-free
    assert [f.tolist() for f in class_folds(ids, 3, seed=8)] != folds


def test_class_folds_are_a_stream_apart_from_the_class_split() -> None:
    """The data modules draw their class split from ``default_rng(seed)``: the folds must not
    be that same permutation cut into pieces."""
    n, k = 30, 3
    same = 0
    for seed in range(10):
        split_order = np.random.default_rng(seed).permutation(n)
        naive = [np.sort(part).tolist() for part in np.array_split(split_order, k)]
        same += [f.tolist() for f in class_folds(range(n), k, seed)] == naive
    assert same == 0


def test_class_folds_negative_seed_is_its_own_stream() -> None:
    ids = list(range(20))
    minus = [f.tolist() for f in class_folds(ids, 4, seed=-3)]
    plus = [f.tolist() for f in class_folds(ids, 4, seed=3)]
    assert minus != plus and sorted(c for f in minus for c in f) == ids


def test_select_classes_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 9, 50).tolist()
    keep = [7, 2, 5]
    rows, labels, classes = select_classes(items, keep)
    assert classes == [2, 5, 7]
    expected = [(i, sorted(keep).index(c)) for i, c in enumerate(items) if c in keep]
    assert list(zip(rows.tolist(), labels.tolist(), strict=True)) == expected


# -- the data modules ------------------------------------------------------------------------------


def _items(dataset: Any) -> list[tuple[Any, Any]]:
    """(class identity, what the item is) of every item, in order."""
    identities = [dataset.classes[label] for label in dataset.labels.tolist()]
    if hasattr(dataset, "paths"):
        keys: list[Any] = list(dataset.paths)
    else:
        keys = [dataset.images[i].numpy().tobytes() for i in range(len(dataset))]
    return list(zip(identities, keys, strict=True))


def _assert_same_split(a: Any, b: Any) -> None:
    assert _items(a) == _items(b)
    assert torch.equal(a.labels, b.labels) and list(a.classes) == list(b.classes)


def check_folds(make: Callable[..., Any], num_folds: int, test_split: str = "test") -> None:
    """The folds of ``make(num_folds=..., fold=i)`` against ``make()``'s own splits."""
    base = make()
    base.setup()
    ids = base.split_class_ids()
    pool = sorted((set(ids["train"]) | set(ids.get("val", ()))) - set(ids["test"]))
    assert base.cv_pool_classes == pool
    sources = [
        base.datasets[s]
        for s in ("train", "val")
        if s in base.datasets and base.datasets[s] is not base.datasets.get("test")
    ]
    pool_items = Counter(item for d in sources for item in _items(d) if item[0] in set(pool))
    served_as_val: list[Any] = []
    for i in range(num_folds):
        dm = make(num_folds=num_folds, fold=i)
        num_classes = dm.num_classes
        assert not dm.datasets  # read before setup, as the CLI does
        dm.setup()
        train, val = dm.dataset("train"), dm.dataset("val")
        assert num_classes == len(train.classes) == len(set(train.labels.tolist()))
        assert train.labels.max().item() == num_classes - 1
        assert sorted(set(val.labels.tolist())) == list(range(len(val.classes)))
        assert list(val.classes) == dm.fold_classes[i]
        assert list(train.classes) == dm.fold_train_classes
        assert set(train.classes).isdisjoint(val.classes)
        assert set(train.classes) | set(val.classes) == set(pool)
        assert set(train.classes) | set(val.classes) <= set(pool)  # no test class
        # Items of a class stay together; train + val items are the pool's, each once.
        assert Counter(_items(train)) + Counter(_items(val)) == pool_items
        assert Counter(_items(val)) == Counter(
            {item: n for item, n in pool_items.items() if item[0] in set(val.classes)}
        )
        _assert_same_split(dm.dataset(test_split), base.dataset(test_split))
        served_as_val += list(val.classes)
    assert sorted(served_as_val) == pool and len(set(served_as_val)) == len(pool)
    sizes = [len(f) for f in dm.fold_classes]
    assert max(sizes) - min(sizes) <= 1
    assert make(num_folds=num_folds, fold=0).fold_classes == dm.fold_classes
    assert make(num_folds=num_folds, fold=0, seed=11).fold_classes != dm.fold_classes


def _folder(root: Path, num_classes: int = 8) -> Path:
    for c in range(num_classes):
        for j in range(2 + c % 2):
            _write(root / f"class_{c}" / f"img{j}.png", _png_bytes(10 * c + j))
    return root


def _cub(root: Path) -> Path:
    lines, labels = [], []
    for n, c in enumerate([k for k in range(1, 201) for _ in range(1 + k % 2)], start=1):
        rel = f"{c:03d}.S/img_{n}.png"
        _write(root / "images" / rel)
        lines.append(f"{n} {rel}")
        labels.append(f"{n} {c}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def test_digits_folds() -> None:
    check_folds(lambda **kw: DigitsDataModule(**kw), 2)
    check_folds(lambda **kw: DigitsDataModule(train_classes=[0, 2, 4, 6, 8, 9], **kw), 3)


def test_glyphs_folds() -> None:
    check_folds(lambda **kw: GlyphsDataModule(max_classes=24, **kw), 3)


def test_glyphs_pool_is_the_train_and_val_classes() -> None:
    dm = GlyphsDataModule(max_classes=24, num_folds=2, fold=0)
    train, val, test = split_classes(dm.table.num_classes, 0.65, 0.175, 0, 24)
    codepoints = dm.table.codepoints
    assert dm.cv_pool_classes == sorted(codepoints[np.concatenate([train, val])].tolist())
    assert set(dm.cv_pool_classes).isdisjoint(codepoints[test].tolist())


def test_image_folder_folds(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    check_folds(lambda **kw: ImageFolderDataModule(str(root), **{**FAST, **kw}), 3)


def test_cub_folds(tmp_path: Path) -> None:
    root = _cub(tmp_path)
    check_folds(lambda **kw: CUB200DataModule(str(root), **{**FAST, **kw}), 4)
    assert len(CUB200DataModule(str(root), **FAST).cv_pool_classes) == 100  # classes 1-100


def test_sop_folds(tmp_path: Path) -> None:
    _write_sop(tmp_path)
    check_folds(lambda **kw: SOPDataModule(str(tmp_path), **{**FAST, **kw}), 2)


def test_inshop_folds_validate_on_one_loader_and_test_on_query_gallery(tmp_path: Path) -> None:
    _write_inshop(tmp_path, [["train", "train"]] * 4 + [["query", "gallery", "gallery"]] * 3)
    base = InShopDataModule(str(tmp_path), **FAST)
    dm = InShopDataModule(str(tmp_path), num_folds=2, fold=1, **FAST)
    assert dm.cv_pool_classes == [f"id_{i:08d}" for i in range(1, 5)]
    assert dm.num_classes == 2
    val = dm.val_dataloader()
    assert val.dataset.classes == dm.fold_classes[1] and len(val.dataset) == 4
    for ours, theirs in zip(dm.test_dataloader(), base.test_dataloader(), strict=True):
        _assert_same_split(ours.dataset, theirs.dataset)
    assert dm.shared_eval_splits() is None


def test_no_folds_serves_the_data_sets_own_splits(tmp_path: Path) -> None:
    """``num_folds=None``: setup serves exactly what ``build_datasets`` makes of the data set."""
    for dm in (
        DigitsDataModule(seed=3),
        GlyphsDataModule(max_classes=24, seed=3),
        ImageFolderDataModule(str(_folder(tmp_path)), seed=3, **FAST),
    ):
        dm.setup()
        fresh = dm.build_datasets()
        assert set(dm.datasets) == set(fresh) == {"train", "val", "test"}
        for split in fresh:
            _assert_same_split(dm.datasets[split], fresh[split])
        assert dm.num_classes == len(fresh["train"].classes)


def test_moved_files_get_the_transform_of_their_new_split(tmp_path: Path) -> None:
    augmented = Preprocessing(mode="RGB", size=(9, 9))  # stands in for a training transform

    class Marked(ImageFolderDataModule):
        def transform(self, split: str) -> Any:
            return augmented if split == "train" else self.preprocessing

    root = _folder(tmp_path)
    base = Marked(str(root), **FAST)
    base.setup()
    from_val = set(base.dataset("val").paths)
    from_train = set(base.dataset("train").paths)
    moved_in = moved_out = 0
    for fold in range(3):
        dm = Marked(str(root), num_folds=3, fold=fold, **FAST)
        dm.setup()
        train, val = dm.dataset("train"), dm.dataset("val")
        assert train.transform is augmented and val.transform is dm.preprocessing
        moved_in += len(from_val & set(train.paths))
        moved_out += len(from_train & set(val.paths))
        assert dm.input_preprocessing() == base.input_preprocessing()
    assert moved_in > 0 and moved_out > 0  # both directions happen in some fold


def test_array_folds_keep_the_stored_pixels_and_scale() -> None:
    dm = DigitsDataModule(num_folds=2, fold=0)
    base = DigitsDataModule()
    assert dm.input_preprocessing() == base.input_preprocessing()
    dm.setup()
    assert dm.dataset("train").scale == dm.dataset("val").scale == 1.0 / 16.0
    assert dm.dataset("train").images.dtype == base.dataset("train").images.dtype


def test_folds_do_not_warn_about_shared_eval_splits(tmp_path: Path) -> None:
    root = _cub(tmp_path)
    with pytest.warns(UserWarning, match="checkpoints chosen on val are chosen on the test set"):
        CUB200DataModule(str(root), **FAST).setup()
    dm = CUB200DataModule(str(root), num_folds=2, fold=0, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup()
    assert dm.shared_eval_splits() is None


def test_m_per_class_batches_draw_from_the_fold_training_classes() -> None:
    dm = DigitsDataModule(num_folds=2, fold=1, batch_size=8, m_per_class=4)
    train_classes = dm.fold_train_classes
    assert len(train_classes) >= 2
    batches = list(dm.train_dataloader())
    assert batches
    for batch in batches:
        counts = Counter(batch["label"].tolist())
        assert sorted(counts.values()) == [4, 4]
        assert {dm.dataset("train").classes[c] for c in counts} <= set(train_classes)


def test_predict_split_val_serves_the_fold() -> None:
    dm = DigitsDataModule(num_folds=2, fold=0, predict_split="val")
    assert dm.predict_dataloader().dataset.classes == dm.fold_classes[0]


def test_a_plain_array_data_module_gets_folds_from_its_datasets() -> None:
    class Tiny(ArrayDataModule):
        image_size = 4

        def build_datasets(self) -> dict[str, ArrayDataset]:
            images = torch.arange(12 * 16, dtype=torch.uint8).reshape(12, 4, 4)
            labels = torch.arange(12) % 6
            return {
                "train": ArrayDataset(images[labels < 4], labels[labels < 4], [10, 11, 12, 13]),
                "val": ArrayDataset(images[labels == 4], labels[labels == 4] - 4, [14]),
                "test": ArrayDataset(images[labels == 5], labels[labels == 5] - 5, [15]),
            }

    check_folds(lambda **kw: Tiny(batch_size=2, **kw), 5)


def test_fit_through_the_cli_validates_on_the_fold(tmp_path: Path) -> None:
    from tiny_digits import DIGITS, smoke_args

    from lightning_metric.cli import main

    args = ["--data.init_args.num_folds=2", "--data.init_args.fold=1", "--trainer.max_epochs=1"]
    cli = main(["fit", "--config", DIGITS, *smoke_args(tmp_path), *args])
    dm = cli.datamodule
    assert (dm.num_folds, dm.fold) == (2, 1)
    assert cli.model.head.weight.shape[0] == dm.num_classes == len(dm.fold_train_classes)
    assert "val/recall@1" in cli.trainer.callback_metrics
    loader = cli.trainer.val_dataloaders
    served = {loader.dataset.classes[label] for b in loader for label in b["label"].tolist()}
    assert served == set(dm.fold_classes[1])
    assert served.isdisjoint(dm.dataset("train").classes)


@pytest.mark.usefixtures("one_thread")
def test_resume_with_folds_is_exact(tmp_path: Path) -> None:
    """fit(2 epochs) == fit(1 epoch) + resume to 2, on a fold's training items."""
    from test_resume import TOL, _final, _last, _max_diff, _module, _trainer

    def data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=40, seed=3, num_folds=2, fold=1)

    whole, first = tmp_path / "whole", tmp_path / "first"
    _trainer(whole, [_last(whole)]).fit(_module("triplet"), data())
    _trainer(first, [_last(first)], max_epochs=1).fit(_module("triplet"), data())
    resumed = _trainer(first, [_last(first)])
    resumed.fit(_module("triplet"), data(), ckpt_path=str(first / "last.ckpt"))
    assert _max_diff(_final(whole), _final(first)) <= TOL


def test_the_cli_schema_lists_num_folds_and_fold() -> None:
    from jsonargparse import ArgumentParser

    for cls in (DigitsDataModule, GlyphsDataModule, ImageFolderDataModule, CUB200DataModule):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        actions = {a.dest.removeprefix("data."): a for a in parser._actions}
        for name in ("num_folds", "fold"):
            assert actions[name].default is None and actions[name].help, (cls, name)
