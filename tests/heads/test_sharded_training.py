"""Sharded class centres under Lightning's DDP (spawned gloo ranks on CPU): one training step
equals one process on the concatenated batch; checkpoints hold every centre and load into
any world size (2 -> 1, 1 -> 3, 2 -> 3); resume is exact."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from ddp_harness import FileRendezvousDDP
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sharded_heads import close
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_metric import MetricLearningModule
from lightning_metric.heads import (
    AdaFaceHead,
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    CurricularFaceHead,
    NormSoftmaxHead,
    ShardingError,
    SubCenterArcFaceHead,
)
from lightning_metric.heads.sharding import shard_bounds

F_IN, D, C, N, B = 12, 8, 7, 96, 8  # B per rank


class _Items(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(N, F_IN, generator=g)
        self.y = torch.randint(0, C, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": self.y[i], "index": i}


class _Data(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # Not shuffled (Lightning's own DistributedSampler always shuffles training data): rank
        # r of W reads items r, r + W, ..., so W ranks with batch B see the same W * B items
        # as one process with batch W * B. One batch an epoch: a step is an epoch, and a resume
        # starts where the uninterrupted run went on.
        rank, world = self.trainer.global_rank, self.trainer.world_size
        items = Subset(_Items(), range(rank, world * self.batch_size, world))
        return DataLoader(items, batch_size=self.batch_size)


class EvenClassesArcFace(ArcFaceHead):
    """Partial FC with a pick that is the same sharded or not: the batch's classes and every
    even class id (the default pick is random, so two runs could not be compared)."""

    def select_classes(self, labels: torch.Tensor, num_classes: int) -> Any:
        start = self.class_shard.start if self.class_shard is not None else 0
        ids = torch.arange(num_classes, device=labels.device)
        keep = (ids + start) % 2 == 0
        keep[labels] = True
        index = ids[keep]
        return index, torch.searchsorted(index, labels)


def _module(
    head: Any = ArcFaceHead, optimizer: Any = None, num_classes: int = C, **head_args: Any
) -> MetricLearningModule:
    torch.manual_seed(0)
    return MetricLearningModule(
        backbone=nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU()),
        neck=nn.Linear(16, D),  # no BatchNorm: its statistics are per rank, not global
        embedding_dim=D,
        head=partial(head, scale=16.0, shard_classes=True, **head_args),
        num_classes=num_classes,
        optimizer=optimizer or partial(torch.optim.SGD, lr=0.5),
    )


def trainer_for(
    root: Path, world: int, steps: int, strategy: Any, callbacks: list[Callback]
) -> pl.Trainer:
    """A CPU Trainer of ``steps`` steps without validation, keeping every checkpoint in
    ``root`` (``last.ckpt`` the newest), plus ``callbacks``."""
    return pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        use_distributed_sampler=False,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1), *callbacks],
    )


def _fit(
    root: Path,
    world: int,
    steps: int,
    module: MetricLearningModule,
    ckpt_path: Path | None = None,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    strategy = FileRendezvousDDP(root) if world > 1 else "auto"
    trainer = trainer_for(root, world, steps, strategy, callbacks or [])
    trainer.fit(module, _Data(B * 2 // world if world < 3 else B), ckpt_path=ckpt_path)
    return torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        close(a[key], b[key], key, tol)


def without(args: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k != key}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("head", "head_args"),
    [
        (NormSoftmaxHead, {}),
        (CosFaceHead, {}),
        (ArcFaceHead, {}),
        (SubCenterArcFaceHead, {"sub_centers": 2}),
        (CombinedMarginHead, {}),
        (CurricularFaceHead, {"momentum": 0.5}),
        (AdaFaceHead, {"momentum": 0.5}),
        # Partial FC, per shard; the data use classes 0-6 only, so odd classes 7-11 are out.
        (EvenClassesArcFace, {"sample_rate": 0.5, "num_classes": 12}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_one_ddp_step_equals_one_process(
    head: Any, head_args: dict[str, Any], tmp_path: Path
) -> None:
    # (Every head with random sampling, on 2 and 3 ranks: tests/heads/test_sharded_heads.py.)
    sharded = _fit(tmp_path / "ddp", 2, 1, _module(head, **head_args))
    whole = _fit(tmp_path / "one", 1, 1, _module(head, **head_args))
    # The checkpoint of the sharded run holds every centre, gathered from the two ranks.
    rows = head_args.get("num_classes", C) * head_args.get("sub_centers", 1)
    assert sharded["state_dict"]["head.weight"].shape == (rows, D)
    _assert_close(sharded["state_dict"], whole["state_dict"], 1e-5)
    # ... and loads in one process (2 -> 1), with the weights of the run.
    loaded = MetricLearningModule.load_from_checkpoint(
        tmp_path / "ddp" / "last.ckpt",
        backbone=nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU()),
        neck=nn.Linear(16, D),
        head=partial(head, scale=16.0, shard_classes=True, **without(head_args, "num_classes")),
    )
    torch.testing.assert_close(loaded.head.weight, sharded["state_dict"]["head.weight"])


class _SaveShard(Callback):
    """Each rank's centres and their Adam moments as training starts (after the restore)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight = pl_module.head.weight
        state = trainer.optimizers[0].state[weight]
        torch.save(
            {"weight": weight.detach().clone(), **{k: v.clone() for k, v in state.items()}},
            self.folder / f"shard{trainer.global_rank}.pt",
        )


