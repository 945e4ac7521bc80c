"""In-memory image datasets and the DataModule plumbing the built-in datasets share."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_metric.checks import check_choice, check_int, check_positive_int
from lightning_metric.data.augment import BatchCollate, RandomAffineNoise
from lightning_metric.data.folds import check_fold_arguments, class_folds, select_classes
from lightning_metric.data.preprocess import Preprocessing, PreprocessingError, single_record
from lightning_metric.data.samplers import EpochShuffleSampler, MPerClassSampler

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


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


def _samplers(loader: DataLoader) -> list[object]:
    """The loader's batch sampler, its index sampler and ``batch_sampler.sampler`` (no repeats)."""
    found: dict[int, object] = {}
    batch_sampler = loader.batch_sampler
    for obj in (batch_sampler, loader.sampler, getattr(batch_sampler, "sampler", None)):
        if obj is not None:
            found.setdefault(id(obj), obj)
    return list(found.values())


def _loader_epoch(loader: DataLoader) -> Optional[int]:
    for obj in _samplers(loader):
        epoch = getattr(obj, "epoch", None)
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            return epoch
    return None


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can resume mid-epoch, exactly.

    Its samplers derive each epoch's batches from (seed, epoch, rank) alone (see
    :class:`ArrayDataModule`), so the loader's state is two integers: the epoch and how many
    batches of it were handed out. Lightning stores ``state_dict()`` in every checkpoint (the
    loader is ``Stateful``) and, when resuming mid-epoch, calls ``load_state_dict`` before
    iterating; the next pass of that same epoch then skips the batches already trained on, at
    the index level (nothing is loaded or augmented for them).

    ``epoch`` is handed to the samplers' ``set_epoch`` on construction. Lightning calls
    ``set_epoch`` itself at every epoch start, but only after creating the epoch's iterator, and
    with ``num_workers > 0`` the iterator starts drawing indices at creation: without ``epoch``
    the first epoch of a resumed run would be drawn as epoch 0. Lightning re-creates the loader
    under DDP with the same arguments, so the epoch also reaches its ``DistributedSampler``.
    """

    def __init__(self, dataset: Dataset[Any], *args: Any, epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch = epoch
        self._index_wrapper = _ResumingIndexSampler(self)
        self._yielded = 0
        self._resume: Optional[tuple[Optional[int], int]] = None
        for obj in _samplers(self):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    @property
    def _index_sampler(self) -> Any:
        # torch reads this to draw the indices of each batch; wrapping it here (instead of the
        # batch sampler, which cannot be replaced after construction) lets a resumed epoch start
        # at the right batch. Persistent workers re-iterate the same object every epoch.
        wrapper = self.__dict__.get("_index_wrapper")
        if wrapper is None:  # during DataLoader.__init__
            return super()._index_sampler
        return wrapper

    def _take_resume(self) -> int:
        """Batches to skip at the start of the pass that is beginning (once, then 0)."""
        resume, self._resume = self._resume, None
        if resume is None:
            return 0
        epoch, batches = resume
        current = _loader_epoch(self)
        if epoch is not None and current is not None and epoch != current:
            return 0  # the checkpoint ended its epoch: this pass starts a new one
        return min(batches, len(self))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = 0
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": _loader_epoch(self), "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches", 0)
        if (epoch is not None and not isinstance(epoch, int)) or not isinstance(batches, int):
            raise ValueError(f"not a ResumableDataLoader state: {state_dict!r}")
        self._resume = (epoch, batches)


class _ResumingIndexSampler:
    """What the loader's iterators draw batches of indices from: the loader's batch sampler,
    less the batches a resumed epoch has already trained on."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        # The loader holds this object and its (persistent) iterator does too: a weak reference
        # back keeps them out of a reference cycle, so the workers stop when the loader goes.
        self.loader = weakref.ref(loader)
        self.base: Any = (
            loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        )

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader()
        skip = 0
        if loader is not None:
            skip = loader._take_resume()
            loader._yielded = skip
        del loader
        indices = iter(self.base)
        for _ in range(skip):
            next(indices, None)
        yield from indices

    def __len__(self) -> int:
        return len(self.base)


