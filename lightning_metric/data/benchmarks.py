"""The standard deep-metric-learning benchmarks, read from their usual on-disk layouts.

Nothing is downloaded: point ``root`` at the extracted data set. Standard splits (as in
Oh Song et al. 2016 and the papers that followed): train on the first half of the classes,
evaluate retrieval on the other half. ``val`` and ``test`` are that same evaluation half,
as in the literature (there is no separate validation set in these protocols); ``setup``
says so in a warning naming the data module, since a checkpoint chosen on ``val`` is then
chosen on the test set.

==============  ==============================================  =========================
data set        files expected under ``root``                   split
==============  ==============================================  =========================
CUB-200-2011    images.txt, image_class_labels.txt, images/     classes 1-100 / 101-200
Cars196         cars_annos.mat, car_ims/                        classes 1-98 / 99-196
SOP             Ebay_train.txt, Ebay_test.txt, <category>/      as listed (11,318 / 11,316)
In-Shop         list_eval_partition.txt, img/                   train / query + gallery
==============  ==============================================  =========================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from torch.utils.data import DataLoader

from lightning_metric.checks import check_choice
from lightning_metric.data.folders import (
    ImageFileDataModule,
    _label_split,
    require_dir,
    require_file,
)

__all__ = ["CUB200DataModule", "Cars196DataModule", "InShopDataModule", "SOPDataModule"]


def _read_table(path: Path, columns: int, header_lines: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of ``path`` with at least ``columns`` fields each."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= header_lines or not line.strip():
                continue
            fields = line.split()
            if len(fields) < columns:
                raise ValueError(
                    f"{str(path)!r} line {number}: expected {columns} whitespace-separated "
                    f"fields, got {line.strip()!r}"
                )
            rows.append(fields)
    return rows


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{str(path)!r}: {what} must be an integer, got {value!r}") from None


class _BenchmarkDataModule(ImageFileDataModule):
    """Shared constructor: the layout is read in ``__init__`` (text files only, fast) so that
    ``num_classes`` is known at once; image files are checked in ``setup``.

    Args:
        root: the extracted data set (see the table in this module's docstring).
        batch_size: training batch size (also evaluation unless ``eval_batch_size``).
        **kwargs: the arguments of :class:`~lightning_metric.data.ImageFileDataModule`
            (``image_size``, ``transforms``, ``m_per_class``, ...).
    """

    name = "benchmark"
    save_init_hyperparameters = True

    def __init__(self, root: str, batch_size: int = 120, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.root = require_dir(root, self.name)
        self.splits = self.read_layout(self.root)
        self.check_folds()

    def read_layout(self, root: Path) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
        raise NotImplementedError

    def shared_eval_splits(self) -> Optional[str]:
        shared = super().shared_eval_splits()
        if shared is None:
            return None
        return f"{shared} (the {self.name} protocol has no validation split)"


def _train_test_by_class(
    paths: list[str], class_ids: list[int], num_train_classes: int
) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
    present = sorted(set(class_ids))
    train = [c for c in present if c <= num_train_classes]
    test = [c for c in present if c > num_train_classes]
    held_out = _label_split(paths, class_ids, test)
    return {"train": _label_split(paths, class_ids, train), "val": held_out, "test": held_out}


class CUB200DataModule(_BenchmarkDataModule):
    """CUB-200-2011 (Wah et al. 2011): 11,788 bird images of 200 species.

    ``root`` is the extracted ``CUB_200_2011`` directory (``images.txt``,
    ``image_class_labels.txt``, ``images/``). Train on classes 1-100 (5,864 images), evaluate
    on 101-200 (5,924 images). ``classes[label]`` is the official class id.
    """

    name = "CUB-200-2011"

    def read_layout(self, root: Path) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
        images_txt = require_file(root / "images.txt", "CUB-200-2011 image list")
        labels_txt = require_file(root / "image_class_labels.txt", "CUB-200-2011 class label")
        images = {r[0]: r[1] for r in _read_table(images_txt, 2)}
        labels = {r[0]: _int(r[1], labels_txt, "class id") for r in _read_table(labels_txt, 2)}
        unlabelled = sorted(set(images) - set(labels), key=lambda s: (len(s), s))
        if unlabelled:
            raise ValueError(
                f"{str(labels_txt)!r} has no class for image ids {unlabelled[:5]} listed in "
                f"{str(images_txt)!r}"
            )
        ids = sorted(images, key=lambda s: (len(s), s))
        paths = [str(root / "images" / images[i]) for i in ids]
        return _train_test_by_class(paths, [labels[i] for i in ids], 100)


class Cars196DataModule(_BenchmarkDataModule):
    """Stanford Cars (Krause et al. 2013): 16,185 images of 196 car models.

    ``root`` holds ``cars_annos.mat`` and ``car_ims/`` (the "all images" release). Train on
    classes 1-98 (8,054 images), evaluate on 99-196 (8,131 images); the official train/test
    flag in the annotations is ignored, as in the metric-learning protocol.
    """

    name = "Cars196"

    def read_layout(self, root: Path) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
        from scipy.io import loadmat

        mat_path = require_file(root / "cars_annos.mat", "Cars196 annotation")
        try:
            # Only numeric arrays and strings: scipy never unpickles anything here.
            mat = loadmat(mat_path, squeeze_me=True)
            annotations = np.atleast_1d(mat["annotations"])
            rel_paths = [str(a) for a in annotations["relative_im_path"]]
            class_ids = [int(c) for c in annotations["class"]]
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"{str(mat_path)!r} is not the Cars196 annotation file: expected a struct array "
                f"'annotations' with fields 'relative_im_path' and 'class' ({err})"
            ) from err
        paths = [str(root / p) for p in rel_paths]
        return _train_test_by_class(paths, class_ids, 98)


class SOPDataModule(_BenchmarkDataModule):
    """Stanford Online Products (Oh Song et al. 2016): 120,053 images of 22,634 products.

    ``root`` is ``Stanford_Online_Products/`` with ``Ebay_train.txt`` (59,551 images,
    11,318 classes) and ``Ebay_test.txt`` (60,502 images, 11,316 classes); each lists
    ``image_id class_id super_class_id path`` after a header line.
    """

    name = "Stanford Online Products"

    def read_layout(self, root: Path) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
        splits = {}
        for name, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
            path = require_file(root / file, f"Stanford Online Products {name} list")
            rows = _read_table(path, 4, header_lines=1)
            class_ids = [_int(r[1], path, "class_id") for r in rows]
            paths = [str(root / r[3]) for r in rows]
            splits[name] = _label_split(paths, class_ids, sorted(set(class_ids)))
        overlap = set(splits["train"][2]) & set(splits["test"][2])
        if overlap:
            raise ValueError(
                f"Ebay_train.txt and Ebay_test.txt share class ids {sorted(overlap)[:5]}; the "
                "standard split is class-disjoint"
            )
        return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}


InShopSplit = Literal["train", "query", "gallery"]
IN_SHOP_SPLITS: tuple[InShopSplit, ...] = ("train", "query", "gallery")


class InShopDataModule(_BenchmarkDataModule):
    """In-Shop Clothes Retrieval (Liu et al. 2016): 52,712 images of 7,982 items.

    ``root`` holds ``list_eval_partition.txt`` (or ``Eval/list_eval_partition.txt``) and the
    ``img/`` folder it refers to. Train on the ``train`` items (25,882 images, 3,997 items);
    evaluation searches the 14,218 ``query`` images among the 12,612 ``gallery`` images
    (3,985 items). ``val_dataloader``/``test_dataloader`` return ``[query, gallery]``: use
    ``RecallAtK(query_dataloader_idx=0, reference_dataloader_idx=1)``. Query and gallery
    labels share one numbering (``classes[label]`` is the item id), so they compare.
    ``predict_split`` is ``"train"``, ``"query"`` or ``"gallery"``.

    With ``num_folds``, the folds split the training items and ``val_dataloader`` returns one
    loader of the fold's items (leave-one-out retrieval: configure ``RecallAtK`` without
    ``query_dataloader_idx`` for validation); ``test_dataloader`` stays ``[query, gallery]``.
    """

    name = "In-Shop"

    def __init__(self, root: str, *, predict_split: InShopSplit = "gallery", **kwargs: Any) -> None:
        """
        Args:
            root: holds ``list_eval_partition.txt`` and ``img/``.
            predict_split: which split ``predict_dataloader`` serves.
            **kwargs: the arguments of the other benchmark data modules.
        """
        check_choice("predict_split", predict_split, IN_SHOP_SPLITS)
        # The base knows train/val/test; query/gallery are this class's own.
        super().__init__(root, predict_split="test", **kwargs)
        self.predict_subset: InShopSplit = predict_split

    def read_layout(self, root: Path) -> dict[str, tuple[list[str], np.ndarray, list[Any]]]:
        candidates = [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"expected the In-Shop partition file at {str(candidates[0])!r} or "
                f"{str(candidates[1])!r}; neither exists"
            )
        # Line 1: the image count; line 2: the header "image_name item_id evaluation_status".
        rows = _read_table(path, 3, header_lines=2)
        by_split: dict[str, tuple[list[str], list[str]]] = {
            s: ([], []) for s in ("train", "query", "gallery")
        }
        for fields in rows:
            image, item, status = fields[0], fields[1], fields[2]
            if status not in by_split:
                raise ValueError(
                    f"{str(path)!r}: evaluation_status must be train, query or gallery, got "
                    f"{status!r} for {image!r}"
                )
            by_split[status][0].append(str(root / image))
            by_split[status][1].append(item)
        train_paths, train_items = by_split["train"]
        eval_items = sorted(set(by_split["query"][1]) | set(by_split["gallery"][1]))
        return {
            "train": _label_split(train_paths, train_items, sorted(set(train_items))),
            "query": _label_split(*by_split["query"], eval_items),
            "gallery": _label_split(*by_split["gallery"], eval_items),
        }

    def split_class_ids(self) -> dict[str, list[Any]]:
        """The training items, and the query and gallery items as the test classes."""
        query, gallery = self.splits["query"][2], self.splits["gallery"][2]
        return {"train": list(self.splits["train"][2]), "test": sorted(set(query) | set(gallery))}

    def dataset(self, split: str) -> Any:  # type: ignore[override]
        folded: tuple[str, ...] = ("val",) if self.num_folds is not None else ()
        check_choice("split", split, (*IN_SHOP_SPLITS, *folded))
        self.setup()
        return self.datasets[split]

    def shared_eval_splits(self) -> Optional[str]:
        if self.num_folds is not None:
            return None  # val is a fold of the training items
        query, gallery = self.datasets["query"], self.datasets["gallery"]
        return (
            f"the same [query, gallery] = [{len(query)}, {len(gallery)}] images (the In-Shop "
            "protocol has no validation split)"
        )

    def _loader(self, split: str) -> DataLoader:
        make: Callable[[str], DataLoader] = super()._eval_loader  # type: ignore[assignment]
        return make(split)

    def val_dataloader(self) -> Any:
        if self.num_folds is not None:
            return self._loader("val")
        return self.test_dataloader()

    def test_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return [self._loader("query"), self._loader("gallery")]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_subset)
