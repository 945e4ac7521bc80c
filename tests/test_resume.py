"""Exact resume: fit(N) == fit(k) + resume(N - k), weights, optimizer, scheduler and head stats.

The training loader's randomness (shuffle, m-per-class plan, augmentation) is derived from
(seed, epoch, rank, position) and the loader records how many batches of the epoch it handed
out (see ``ArrayDataModule.train_dataloader``). Every run here is compared through its final
checkpoint, so optimizer and LR-scheduler state are compared as well as the weights.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from pytorch_metric_learning.losses import TripletMarginLoss
from torch.utils.data import DataLoader

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
from lightning_metric.data import DigitsDataModule
from lightning_metric.data.augment import BatchCollate
from lightning_metric.data.base import ResumableDataLoader
from lightning_metric.data.samplers import EpochShuffleSampler, MPerClassSampler
from lightning_metric.heads import AdaFaceHead, CurricularFaceHead

TOL = 1e-6
BATCH = 40  # digits 0-4: 901 training images -> 22 batches an epoch (shuffled or m-per-class)


# -- a small, fast, fully deterministic run ----------------------------------------------------


def _module(objective: str) -> MetricLearningModule:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    if objective == "curricularface":
        kwargs["head"] = partial(CurricularFaceHead, scale=16.0, margin=0.3)
    elif objective == "adaface":
        kwargs["head"] = partial(AdaFaceHead, scale=16.0, margin=0.3)
    else:
        kwargs["loss"] = TripletMarginLoss(margin=0.2)
    return MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=4),
        embedding_dim=8,
        num_classes=5,
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        # stepped every batch, so a scheduler restored at the wrong step shows in the weights
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=7, gamma=0.8),
        lr_scheduler_interval="step",
        **kwargs,
    )


def _datamodule(m_per_class: Optional[int], workers: int) -> DigitsDataModule:
    return DigitsDataModule(batch_size=BATCH, seed=3, m_per_class=m_per_class, num_workers=workers)


def _trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


def _last(root: Path) -> ModelCheckpoint:
    # (with save_top_k=0 Lightning writes last.ckpt only when training ends, not every epoch)
    return ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1)


def _final(root: Path) -> dict[str, Any]:
    return torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts/lists of a checkpoint part into {path: tensor or number}."""
    if isinstance(obj, dict):
        return {
            k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}/{key}").items()
        }
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}/{i}").items()}
    return {prefix: obj}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest difference over weights, buffers, optimizer and LR-scheduler state."""
    worst = 0.0
    for part in ("state_dict", "optimizer_states", "lr_schedulers"):
        left, right = _leaves(a[part]), _leaves(b[part])
        assert left.keys() == right.keys(), part
        for key, x in left.items():
            y = right[key]
            if isinstance(x, torch.Tensor):
                worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0)
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                worst = max(worst, abs(float(x) - float(y)))
            else:
                assert x == y, key
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    return worst


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    """Persistent DataLoader workers stop when their loader is freed. DataModule construction
    (Lightning's save_hyperparameters) leaves a frame cycle that keeps the calling frames, and
    the loaders in them, alive until a garbage collection, and workers stopped from inside a
    collection each wait out a 5 s join. So tests drop their worker loaders with `del`; this
    collects whatever is left."""
    yield
    gc.collect()


_REFERENCE: dict[tuple[Any, ...], dict[str, Any]] = {}


def _uninterrupted(objective: str, m_per_class: Optional[int], tmp_root: Path) -> dict[str, Any]:
    """fit(2 epochs) once per configuration (workers do not change the result: tested below)."""
    key = (objective, m_per_class)
    if key not in _REFERENCE:
        root = tmp_root / f"reference-{objective}-{m_per_class}"
        _trainer(root, [_last(root)]).fit(_module(objective), _datamodule(m_per_class, 0))
        _REFERENCE[key] = _final(root)
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference")


CONFIGS = [
    pytest.param("curricularface", None, 0, id="curricularface-shuffle"),
    pytest.param("triplet", 8, 0, id="triplet-m_per_class"),
    pytest.param("adaface", None, 2, id="adaface-shuffle-2workers"),
    pytest.param("triplet", 8, 2, id="triplet-m_per_class-2workers"),
]


@pytest.mark.parametrize(("objective", "m_per_class", "workers"), CONFIGS)
def test_resume_after_an_epoch_is_exact(
    objective: str, m_per_class: Optional[int], workers: int, tmp_path: Path, reference_root: Path
) -> None:
    reference = _uninterrupted(objective, m_per_class, reference_root)
    first = tmp_path / "first"
    _trainer(first, [_last(first)], max_epochs=1).fit(
        _module(objective), _datamodule(m_per_class, workers)
    )
    second = tmp_path / "second"
    _trainer(second, [_last(second)]).fit(
        _module(objective), _datamodule(m_per_class, workers), ckpt_path=first / "last.ckpt"
    )
    resumed = _final(second)
    assert _max_diff(reference, resumed) <= TOL
    # The head's running statistics moved during training, so comparing them meant something.
    weights = resumed["state_dict"]
    if objective == "curricularface":
        assert weights["head.t"].abs() > 1e-3
    if objective == "adaface":
        assert weights["head.norm_mean"] != 20.0 and weights["head.norm_std"] != 100.0


@pytest.mark.parametrize(
    ("objective", "m_per_class", "workers"),
    [
        pytest.param("curricularface", None, 0, id="curricularface-shuffle"),
        pytest.param("triplet", 8, 2, id="triplet-m_per_class-2workers"),
    ],
)
def test_resume_mid_epoch_is_exact(
    objective: str, m_per_class: Optional[int], workers: int, tmp_path: Path, reference_root: Path
) -> None:
    reference = _uninterrupted(objective, m_per_class, reference_root)
    first = tmp_path / "first"
    steps = ModelCheckpoint(dirpath=first, every_n_train_steps=7, save_top_k=-1)
    # The first multiple of 7 steps past epoch 0: a few batches into epoch 1.
    stop = (len(_datamodule(m_per_class, 0).train_dataloader()) + 7) // 7 * 7
    _trainer(first, [steps], max_steps=stop).fit(_module(objective), _datamodule(m_per_class, 0))
    ckpt = first / f"epoch=1-step={stop}.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"][
        "combined_loader"
    ] == [{"epoch": 1, "batches": stop - len(_datamodule(m_per_class, 0).train_dataloader())}]
    second = tmp_path / "second"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(second, [_last(second)]).fit(
            _module(objective), _datamodule(m_per_class, workers), ckpt_path=ckpt
        )
    assert not [w for w in record if "not resumable" in str(w.message)]
    assert _max_diff(reference, _final(second)) <= TOL


class _PreFixDigits(DigitsDataModule):
    """The loader as it was before exact resume: RandomSampler and augmentation generators that
    run across epochs, restarted from the seed by a resumed run."""

    def train_dataloader(self) -> DataLoader:
        train = self.dataset("train")
        return DataLoader(
            train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=BatchCollate(self.make_augment(), seed=self.seed),
            generator=torch.Generator().manual_seed(self.seed),
        )


def test_control_the_pre_fix_loader_does_not_resume_exactly(tmp_path: Path) -> None:
    runs = {}
    for name, epochs, ckpt in (("full", 2, None), ("first", 1, None), ("second", 2, "first")):
        root = tmp_path / name
        _trainer(root, [_last(root)], max_epochs=epochs).fit(
            _module("curricularface"),
            _PreFixDigits(batch_size=BATCH, seed=3),
            ckpt_path=tmp_path / ckpt / "last.ckpt" if ckpt else None,
        )
        runs[name] = _final(root)
    assert _max_diff(runs["full"], runs["second"]) > 1e-3


# -- the pieces, without a Trainer -------------------------------------------------------------


def _indices(loader: DataLoader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def test_shuffle_is_a_function_of_seed_and_epoch() -> None:
    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=1), EpochShuffleSampler(data, seed=1)
    b.set_epoch(3)
    a.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == data
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochShuffleSampler(data, seed=2)) != list(EpochShuffleSampler(data, seed=1))
    # a plain loop that reuses the sampler without set_epoch still reshuffles
    c = EpochShuffleSampler(data, seed=1)
    first, second = list(c), list(c)
    assert first != second and c.epoch == 1
    c.set_epoch(1)
    assert list(c) == second


@pytest.mark.parametrize("m_per_class", [None, 8])
def test_batches_and_augmentation_do_not_depend_on_the_workers(m_per_class: Optional[int]) -> None:
    def epoch_batches(workers: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        loader = _datamodule(m_per_class, workers).train_dataloader()
        assert isinstance(loader, ResumableDataLoader)
        for sampler in (loader.sampler, loader.batch_sampler):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        batches = list(loader)
        del loader  # see _release
        return batches

    for epoch in (0, 1):
        serial, parallel = epoch_batches(0, epoch), epoch_batches(2, epoch)
        assert len(serial) == len(parallel) > 0
        for a, b in zip(serial, parallel, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
    assert not torch.equal(epoch_batches(0, 0)[0]["index"], epoch_batches(0, 1)[0]["index"])


def test_per_batch_augmentation_is_fixed_by_the_batch() -> None:
    dm = _datamodule(None, 0)
    collate = BatchCollate(dm.make_augment(), seed=5, per_batch_seed=True)
    train = dm.dataset("train")
    samples = [train[i] for i in (4, 9, 2)]
    once, again = collate(samples)["x"], collate(samples)["x"]
    assert torch.equal(once, again)
    assert not torch.equal(once, collate(samples[::-1])["x"].flip(0))  # another batch
    assert not torch.equal(once, BatchCollate(dm.make_augment(), 6, True)(samples)["x"])


@pytest.mark.parametrize("m_per_class", [None, 8])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_skips_the_batches_already_seen(
    m_per_class: Optional[int], workers: int
) -> None:
    full = _indices(_datamodule(m_per_class, 0).train_dataloader())
    loader = _datamodule(m_per_class, workers).train_dataloader()
    assert loader.state_dict() == {"epoch": 0, "batches": 0}
    batches = iter(loader)
    seen = [next(batches)["index"].tolist() for _ in range(5)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 5}
    # Run the epoch out: persistent workers left holding prefetched batches take seconds to stop
    # when the loader is garbage-collected.
    assert len(list(batches)) == len(full) - 5 and loader.state_dict()["batches"] == len(full)

    fresh = _datamodule(m_per_class, workers).train_dataloader()
    fresh.load_state_dict(state)
    assert len(fresh) == len(full)  # Lightning counts the epoch's batches from len()
    rest = _indices(fresh)
    assert seen + rest == full
    assert fresh.state_dict() == {"epoch": 0, "batches": len(full)}
    # the skip is used once: the next pass is a whole epoch
    assert len(_indices(fresh)) == len(full)
    # a state from another epoch (an epoch-end checkpoint) skips nothing
    other = _datamodule(m_per_class, workers).train_dataloader()
    other.load_state_dict({"epoch": 1, "batches": 5})
    assert _indices(other) == full
    del batches, loader, fresh, other  # see _release


def test_loader_epoch_reaches_the_samplers() -> None:
    # Lightning re-creates the loader under DDP with the same arguments; `epoch` goes with them.
    dm = _datamodule(8, 0)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, MPerClassSampler)
    again = ResumableDataLoader(
        loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn, epoch=3
    )
    assert loader.batch_sampler.epoch == 3 and again.state_dict()["epoch"] == 3
    with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
        again.load_state_dict({"epoch": "one", "batches": 2})


# -- 2-process CPU DDP (gloo), through the test harness's file:// rendezvous -------------------


def _ddp_trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    from ddp_harness import FileRendezvousDDP

    root.mkdir(parents=True, exist_ok=True)  # the rendezvous file goes there
    return _trainer(root, callbacks, strategy=FileRendezvousDDP(root), devices=2, **kwargs)


_DDP_REFERENCE: dict[tuple[Any, ...], dict[str, Any]] = {}


def _ddp_uninterrupted(
    objective: str, m_per_class: Optional[int], tmp_root: Path
) -> dict[str, Any]:
    key = (objective, m_per_class)
    if key not in _DDP_REFERENCE:
        root = tmp_root / f"ddp-reference-{objective}-{m_per_class}"
        _ddp_trainer(root, [_last(root)]).fit(_module(objective), _datamodule(m_per_class, 0))
        _DDP_REFERENCE[key] = _final(root)
    return _DDP_REFERENCE[key]


@pytest.mark.ddp
def test_ddp_resume_mid_epoch_is_exact(tmp_path: Path, reference_root: Path) -> None:
    """PML loss gathered across ranks + m-per-class batches split across ranks + augmentation."""
    reference = _ddp_uninterrupted("triplet", 8, reference_root)
    first = tmp_path / "first"
    steps = ModelCheckpoint(dirpath=first, every_n_train_steps=7, save_top_k=-1)
    per_rank = len(
        MPerClassSampler(_datamodule(8, 0).dataset("train").labels, 8, BATCH, 0, num_replicas=2)
    )
    stop = (per_rank + 7) // 7 * 7  # a few batches into epoch 1
    _ddp_trainer(first, [steps], max_steps=stop).fit(_module("triplet"), _datamodule(8, 0))
    ckpt = first / f"epoch=1-step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"] == [{"epoch": 1, "batches": stop - per_rank}]
    second = tmp_path / "second"
    _ddp_trainer(second, [_last(second)]).fit(_module("triplet"), _datamodule(8, 0), ckpt_path=ckpt)
    assert _max_diff(reference, _final(second)) <= TOL


class _KillRank(Callback):
    """Records every rank's pid; SIGKILLs rank ``rank`` after training step ``step``."""

    def __init__(self, folder: str, rank: int, step: int) -> None:
        self.folder, self.rank, self.step = folder, rank, step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.folder, f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            Path(self.folder, "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


# How soon after the kill the parent must have failed: far below the 60 s process-group timeout,
# so a pass shows nobody waited for a timeout.
REACTION_S = 30.0


@pytest.mark.ddp
def test_ddp_rank_killed_mid_epoch_fails_fast_and_the_rerun_matches(
    tmp_path: Path, reference_root: Path
) -> None:
    """Margin head (CurricularFace, its `t` synchronised across ranks) + DistributedSampler."""
    reference = _ddp_uninterrupted("curricularface", None, reference_root)
    run = tmp_path / "run"
    run.mkdir()
    kill_step = 901 // 2 // BATCH + 4  # a few batches into epoch 1 (11 batches per rank)
    trainer = _ddp_trainer(run, [_last(run), _KillRank(str(run), rank=1, step=kill_step)])
    with pytest.raises(Exception) as failure:
        trainer.fit(_module("curricularface"), _datamodule(None, 0))
    failed_at = time.time()
    killed_at = float((run / "killed_at").read_text())
    assert failed_at - killed_at < REACTION_S
    # The launcher's error names the lost rank; its exit status says how it was lost.
    assert "process 1 terminated with signal SIGKILL" in str(failure.value)
    procs = trainer.strategy.launcher.procs  # type: ignore[union-attr]
    assert procs[1].exitcode == -signal.SIGKILL and procs[0].exitcode not in (None, 0)
    for rank in (0, 1):  # no rank is left running (or unreaped)
        with pytest.raises(ProcessLookupError):
            os.kill(int((run / f"pid{rank}").read_text()), 0)
    assert multiprocessing.active_children() == []

    # Re-run from the last checkpoint (the end of epoch 0): the same result as never failing.
    assert torch.load(run / "last.ckpt", weights_only=False)["epoch"] == 0
    rerun = tmp_path / "rerun"
    _ddp_trainer(rerun, [_last(rerun)]).fit(
        _module("curricularface"), _datamodule(None, 0), ckpt_path=run / "last.ckpt"
    )
    assert _max_diff(reference, _final(rerun)) <= TOL
