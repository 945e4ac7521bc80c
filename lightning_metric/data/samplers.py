"""Batch samplers for metric learning: m-per-class batches that stay correct under DDP."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

from lightning_metric.checks import check_int as _check_int


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (ints, or arrays/tensors of ints).

    Used to derive every random stream of the training loader from (seed, epoch, rank,
    position) instead of from a generator that runs across epochs, so that a resumed run
    replays exactly the stream an uninterrupted run would have seen (see ``ArrayDataModule``).
    Unlike ``seed + epoch`` (what ``DistributedSampler`` uses), distinct tuples do not collide.
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"|")
    return int.from_bytes(digest.digest(), "little") >> 1


class EpochShuffleSampler(RandomSampler):
    """A random permutation of the dataset that is a fixed function of ``(seed, epoch)``.

    A drop-in for ``RandomSampler`` (``shuffle=True``): ``RandomSampler`` with a ``generator``
    draws each epoch's order from a generator that keeps running across epochs, so a run
    resumed from a checkpoint (fresh generator) replays epoch 0's order. Here, as in
    ``DistributedSampler``, the order depends only on the seed and the epoch given to
    ``set_epoch``, which Lightning calls at every epoch start. Iterating again without a
    ``set_epoch`` in between moves on to the next epoch, so a plain PyTorch loop that reuses
    the loader still reshuffles. Being a ``RandomSampler``, it is replaced by Lightning's
    ``DistributedSampler(shuffle=True)`` under DDP, as before.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed = _check_int("seed", seed)
        self.epoch = 0
        self._iterated = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._iterated = False

    def __iter__(self) -> Iterator[int]:
        if self._iterated:  # a second pass without set_epoch: next epoch
            self.epoch += 1
        self._iterated = True
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.data_source)  # type: ignore[arg-type]


