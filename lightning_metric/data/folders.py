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

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFileDataset",
    "ImageFileDataModule",
    "ImageFolderDataModule",
    "standard_transform",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Transforms = Literal["standard", "resize"]
TRANSFORMS: tuple[Transforms, ...] = ("standard", "resize")


class ImageDecodeError(OSError):
    """An image file exists but cannot be decoded."""


def load_image(path: Union[str, Path]) -> Any:
    """Decode ``path`` as an RGB PIL image, or raise :class:`ImageDecodeError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(
            f"cannot decode image {str(path)!r} ({type(err).__name__}: {err}); replace or "
            "remove the file (bad images are not skipped: that would change the splits)"
        ) from err


class _ResizeToTensor:
    """PIL image -> normalised float tensor [3, size, size]; no torchvision needed."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Any) -> torch.Tensor:
        from PIL import Image

        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def standard_transform(
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    kind: Transforms = "standard",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], torch.Tensor]:
    """The usual metric-learning transforms (as in the Proxy-Anchor / MS-loss code bases).

    ``"standard"`` (torchvision): train ``RandomResizedCrop(image_size)`` + horizontal flip,
    eval ``Resize(resize_size)`` + ``CenterCrop(image_size)``; both ``ToTensor`` + ImageNet
    ``Normalize``. ``"resize"``: a plain resize to ``image_size`` squared and normalisation,
    without torchvision and without augmentation (pre-cropped data, quick tests).
    """
    if check_choice("transforms", kind, TRANSFORMS) == "resize":
        return _ResizeToTensor(image_size, mean, std)
    try:
        from torchvision import transforms as T
    except ImportError as err:
        raise ImportError(
            "transforms='standard' uses torchvision: pip install 'lightning-metric[vision]', "
            "or set transforms: resize"
        ) from err
    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize_size), T.CenterCrop(image_size)]
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
                bad.append(f"{path} ({err.__cause__})")
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
        self.verify_images = verify_images
        self.splits: dict[str, tuple[list[str], np.ndarray, list[Any]]] = {}

    @property
    def num_classes(self) -> int:
        """Number of training classes (the classification head's size)."""
        return len(self.splits["train"][2])

    def make_augment(self) -> Any:
        return None  # per-image transforms in the dataset instead

    def transform(self, split: str) -> Callable[[Any], torch.Tensor]:
        train = split == "train" and self.augment
        return standard_transform(train, self.image_size, self.resize_size, self.transforms)

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
    classes = sorted(keep)
    position = {c: i for i, c in enumerate(classes)}
    rows = [i for i, c in enumerate(class_ids) if c in position]
    labels = np.array([position[class_ids[i]] for i in rows], dtype=np.int64)
    return [paths[i] for i in rows], labels, classes


class ImageFolderDataModule(ImageFileDataModule):
    """One folder per class under ``root`` (``root/<class>/<image>``), split class-disjointly.

    Validation classes are ``val_classes`` (folder names) if given, else a ``val_fraction``
    of the classes drawn by ``seed``; training uses the rest. ``val`` and ``test`` are the same
    held-out classes (retrieval on unseen classes, the usual protocol).

    Args:
        root: the directory holding one sub-directory per class.
        val_classes: explicit validation class folder names.
        val_fraction: fraction of classes held out when ``val_classes`` is not given.
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
        val_fraction: float = 0.5,
        val_classes: Optional[list[str]] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val_classes is not None and len(val_classes) == 0:
            # An empty list would silently fall back to val_fraction or hold out nothing.
            raise ValueError(
                "val_classes=[] names no class: list at least one class folder to hold out, "
                "or leave val_classes unset to hold out val_fraction of the classes"
            )
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
        if val_classes is not None:
            unknown = sorted(set(val_classes) - set(found))
            if unknown:
                raise ValueError(
                    f"val_classes {unknown} are not class folders of {str(self.root)!r} "
                    f"(found {found[:10]}{' ...' if len(found) > 10 else ''})"
                )
            val = sorted(set(val_classes))
        else:
            check_fraction("val_fraction", val_fraction)
            order = np.random.default_rng(self.seed).permutation(len(found))
            n_val = min(max(1, round(val_fraction * len(found))), len(found) - 1)
            val = sorted(found[i] for i in order[:n_val])
        train = sorted(set(found) - set(val))
        if not train:
            raise ValueError(
                f"val_classes take every class of {str(self.root)!r}; none left to train on"
            )
        held_out = _label_split(paths, class_ids, val)
        self.splits = {
            "train": _label_split(paths, class_ids, train),
            "val": held_out,
            "test": held_out,
        }
