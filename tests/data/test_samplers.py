"""Tests for MPerClassSampler: m-per-class batches, DDP rank splitting, epochs, seeds, Lightning."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from ddp_harness import FileRendezvousDDP
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_metric.data import DigitsDataModule, MPerClassSampler

# 40 classes of irregular sizes 5..17, shuffled order of appearance
_rng = np.random.default_rng(123)
LABELS = _rng.permutation(np.repeat(np.arange(40), _rng.integers(5, 18, size=40)))


def _epoch(sampler: MPerClassSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _assert_m_per_class(batch: list[int], labels: np.ndarray, m: int, batch_size: int) -> None:
    assert len(batch) == batch_size
    counts = Counter(labels[batch].tolist())
    assert set(counts.values()) == {m}, counts
    assert len(counts) == batch_size // m


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_batch_of_every_rank_is_m_per_class_and_ranks_are_disjoint(world_size: int) -> None:
    m, batch_size = 4, 16
    per_rank = [
        _epoch(MPerClassSampler(LABELS, m, batch_size, seed=7, num_replicas=world_size, rank=r))
        for r in range(world_size)
    ]
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1  # same number of batches on every rank
    assert lengths.pop() == len(MPerClassSampler(LABELS, m, batch_size, num_replicas=world_size))
    seen: list[int] = []
    for batches in per_rank:
        assert batches
        for batch in batches:
            _assert_m_per_class(batch, LABELS, m, batch_size)
            seen.extend(batch)
    assert len(seen) == len(set(seen))  # no index twice in an epoch, within or across ranks


def test_uses_most_of_the_data() -> None:
    m, batch_size = 4, 16
    sampler = MPerClassSampler(LABELS, m, batch_size)
    usable = sum(c // m * m for c in np.bincount(LABELS))
    assert len(sampler) * batch_size > 0.9 * usable


def test_new_order_each_epoch_and_deterministic_per_seed() -> None:
    a = MPerClassSampler(LABELS, 4, 16, seed=1, num_replicas=2, rank=1)
    b = MPerClassSampler(LABELS, 4, 16, seed=1, num_replicas=2, rank=1)
    c = MPerClassSampler(LABELS, 4, 16, seed=2, num_replicas=2, rank=1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 3) == _epoch(b, 3)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(c, 0)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch


def test_lightning_sets_the_epoch_through_the_inner_sampler() -> None:
    # Lightning calls set_epoch on dataloader.batch_sampler.sampler, not on the batch sampler.
    sampler = MPerClassSampler(LABELS, 4, 16, seed=0)
    first = list(sampler)
    sampler.sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert sampler.epoch == 1 and list(sampler) != first


def test_rank_and_world_size_from_an_injected_distributed_sampler() -> None:
    dataset = TensorDataset(torch.arange(len(LABELS)))
    injected: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=3, rank=2, seed=9)
    sampler = MPerClassSampler(LABELS, 4, 16, seed=5, sampler=injected)
    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    explicit = MPerClassSampler(LABELS, 4, 16, seed=5, num_replicas=3, rank=2)
    assert list(sampler) == list(explicit)
    injected.set_epoch(4)  # what Lightning does each epoch
    assert sampler.epoch == 4 and list(sampler) == _epoch(explicit, 4)


def test_class_smaller_than_m_is_padded_with_a_warning() -> None:
    labels = np.array([0] * 2 + [1] * 8 + [2] * 8 + [3] * 8)
    with pytest.warns(UserWarning, match="1 of 4 classes have fewer than m=4 samples"):
        sampler = MPerClassSampler(labels, 4, 8, seed=0)
    batches = _epoch(sampler)
    for batch in batches:
        _assert_m_per_class(batch, labels, 4, 8)
    padded = [b for b in batches if 0 in labels[b]]
    assert padded and all(set(b) & {0, 1} == {0, 1} for b in padded)  # both small-class samples


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 3, "batch_size": 16}, "batch_size 16 is not divisible by m 3"),
        ({"m": 0, "batch_size": 16}, "`m` must be an integer >= 1, got 0"),
        ({"m": 4, "batch_size": 0}, "`batch_size` must be an integer >= 1, got 0"),
        ({"m": 1, "batch_size": 41}, "needs 41 distinct classes per batch.*only 40 classes"),
        (
            {"m": 4, "batch_size": 16, "num_replicas": 2, "rank": 2},
            "`rank` must be an integer in \\[0, 1\\], got 2",
        ),
        ({"m": 4, "batch_size": 16, "seed": 1.5}, "`seed` must be an integer, got 1.5"),
        ({"m": 4, "batch_size": 16, "drop_last": False}, "drop_last must be True"),
        ({"m": 4, "batch_size": 160, "num_replicas": 64}, "fewer than the 64 ranks"),
    ],
)
def test_bad_input_raises(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MPerClassSampler(LABELS, **kwargs)  # type: ignore[arg-type]


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match="labels must be integers, got dtype float"):
        MPerClassSampler(np.array([0.5, 1.0]), 1, 1)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-d sequence"):
        MPerClassSampler([], 1, 1)


def test_datamodule_option_builds_m_per_class_batches() -> None:
    dm = DigitsDataModule(batch_size=32, m_per_class=8, seed=3)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, MPerClassSampler)
    labels = dm.dataset("train").labels.numpy()
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == len(loader) > 0
    for batch in batches:
        _assert_m_per_class(batch, labels, 8, 32)
    with pytest.raises(ValueError, match="batch_size 32 is not divisible by m_per_class 5"):
        DigitsDataModule(batch_size=32, m_per_class=5)


class _RecordingModel(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 2)
        self.out_dir = out_dir
        self.batches: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches.append(batch["index"].tolist())
        return self.layer(batch["x"].flatten(1)).sum()

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.batches))
        self.batches = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_rank_and_world_size_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Trainer(use_distributed_sampler=False): nothing is injected, the process group tells.
    from lightning_metric.data import samplers

    monkeypatch.setattr(samplers.dist, "is_available", lambda: True)
    monkeypatch.setattr(samplers.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(samplers.dist, "get_rank", lambda: 1)
    sampler = MPerClassSampler(LABELS, 4, 16, seed=5)
    assert (sampler.num_replicas, sampler.rank) == (3, 1)
    assert list(sampler) == list(MPerClassSampler(LABELS, 4, 16, seed=5, num_replicas=3, rank=1))


@pytest.mark.ddp
def test_lightning_ddp_keeps_m_per_class_batches(tmp_path: Path) -> None:
    # Default Trainer(use_distributed_sampler=True): Lightning re-creates the batch sampler with
    # its DistributedSampler injected; the batches must still be ours, split by rank.
    dm = DigitsDataModule(batch_size=32, m_per_class=8, augment=False, seed=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FileRendezvousDDP(tmp_path),
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(_RecordingModel(str(tmp_path)), datamodule=dm)
    labels = dm.dataset("train").labels.numpy()
    expected = len(MPerClassSampler(labels, 8, 32, num_replicas=2))
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert [len(r) for r in ranks] == [expected, expected]
        flat = [i for batches in ranks for batch in batches for i in batch]
        assert len(flat) == len(set(flat))  # ranks disjoint within the epoch
        for batches in ranks:
            for batch in batches:
                _assert_m_per_class(batch, labels, 8, 32)
    first = json.loads((tmp_path / "rank0_epoch0.json").read_text())
    second = json.loads((tmp_path / "rank0_epoch1.json").read_text())
    assert first != second  # Lightning's per-epoch set_epoch reached the sampler