class _EpochCounter(Sampler[int]):
    """Stand-in for ``MPerClassSampler.sampler``: Lightning calls ``set_epoch`` on
    ``dataloader.batch_sampler.sampler`` (not on the batch sampler), so the epoch lives here."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:  # never iterated; present for the Sampler protocol
        return iter(())

    def __len__(self) -> int:
        return 0


class MPerClassSampler(BatchSampler):
    """Yields batches of ``batch_size`` indices: ``m`` samples of each of ``batch_size // m``
    distinct classes. DDP-aware: every rank gets its own batches, disjoint from the other ranks'
    within an epoch, and the same number of them.

    Each epoch (seeded by ``seed`` and the epoch number, identically on every rank) every
    class's indices are shuffled and cut into chunks of ``m``; leftovers (``size % m``) sit the
    epoch out. Chunks are laid out class after class in a random class order and dealt to
    batches round-robin, so a class's chunks land in different batches; the batch order is
    shuffled and rank ``r`` of ``W`` takes batches ``r, r + W, ...``. So within an epoch no index
    is used twice (except the padding below), and ``len(self)`` is fixed across epochs.

    A class with fewer than ``m`` samples is padded by drawing from it again (with replacement)
    and a warning is given once, at construction: such classes are usually rare classes in
    real data, and dropping them silently would shrink the label space. Filter them out
    beforehand if duplicates within a batch are a problem for your loss.

    Rank and world size come from, in this order: ``rank``/``num_replicas`` if given, the
    ``DistributedSampler`` that Lightning injects as ``sampler`` (``use_distributed_sampler=True``,
    the default: only its rank and world size are read, its order is ignored), or
    ``torch.distributed`` if initialised (``use_distributed_sampler=False``). Either Trainer
    setting therefore gives the same batches. The epoch comes from ``set_epoch`` on this
    sampler or on its ``sampler`` (where Lightning calls it each epoch).
    """

    def __init__(
        self,
        labels: Union[Sequence[int], np.ndarray, torch.Tensor],
        m: int,
        batch_size: int,
        seed: int = 0,
        sampler: Optional[Sampler[int]] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        drop_last: bool = True,
    ) -> None:
        # BatchSampler.__init__ is not called: it needs an index sampler, which this class
        # replaces; `sampler`, `batch_size` and `drop_last` are kept for Lightning's inspection.
        _check_int("m", m, 1)
        _check_int("batch_size", batch_size, 1)
        if batch_size % m:
            raise ValueError(
                f"batch_size must be a multiple of m (samples per class): batch_size "
                f"{batch_size} is not divisible by m {m}"
            )
        _check_int("seed", seed)
        if not drop_last:
            raise ValueError(
                "MPerClassSampler always yields full m-per-class batches; drop_last must be True"
            )
        labels_np = (
            labels.detach().cpu().numpy()
            if isinstance(labels, torch.Tensor)
            else np.asarray(labels)
        )
        if labels_np.ndim != 1 or labels_np.size == 0:
            raise ValueError(
                f"labels must be a non-empty 1-d sequence, got shape {labels_np.shape}"
            )
        if not np.issubdtype(labels_np.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels_np.dtype}")

        self.m = m
        self.batch_size = batch_size
        self.drop_last = True
        self.seed = seed
        self.classes_per_batch = batch_size // m
        self.sampler: Sampler[int] = sampler if sampler is not None else _EpochCounter()
        self._epoch = 0

        order = np.argsort(labels_np, kind="stable")
        classes, starts, counts = np.unique(labels_np[order], return_index=True, return_counts=True)
        self._members = np.split(order, starts[1:])
        if len(classes) < self.classes_per_batch:
            raise ValueError(
                f"batch_size {batch_size} with m {m} needs {self.classes_per_batch} distinct "
                f"classes per batch, but the labels hold only {len(classes)} classes"
            )
        small = int((counts < m).sum())
        if small:
            warnings.warn(
                f"MPerClassSampler: {small} of {len(classes)} classes have fewer than m={m} "
                f"samples (smallest: {int(counts.min())}); they are padded by sampling with "
                "replacement, so their batches repeat samples",
                UserWarning,
                stacklevel=2,
            )

        self.num_replicas, self.rank = self._resolve_rank(num_replicas, rank, sampler)
        chunks_per_class = np.maximum(counts // m, 1)
        self.num_batches_total = self._count_batches(chunks_per_class, self.classes_per_batch)
        self._chunk_cap = self.num_batches_total
        self.num_batches = self.num_batches_total // self.num_replicas
        if self.num_batches == 0:
            raise ValueError(
                f"m-per-class sampling (m={m}, batch_size={batch_size}) forms only "
                f"{self.num_batches_total} batches per epoch from {len(labels_np)} samples, fewer "
                f"than the {self.num_replicas} ranks; lower batch_size or m"
            )

    @staticmethod
    def _resolve_rank(
        num_replicas: Optional[int], rank: Optional[int], sampler: Optional[Sampler[int]]
    ) -> tuple[int, int]:
        if isinstance(sampler, DistributedSampler):
            world, current = sampler.num_replicas, sampler.rank
        elif dist.is_available() and dist.is_initialized():
            world, current = dist.get_world_size(), dist.get_rank()
        else:
            world, current = 1, 0
        world = num_replicas if num_replicas is not None else world
        current = rank if rank is not None else current
        _check_int("num_replicas", world, 1)
        _check_int("rank", current, 0, world - 1)
        return world, current

    @staticmethod
    def _count_batches(chunks_per_class: np.ndarray, classes_per_batch: int) -> int:
        """Largest B such that the chunks, with at most B per class, fill B batches.

        A class can appear at most once per batch, so only min(chunks, B) of its chunks count;
        iterating B <- floor(sum(min(chunks, B)) / P) from above reaches that fixed point.
        """
        batches = int(chunks_per_class.sum()) // classes_per_batch
        while True:
            fits = int(np.minimum(chunks_per_class, batches).sum()) // classes_per_batch
            if fits == batches:
                return batches
            batches = fits

    @property
    def epoch(self) -> int:
        epoch = getattr(self.sampler, "epoch", None)
        return epoch if isinstance(epoch, int) else self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _epoch_batches(self) -> np.ndarray:
        """All ranks' batches for this epoch, ``[num_batches_total, batch_size]``, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        m, total = self.m, self.num_batches_total
        chunks = []
        for c in rng.permutation(len(self._members)):
            members = rng.permutation(self._members[c])
            if len(members) < m:
                members = np.concatenate([members, rng.choice(members, m - len(members))])
            n_chunks = min(len(members) // m, self._chunk_cap)
            chunks.append(members[: n_chunks * m].reshape(n_chunks, m))
        laid_out = np.concatenate(chunks)[: total * self.classes_per_batch]
        # Chunk t goes to batch t % total; a class's chunks are consecutive and at most `total`
        # many, so they land in distinct batches.
        batches = laid_out.reshape(self.classes_per_batch, total, m).transpose(1, 0, 2)
        return batches.reshape(total, self.batch_size)[rng.permutation(total)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        mine = batches[self.rank :: self.num_replicas][: self.num_batches]
        for batch in mine:
            yield batch.tolist()