class _CountingIterator:
    """Counts the batches the loader has handed out this pass (what ``state_dict`` records)."""

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator[Any]) -> None:
        self.loader = loader
        self.iterator = iterator

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


def same_items(a: object, b: object) -> bool:
    """Whether two datasets hold the same items: the same files, or the same stored arrays."""
    paths_a, paths_b = getattr(a, "paths", None), getattr(b, "paths", None)
    if paths_a is not None and paths_b is not None:
        return list(paths_a) == list(paths_b)
    if isinstance(a, ArrayDataset) and isinstance(b, ArrayDataset):
        return a.images.shape == b.images.shape and bool(torch.equal(a.images, b.images))
    return False


def _array_preprocessing(dataset: object, where: str) -> Preprocessing:
    """The record of an :class:`ArrayDataset` whose items are ``stored pixels * scale``."""
    if not isinstance(dataset, ArrayDataset) or type(dataset)._batch is not ArrayDataset._batch:
        raise PreprocessingError(
            f"{where} is a {type(dataset).__name__}, not a plain ArrayDataset: how an image "
            "file becomes its items is unknown; define input_preprocessing() on the data module"
        )
    images = dataset.images
    channels, height, width = images.shape[1:]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise PreprocessingError(
            f"{where} has {channels}-channel images; an image file has 1 (L) or 3 (RGB)"
        )
    if images.dtype != torch.uint8:
        whole = bool(((images >= 0) & (images <= 255) & (images == images.round())).all())
        if not whole:
            raise PreprocessingError(
                f"{where} stores pixel values that are not integers in [0, 255] "
                f"(dtype {images.dtype}), so no 8-bit image file holds them; define "
                "input_preprocessing() on the data module"
            )
    return Preprocessing(mode=mode, size=(height, width), scale=dataset.scale)


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

    Resuming is exact: ``fit`` for N epochs and ``fit`` for k epochs then ``fit(ckpt_path=...)``
    to N give the same weights, optimizer and LR-scheduler state (bit for bit on CPU), from an
    end-of-epoch checkpoint and from a mid-epoch one (e.g. ``ModelCheckpoint(
    every_n_train_steps=...)``), with any ``num_workers`` (the result does not depend on it) and
    under DDP. The shuffle, the m-per-class plan and the augmentation are functions of (seed,
    epoch, rank, position), and the training loader (:class:`ResumableDataLoader`) puts its
    position in the checkpoint. Not covered: a resume that changes the batch size, the number
    of DDP processes or the seed; randomness drawn from torch's global generator by the model
    (dropout, class-centre sampling with ``sample_rate < 1``, random miners), which Lightning
    does not checkpoint; and under DDP the default shuffle is Lightning's ``DistributedSampler``,
    seeded by ``seed_everything`` (``PL_GLOBAL_SEED``), not by ``seed``: resume with the same one.

    The built-in data modules take these arguments through ``**kwargs`` (LightningCLI lists
    them, with their types, defaults and the help below, under each data module).

    Args:
        batch_size: training batch size (also evaluation unless ``eval_batch_size``).
        num_workers: DataLoader worker processes.
        seed: shuffling, the m-per-class plan and augmentation (and a data set's class split).
        augment: augment the training batches (see ``make_augment``).
        eval_batch_size: batch size of the val/test/predict loaders; default ``batch_size``.
        predict_split: which split ``predict_dataloader`` serves.
        m_per_class: if set, training batches hold this many samples of each of
            ``batch_size // m_per_class`` classes (:class:`MPerClassSampler`, DDP-aware).
        num_folds: class-disjoint k-fold cross-validation on the training classes (see
            below); ``None``: the data set's own train / val / test splits, unchanged.
        fold: with ``num_folds``, the 0-based index of the fold served as ``val``
            (an integer in ``[0, num_folds)``); must be unset without ``num_folds``.

    Cross-validation (Musgrave et al., "A Metric Learning Reality Check", 2020): checkpoints
    and hyper-parameters are chosen on folds of the training classes, never on the test
    classes. The *cross-validation pool* is every class of the train and val splits that is not
    a class of the test split, classes compared by their original identity
    (``dataset.classes[label]``: code point, digit, folder name, class id); see
    ``cv_pool_classes``. For glyphs that is the train and val classes, for digits (val and test
    share the evaluation digits) the train digits, for CUB / Cars / SOP / In-Shop (val is the
    test set) the train classes. :func:`~lightning_metric.data.class_folds` sorts the pool,
    permutes it by ``seed`` (a stream apart from the class split's) and deals it into
    ``num_folds`` folds whose sizes differ by at most one (``fold_classes``). With ``fold=i``:
    ``val`` holds the items of fold ``i``'s classes, ``train`` the items of the other folds'
    classes (``num_classes`` counts those), ``test`` is the data set's test split, unchanged.
    Labels are ``[0, n)`` per split and ``classes[label]`` keeps the original identity. Items
    of one class stay together; training items get the training augmentation or transform,
    ``val`` items the evaluation one, whichever split they came from. The same seed gives the
    same folds in every process and on every machine.
    """

    image_size: int
    in_channels: int = 1
    #: Save the constructor arguments as ``hparams`` (the built-in data sets do). Done in
    #: ``ArrayDataModule.__init__`` itself: Lightning then collects the arguments of every
    #: ``__init__`` up the chain of subclasses, including the defaults of the arguments they
    #: forward through ``**kwargs`` and so do not hold themselves.
    save_init_hyperparameters: ClassVar[bool] = False

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        eval_batch_size: Optional[int] = None,
        predict_split: Split = "test",
        m_per_class: Optional[int] = None,
        num_folds: Optional[int] = None,
        fold: Optional[int] = None,
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
        check_int("num_workers", num_workers, minimum=0)
        check_int("seed", seed)
        check_choice("predict_split", predict_split, SPLITS)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.predict_split: Split = predict_split
        self.m_per_class = m_per_class
        self.num_folds, self.fold = check_fold_arguments(num_folds, fold)
        self.datasets: dict[str, ArrayDataset] = {}
        # Built once for split_class_ids() by a subclass that does not override it; setup()
        # takes them over instead of building them again.
        self._built: Optional[dict[str, Any]] = None
        self._class_ids: Optional[dict[str, list[Any]]] = None
        self._folds: Optional[list[list[Any]]] = None
        if self.save_init_hyperparameters:
            self.save_hyperparameters()

    # -- hooks for subclasses -------------------------------------------------------------
    def build_datasets(self) -> dict[str, ArrayDataset]:
        raise NotImplementedError

    def make_augment(self) -> RandomAffineNoise:
        """The training augmentation; override to change its strength."""
        return RandomAffineNoise()

    def split_class_ids(self) -> dict[str, list[Any]]:
        """The original class identities of the ``train``, ``val`` and ``test`` splits as the
        data set defines them (before any folds). Subclasses override it when they know the
        classes without building the datasets; this default builds them (once)."""
        if self._class_ids is None:
            if self._built is None:
                self._built = self.build_datasets()
            ids = {}
            for split, dataset in self._built.items():
                classes = getattr(dataset, "classes", None)
                if classes is None:
                    raise ValueError(
                        f"the {split} split of {type(self).__name__} has no `classes` (the "
                        "original class of each label), so its classes cannot be compared "
                        "with the other splits'; pass classes= to its ArrayDataset"
                    )
                ids[split] = list(classes)
            self._class_ids = ids
        return self._class_ids

    # -- cross-validation folds -------------------------------------------------------------
    @property
    def cv_pool_classes(self) -> list[Any]:
        """The classes cross-validation deals into folds (sorted): the train and val classes
        that are not test classes (see the class docstring)."""
        ids = self.split_class_ids()
        test = set(ids.get("test", ()))
        return sorted((set(ids["train"]) | set(ids.get("val", ()))) - test)

    @property
    def fold_classes(self) -> list[list[Any]]:
        """The classes of each fold (``fold_classes[i]`` is served as ``val`` when
        ``fold=i``); raises without ``num_folds``."""
        if self.num_folds is None:
            raise ValueError(
                f"{type(self).__name__} has num_folds=None: set num_folds and fold to split "
                "the training classes into cross-validation folds"
            )
        if self._folds is None:
            pool = self.cv_pool_classes
            if self.num_folds > len(pool):
                raise ValueError(
                    f"{type(self).__name__}: num_folds={self.num_folds} is larger than the "
                    f"{len(pool)} classes of the cross-validation pool (the train and val "
                    f"classes that are not test classes{': ' + repr(pool) if len(pool) <= 10 else ''}"
                    f"); every fold needs a class, so use num_folds <= {len(pool)}"
                    + ("" if len(pool) >= 2 else " (and >= 2: use more training classes)")
                )
            folds = class_folds(pool, self.num_folds, self.seed)
            self._folds = [fold.tolist() for fold in folds]
        return self._folds

    def check_folds(self) -> None:
        """Raise now if ``num_folds`` does not fit the pool (data modules that know their
        classes at construction call it there, before anything is trained)."""
        if self.num_folds is not None:
            _ = self.fold_classes

    @property
    def fold_train_classes(self) -> list[Any]:
        """The classes of the training split with folds: those of every fold but ``fold``."""
        folds = self.fold_classes
        return sorted(c for i, f in enumerate(folds) if i != self.fold for c in f)

    @property
    def num_classes(self) -> int:
        """Number of training classes (the classification head's size); with ``num_folds``,
        the classes of the folds other than ``fold``."""
        if self.num_folds is not None:
            return len(self.fold_train_classes)
        return len(self.split_class_ids()["train"])

    def fold_parts(self, datasets: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The datasets folds take items from (train, and val unless it is the test set), and
        per new split (train, val) the ``(rows, labels, classes)`` of its items among theirs,
        counted in that order (see :func:`~lightning_metric.data.select_classes`)."""
        assert self.fold is not None
        parts = [
            datasets[split]
            for split in ("train", "val")
            if split in datasets and datasets[split] is not datasets.get("test")
        ]
        identities = [part.classes[label] for part in parts for label in part.labels.tolist()]
        keep = {"train": self.fold_train_classes, "val": self.fold_classes[self.fold]}
        return parts, {split: select_classes(identities, keep[split]) for split in keep}

    def fold_datasets(self, datasets: dict[str, Any]) -> dict[str, Any]:
        """``datasets`` with train and val re-cut into the folds (``num_folds`` set)."""
        parts, cut = self.fold_parts(datasets)
        scales = sorted({part.scale for part in parts})
        if len(scales) != 1:
            raise ValueError(
                f"the train and val splits of {type(self).__name__} have different pixel "
                f"scales {scales}; folds mix their items, so they must share one"
            )
        images = torch.cat([part.images for part in parts])
        out = dict(datasets)
        for split, (rows, labels, classes) in cut.items():
            out[split] = ArrayDataset(images[torch.from_numpy(rows)], labels, classes, scales[0])
        return out

    # -- LightningDataModule ----------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            datasets, self._built = self._built or self.build_datasets(), None
            if self.num_folds is not None:
                datasets = self.fold_datasets(datasets)
            self.datasets = datasets
            shared = self.shared_eval_splits()
            if shared:
                # Said once, where the splits are made: a checkpoint picked on val is then
                # picked on the test set, and test figures are optimistic.
                rank_zero_warn(
                    f"{type(self).__name__}: val and test serve {shared}; "
                    "checkpoints chosen on val are chosen on the test set"
                )

    def shared_eval_splits(self) -> Optional[str]:
        """Why ``val`` and ``test`` serve the same items, or ``None`` when they do not."""
        val, test = self.datasets.get("val"), self.datasets.get("test")
        if val is None or test is None:
            return None
        if val is test:
            return f"one dataset of {len(val)} items"
        if same_items(val, test):
            return f"the same {len(val)} items"
        return None

    def input_preprocessing(self) -> Preprocessing:
        """How an image file of this data set's kind becomes the tensor its evaluation loaders
        give the model (what the index manifest and the export sidecar record).

        Items held in memory (glyphs, digits) are read as a file holding the stored pixel
        values would be: a glyph PNG is 8-bit grayscale with bright ink, a digits PNG holds
        sklearn's values 0-16. Raises :class:`PreprocessingError` naming the reason when the
        evaluation inputs are not a plain function of such a file.
        """
        name = type(self).__name__
        if type(self)._eval_loader is not ArrayDataModule._eval_loader:
            raise PreprocessingError(
                f"{name} overrides _eval_loader, so its evaluation inputs are not known to be "
                "the stored pixels times the dataset's scale; define input_preprocessing() on "
                "it to describe them"
            )
        self.setup()
        return single_record(
            name,
            (
                (split, _array_preprocessing(dataset, f"the {split} split of {name}"))
                for split, dataset in self.datasets.items()
                if split != "train"
            ),
        )

    def dataset(self, split: Split) -> ArrayDataset:
        check_choice("split", split, SPLITS)
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
        # Exact resume (fit(N) == fit(k) + resume(N - k)), also with num_workers > 0: every random
        # stream of this loader is a fixed function of (seed, epoch, rank, position), as in
        # Lightning's DistributedSampler, instead of a generator that runs across epochs.
        # - order: EpochShuffleSampler / MPerClassSampler / DistributedSampler (under DDP) draw
        #   each epoch from (seed, epoch), and Lightning calls set_epoch at every epoch start;
        # - augmentation: seeded per batch from (seed, rank, the batch's indices), which the
        #   order fixes; so it does not matter which worker builds a batch, or how far ahead.
        # Saving generator states in the checkpoint instead (a DataModule state_dict) cannot be
        # exact with workers: their generators live in the worker processes and have run ahead
        # of the model by the prefetched batches. What is left to save is two integers (epoch,
        # batches handed out), kept by ResumableDataLoader for mid-epoch checkpoints.
        # Mixing the rank in keeps the augmentation streams of DDP ranks independent.
        seed = self.seed + 1_000_003 * self._rank()
        augment = self.make_augment() if self.augment else None
        collate = BatchCollate(augment, seed=seed, per_batch_seed=True)
        # Only seeds the workers' global RNGs (unused here); it keeps the loader from drawing
        # from torch's global generator.
        generator = torch.Generator().manual_seed(seed)
        order: dict[str, Any]
        if self.m_per_class is not None:
            # Same seed on every rank: all ranks must derive the same epoch plan to split it.
            sampler = MPerClassSampler(train.labels, self.m_per_class, self.batch_size, self.seed)
            order = {"batch_sampler": sampler}
        else:
            order = {
                "batch_size": self.batch_size,
                "sampler": EpochShuffleSampler(train, seed=self.seed),
                "drop_last": True,
            }
        return ResumableDataLoader(
            train,
            **order,
            collate_fn=collate,
            generator=generator,
            epoch=self._fit_epoch(),
            **self._worker_arguments(),
        )

    def _worker_arguments(self) -> dict[str, Any]:
        # Workers are started once, not at every epoch (or every validation run).
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def _fit_epoch(self) -> int:
        """The epoch the trainer's fit loop is about to run (restored on resume), else 0."""
        trainer = getattr(self, "trainer", None)
        progress = getattr(
            getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None
        )
        processed = getattr(progress, "processed", 0)
        return processed if isinstance(processed, int) else 0

    def _eval_loader(self, split: Split) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=BatchCollate(None),
            **self._worker_arguments(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)
