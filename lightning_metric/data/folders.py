"""Image files on disk: a dataset of (path, label) pairs and ImageFolderDataModule.

Images that fail to decode raise :class:`ImageDecodeError` naming the file; they are never
skipped silently, because skipping changes the class split, the per-class counts that
m-per-class batches rely on and the retrieval metrics. ``verify_images=True`` decodes every
image once in ``setup`` and lists all bad files in one error, before training starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from lightning_metric.checks import check_choice, check_fraction, check_int
from lightning_metric.data.base import ArrayDataModule
from lightning_metric.data.folds import select_classes
from lightning_metric.data.preprocess import (
    ImageDecodeError,
    Preprocessing,
    PreprocessingError,
    _to_mode,
    open_image,
    single_record,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFileDataset",
    "ImageFileDataModule",
    "ImageFolderDataModule",
    "load_image",
    "standard_transform",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Transforms = Literal["standard", "resize"]
TRANSFORMS: tuple[Transforms, ...] = ("standard", "resize")


def load_image(path: Union[str, Path], mode: str = "RGB") -> Any:
    """Decode ``path`` as a PIL image in ``mode``, or raise :class:`ImageDecodeError` naming it
    (16-bit grayscale is scaled to 8 bits, not clipped)."""
    return _to_mode(open_image(path), mode, str(path))


def standard_transform(
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    kind: Transforms = "standard",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], torch.Tensor]:
    """The usual metric-learning transforms (as in the Proxy-Anchor / MS-loss code bases).

    ``"standard"``: train ``RandomResizedCrop(image_size)`` + horizontal flip (torchvision),
    eval ``Resize(resize_size)`` + ``CenterCrop(image_size)``; both ``ToTensor`` + ImageNet
    ``Normalize``. ``"resize"``: a plain resize to ``image_size`` squared and normalisation,
    without augmentation (pre-cropped data, quick tests). Every transform without
    augmentation is a :class:`~lightning_metric.data.preprocess.Preprocessing` (no
    torchvision needed), the record the index manifest and the export sidecar store.
    """
    kind = check_choice("transforms", kind, TRANSFORMS)
    if kind == "resize" or not train:
        return Preprocessing(
            mode="RGB",
            size=(image_size, image_size),
            resize=resize_size if kind == "standard" else None,
            mean=tuple(mean),
            std=tuple(std),
        )
    try:
        from torchvision import transforms as T
    except ImportError as err:
        raise ImportError(
            "transforms='standard' uses torchvision: pip install 'lightning-metric[vision]', "
            "or set transforms: resize"
        ) from err
    steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class ImageFileDataset(Dataset[dict[str, torch.Tensor]]):
    """Images read from files; item ``i`` is ``{"x": float [3, H, W], "label": int64, "index": i}``.

    ``paths[i]`` is the file of item ``i`` and ``classes[label]`` the original class (folder
    name or class id), as in :class:`~lightning_metric.data.ArrayDataset`.
    """

    def __init__(
        self,
        paths: Sequence[Union[str, Path]],
        labels: Union[Sequence[int], np.ndarray],
        classes: Sequence[Any],
        transform: Optional[Callable[[Any], torch.Tensor]] = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(
                f"{len(paths)} paths but {len(labels)} labels; expected one label per path"
            )
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        i = i % len(self)
        if isinstance(self.transform, Preprocessing):
            x = self.transform.load(self.paths[i])
        else:
            img = load_image(self.paths[i])
            if self.transform is None:
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            else:
                x = self.transform(img)
        return {
            "x": x,
            "label": self.labels[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def verify(self) -> None:
        """Decode every image; raise one :class:`ImageDecodeError` listing all that fail."""
        bad = []
        for path in self.paths:
            try:
                load_image(path)
            except ImageDecodeError as err:
                bad.append(f"{path} ({err.__cause__ or err})")
        if bad:
            listing = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
            raise ImageDecodeError(
                f"{len(bad)} of {len(self.paths)} images cannot be decoded:\n  {listing}"
            )


def check_files_exist(paths: Sequence[str], listed_in: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {listed_in} are missing, e.g. "
            f"{missing[0]!r}; is the data set fully extracted under the root given?"
        )


def require_dir(root: Union[str, Path], what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} root {str(path)!r} does not exist or is not a directory")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"expected {what} file {str(path)!r}, which does not exist")
    return path


class ImageFileDataModule(ArrayDataModule):
    """Loaders for image files, on top of the built-in DataModules' loaders (same batches,
    seeding, ``m_per_class`` and DDP behaviour).

    Subclasses fill ``self.splits``: split name -> ``(paths, labels, classes)``, with labels in
    ``[0, len(classes))``. Per-image torchvision transforms (see :func:`standard_transform`)
    run in the dataset, so the batch-level augmentation of the in-memory data sets is off.

    Args:
        batch_size: training batch size (also evaluation unless ``eval_batch_size``).
        num_workers: DataLoader worker processes (images are decoded in them).
        image_size: side of the square model input, in pixels.
        resize_size: side the evaluation images are resized to before the centre crop.
        transforms: ``"standard"`` or ``"resize"``, see :func:`standard_transform`.
        verify_images: decode every image in ``setup`` and report all bad files at once.
        **kwargs: the other arguments of :class:`~lightning_metric.data.ArrayDataModule`
            (``seed``, ``augment``, ``eval_batch_size``, ``predict_split``, ``m_per_class``).
    """

    in_channels = 3

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 4,
        *,
        image_size: int = 224,
        resize_size: int = 256,
        transforms: Transforms = "standard",
        verify_images: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.resize_size = check_int("resize_size", resize_size, minimum=1)
        self.transforms: Transforms = check_choice("transforms", transforms, TRANSFORMS)
        if self.transforms == "standard" and self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size {self.resize_size} is smaller than image_size {self.image_size}: "
                "the centre crop would be padded with black; use resize_size >= image_size"
            )
        self.verify_images = verify_images
        self.splits: dict[str, tuple[list[str], np.ndarray, list[Any]]] = {}
        #: The evaluation transform and the record written to indexes and export sidecars.
        self.preprocessing = standard_transform(
            False, self.image_size, self.resize_size, self.transforms
        )

    def split_class_ids(self) -> dict[str, list[Any]]:
        """The classes of each split as read from the layout (before any folds)."""
        return {split: list(classes) for split, (_, _, classes) in self.splits.items()}

    def fold_datasets(self, datasets: dict[str, Any]) -> dict[str, Any]:
        """``datasets`` with train and val re-cut into the folds; each file is read with the
        transform of the split it lands in (a val file moved into training is augmented)."""
        parts, cut = self.fold_parts(datasets)
        paths = [path for part in parts for path in part.paths]
        out = dict(datasets)
        for split, (rows, labels, classes) in cut.items():
            out[split] = ImageFileDataset(
                [paths[row] for row in rows], labels, classes, self.transform(split)
            )
        return out

    def make_augment(self) -> Any:
        return None  # per-image transforms in the dataset instead

    def transform(self, split: str) -> Callable[[Any], torch.Tensor]:
        """The per-image transform of ``split``: ``self.preprocessing`` unless augmenting."""
        if split == "train" and self.augment:
            return standard_transform(True, self.image_size, self.resize_size, self.transforms)
        return self.preprocessing

    def input_preprocessing(self) -> Preprocessing:
        """The record of the evaluation transform (see ``ArrayDataModule.input_preprocessing``);
        a :class:`PreprocessingError` names the split whose transform no record describes."""
        self.setup()
        name = type(self).__name__
        evaluated = (split for split in self.datasets if split != "train")
        return single_record(name, (self._split_record(name, split) for split in evaluated))

    def _split_record(self, name: str, split: str) -> tuple[str, Preprocessing]:
        dataset = self.datasets[split]
        transform = getattr(dataset, "transform", None)
        plain = type(dataset).__getitem__ is ImageFileDataset.__getitem__
        if not plain or not isinstance(transform, Preprocessing):
            raise PreprocessingError(
                f"the {split} split of {name} is read with {transform!r} "
                f"({type(dataset).__name__}), not a lightning_metric.data.Preprocessing: "
                "no record says how an image file becomes its inputs; return a "
                "Preprocessing from transform(split) or define input_preprocessing()"
            )
        return split, transform

    def build_datasets(self) -> dict[str, Any]:
        datasets: dict[str, Any] = {}
        for name, (paths, labels, classes) in self.splits.items():
            check_files_exist(paths, f"the {name} split of {type(self).__name__}")
            datasets[name] = ImageFileDataset(paths, labels, classes, self.transform(name))
            if self.verify_images:
                datasets[name].verify()
        rank_zero_info(
            f"{type(self).__name__}: "
            + ", ".join(
                f"{n} {len(d)} images / {d.num_classes} classes" for n, d in datasets.items()
            )
        )
        return datasets


def _label_split(
    paths: list[str], class_ids: Sequence[Any], keep: Sequence[Any]
) -> tuple[list[str], np.ndarray, list[Any]]:
    """The items whose class is in ``keep``, labelled by position in sorted ``keep``."""
    rows, labels, classes = select_classes(class_ids, keep)
    return [paths[i] for i in rows], labels, classes


def _check_class_list(name: str, value: Optional[Sequence[str]], found: list[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or len(value) == 0:
        # An empty list would silently fall back to the fraction; a string splits into letters.
        raise ValueError(
            f"{name}={value!r} names no class: list at least one class folder, or leave "
            f"{name} unset to draw the classes by fraction"
        )
    unknown = sorted(set(value) - set(found))
    if unknown:
        raise ValueError(
            f"{name} {unknown} are not class folders (found {found[:10]}"
            f"{' ...' if len(found) > 10 else ''})"
        )
    return sorted(set(value))


def _check_split_arguments(
    val_fraction: float,
    test_fraction: float,
    val_classes: Optional[Sequence[str]],
    test_classes: Optional[Sequence[str]],
) -> None:
    """What can be checked before the folder is read (the class names are checked after)."""
    for name, value in (("val_classes", val_classes), ("test_classes", test_classes)):
        if value is not None and (isinstance(value, str) or len(value) == 0):
            _check_class_list(name, value, [])
    both = sorted(set(val_classes or ()) & set(test_classes or ()))
    if both:
        raise ValueError(
            f"val_classes and test_classes share {both}: val and test must be class-disjoint "
            "(else checkpoints are chosen on the test set)"
        )
    if val_classes is None:
        check_fraction("val_fraction", val_fraction)
    if test_classes is None and not (
        isinstance(test_fraction, (int, float))
        and not isinstance(test_fraction, bool)
        and test_fraction == 0
    ):
        check_fraction("test_fraction", test_fraction)


def split_folder_classes(
    found: Sequence[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    val_classes: Optional[Sequence[str]] = None,
    test_classes: Optional[Sequence[str]] = None,
) -> tuple[list[str], list[str], list[str]]:
    """Class-disjoint train / val / test class names (each sorted), drawn by ``seed``.

    Explicit lists win; the remaining held-out split gets ``round(fraction * len(found))``
    (at least one) classes drawn by ``seed`` from those not named. ``test_fraction=0`` and no
    ``test_classes``: no test classes of its own (``test`` is ``val``; the data module warns).
    """
    _check_split_arguments(val_fraction, test_fraction, val_classes, test_classes)
    found = sorted(found)
    val = _check_class_list("val_classes", val_classes, found)
    test = _check_class_list("test_classes", test_classes, found)
    shared = test_classes is None and test_fraction == 0
    free = [found[i] for i in np.random.default_rng(seed).permutation(len(found))]
    free = [c for c in free if c not in val and c not in test]
    if not val:
        n_val = max(1, round(val_fraction * len(found)))
        val, free = sorted(free[:n_val]), free[n_val:]
    if not test and not shared:
        n_test = max(1, round(test_fraction * len(found)))
        test, free = sorted(free[:n_test]), free[n_test:]
    train = sorted(free)
    if not train or (not shared and not test):
        raise ValueError(
            f"{len(found)} classes leave no {'training' if not train else 'test'} class after "
            f"val {len(val)} (val_fraction={val_fraction}, val_classes={val_classes}) and test "
            f"{len(test)} (test_fraction={test_fraction}, test_classes={test_classes}); lower "
            "the fractions, name fewer classes, or set test_fraction=0 to test on the val "
            "classes"
        )
    return train, val, test if not shared else val


class ImageFolderDataModule(ImageFileDataModule):
    """One folder per class under ``root`` (``root/<class>/<image>``), split class-disjointly.

    Validation classes are ``val_classes`` (folder names) if given, else ``val_fraction`` of
    the classes drawn by ``seed``; test classes likewise (``test_classes`` /
    ``test_fraction``), disjoint from val; training uses the rest. So by default a checkpoint
    chosen on ``val`` is scored on ``test`` classes it was not chosen on. ``test_fraction=0``
    (without ``test_classes``) tests on the val classes instead, with a warning at setup.

    Args:
        root: the directory holding one sub-directory per class.
        val_fraction: fraction of classes for validation when ``val_classes`` is not given.
        test_fraction: fraction of classes for test when ``test_classes`` is not given;
            0: test on the val classes (warned).
        val_classes: explicit validation class folder names.
        test_classes: explicit test class folder names (disjoint from ``val_classes``).
        extensions: file name endings counted as images (case-insensitive).
        **kwargs: the arguments of :class:`ImageFileDataModule` (``batch_size``,
            ``image_size``, ``transforms``, ...) and of ``ArrayDataModule`` (``seed`` also
            draws the held-out classes).
    """

    save_init_hyperparameters = True

    def __init__(
        self,
        root: str,
        *,
        val_fraction: float = 0.25,
        test_fraction: float = 0.25,
        val_classes: Optional[list[str]] = None,
        test_classes: Optional[list[str]] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_split_arguments(val_fraction, test_fraction, val_classes, test_classes)
        self.root = require_dir(root, "ImageFolderDataModule")
        exts = tuple(e.lower() for e in extensions)
        paths: list[str] = []
        class_ids: list[str] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            files = sorted(
                f.path
                for f in os.scandir(entry.path)
                if f.is_file() and f.name.lower().endswith(exts)
            )
            paths += files
            class_ids += [entry.name] * len(files)
        found = sorted(set(class_ids))
        if len(found) < 2:
            raise FileNotFoundError(
                f"expected one sub-directory per class with images ({', '.join(exts)}) under "
                f"{str(self.root)!r}; found {len(found)} such folder(s)"
            )
        try:
            train, val, test = split_folder_classes(
                found, self.seed, val_fraction, test_fraction, val_classes, test_classes
            )
        except ValueError as err:
            raise type(err)(f"{err} (in {str(self.root)!r})") from None
        held_out = _label_split(paths, class_ids, val)
        self.splits = {
            "train": _label_split(paths, class_ids, train),
            "val": held_out,
            "test": held_out if test == val else _label_split(paths, class_ids, test),
        }
        self.check_folds()