def _adam() -> Any:
    return partial(torch.optim.AdamW, lr=1e-2)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The checkpoint of one AdamW step on 1 or 2 ranks (each made once, shared by tests)."""
    made: dict[int, Path] = {}

    def checkpoint(world: int) -> Path:
        if world not in made:
            root = tmp_path_factory.mktemp(f"one-step-{world}")
            _fit(root, world, 1, _module(optimizer=_adam()))
            made[world] = root / "last.ckpt"
        return made[world]

    return checkpoint


@pytest.mark.ddp
def test_resume_with_sharded_centres_is_exact(tmp_path: Path, one_step: Any) -> None:
    uninterrupted = _fit(tmp_path / "straight", 2, 2, _module(optimizer=_adam()))
    resumed = _fit(tmp_path / "second", 2, 2, _module(optimizer=_adam()), ckpt_path=one_step(2))
    _assert_close(resumed["state_dict"], uninterrupted["state_dict"], 0.0)
    moments = {
        f"{i}/{k}": v
        for i, s in uninterrupted["optimizer_states"][0]["state"].items()
        for k, v in s.items()
    }
    got = {
        f"{i}/{k}": v
        for i, s in resumed["optimizer_states"][0]["state"].items()
        for k, v in s.items()
    }
    _assert_close(got, moments, 0.0)


@pytest.mark.ddp
@pytest.mark.parametrize("source_world", [1, 2])
def test_checkpoint_reshards_into_three_ranks(
    source_world: int, tmp_path: Path, one_step: Any
) -> None:
    source_path = one_step(source_world)
    source = torch.load(source_path, map_location="cpu", weights_only=False)
    head_index = next(  # the centres' entry in the optimizer state
        i for i, s in source["optimizer_states"][0]["state"].items() if s["exp_avg"].shape == (C, D)
    )
    moments = source["optimizer_states"][0]["state"][head_index]
    out = tmp_path / "three"
    out.mkdir()
    final = _fit(
        out,
        3,
        2,
        _module(optimizer=_adam()),
        ckpt_path=source_path,
        callbacks=[_SaveShard(out)],
    )
    for rank, (start, stop) in enumerate(shard_bounds(C, 3)):
        shard = torch.load(out / f"shard{rank}.pt")
        torch.testing.assert_close(shard["weight"], source["state_dict"]["head.weight"][start:stop])
        torch.testing.assert_close(shard["exp_avg"], moments["exp_avg"][start:stop])
        torch.testing.assert_close(shard["exp_avg_sq"], moments["exp_avg_sq"][start:stop])
    assert final["state_dict"]["head.weight"].shape == (C, D)
    assert final["global_step"] == 2


def test_checkpoint_of_another_num_classes_names_file_and_shape(tmp_path: Path) -> None:
    _fit(tmp_path, 1, 1, _module())
    with pytest.raises(ShardingError, match=r"last\.ckpt.*shape \(7, 8\), expected \(9, 8\)"):
        MetricLearningModule.load_from_checkpoint(
            tmp_path / "last.ckpt",
            backbone=nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU()),
            neck=nn.Linear(16, D),
            head=partial(ArcFaceHead, scale=16.0),
            num_classes=9,
        )


def test_checkpoint_with_missing_shards_is_refused(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path, 1, 1, _module())
    ckpt["state_dict"]["head.weight"] = ckpt["state_dict"]["head.weight"][:4]  # one rank's rows
    torch.save(ckpt, tmp_path / "partial.ckpt")
    module = _module()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False)
    with pytest.raises(ShardingError, match=r"partial\.ckpt.*shape \(4, 8\), expected \(7, 8\)"):
        trainer.fit(module, _Data(B), ckpt_path=tmp_path / "partial.ckpt")
