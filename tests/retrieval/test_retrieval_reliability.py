"""No silently wrong numbers: repeated dataset indexes, DDP padding, self-matches, and an
index directory that survives an interrupted save. References are NumPy brute force."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_retrieval import DictDataset, Tiny, clustered, trainer, validate_on_ranks
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

import lightning_metric.retrieval.accumulator as accumulator_module
from lightning_metric.callbacks import RecallAtK
from lightning_metric.distributed import unpad_gathered
from lightning_metric.retrieval import RetrievalMetrics, knn, retrieval_metrics
from lightning_metric.retrieval.index import EmbeddingIndex

KS = (1, 2, 4)


def brute_recall(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out recall@k by cosine, over scorable queries (float64, full sort)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    hits = []
    for i in range(len(x)):
        if (labels == labels[i]).sum() < 2:
            continue
        top = np.argsort(-sim[i], kind="stable")[:k]
        hits.append(bool((labels[top] == labels[i]).any()))
    return float(np.mean(hits))


def concat_data() -> tuple[ConcatDataset, torch.Tensor, torch.Tensor]:
    """Two datasets whose ``index`` fields both start at 0: indexes repeat across them."""
    x1, l1 = clustered(40, 8, seed=1)
    x2, l2 = clustered(31, 8, seed=2)
    data = ConcatDataset([DictDataset(x1, l1), DictDataset(x2, l2)])
    return data, torch.cat([x1, x2]), torch.cat([l1, l2])


# ---------------------------------------------------------------- repeated dataset indexes


def test_metric_keeps_repeated_indexes_in_one_process() -> None:
    data, x, labels = concat_data()
    index = torch.cat([torch.arange(40), torch.arange(31)])
    m = RetrievalMetrics(k=KS, map_at_r=False, mrr=False, precision=False)
    for rows in torch.arange(len(x)).split(8):
        m.update(x[rows], labels[rows], index[rows])
    got = m.compute()
    full = {k: brute_recall(x.numpy(), labels.numpy(), k) for k in KS}
    for k in KS:
        assert got[f"recall@{k}"].item() == pytest.approx(full[k], abs=1e-6)
    # What deduplicating by index used to report: the first 40 items only.
    subset = {k: brute_recall(x[:40].numpy(), labels[:40].numpy(), k) for k in KS}
    assert any(abs(full[k] - subset[k]) > 1e-3 for k in KS)


def test_recall_callback_on_concat_dataset_scores_every_item() -> None:
    data, x, labels = concat_data()
    (val,) = trainer(RecallAtK(k=KS)).validate(
        Tiny(), DataLoader(data, batch_size=8), verbose=False
    )
    expected = retrieval_metrics(x, labels, KS)
    for k in KS:
        assert val[f"val/recall@{k}"] == pytest.approx(brute_recall(x.numpy(), labels.numpy(), k))
    assert val["val/map@r"] == pytest.approx(expected["map@r"], abs=1e-6)
    assert val["val/unscorable_queries"] == expected["unscorable_queries"]


# ---------------------------------------------------------------- DDP padding


def sampler_rows(
    n: int, world: int, index_field: np.ndarray, shuffle: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """What every rank of a DistributedSampler sees, gathered in rank order: (rank, dataset
    index field, dataset position) per row, and the unpadded global order."""
    ranks, index, items = [], [], []
    for r in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=shuffle, seed=3)
        for position in sampler:
            ranks.append(r)
            index.append(int(index_field[position]))
            items.append(position)
    one = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=3)
    return torch.tensor(ranks), torch.tensor(index), torch.tensor(items), list(one)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [12, 13, 47])
@pytest.mark.parametrize("shuffle", [False, True])
def test_unpad_drops_exactly_the_padding(world: int, n: int, shuffle: bool) -> None:
    repeated = np.concatenate([np.arange(n // 2), np.arange(n - n // 2)])  # ConcatDataset-like
    ranks, index, items, order = sampler_rows(n, world, repeated, shuffle)
    keep = unpad_gathered(ranks, world, index, dataset_size=n)
    assert items[keep].tolist() == order  # every item once, in single-process order
    # Unique indexes: the padding is found without the dataset size too.
    ranks, index, items, order = sampler_rows(n, world, np.arange(n), shuffle)
    assert items[unpad_gathered(ranks, world, index)].tolist() == order


def test_unpad_refuses_to_guess_and_keeps_everything_in_one_process() -> None:
    repeated = np.concatenate([np.arange(20), np.arange(27)])
    ranks, index, _, _ = sampler_rows(47, 2, repeated, shuffle=False)
    with pytest.raises(ValueError, match=r"not unique per item.*Pass the dataset size"):
        unpad_gathered(ranks, 2, index)
    with pytest.raises(ValueError, match=r"gathered 48 rows from 2 ranks .* dataset of 40 items"):
        unpad_gathered(ranks, 2, index, dataset_size=40)
    single = torch.zeros(5, dtype=torch.long)
    assert unpad_gathered(single, 1, torch.tensor([0, 0, 1, 1, 2])).tolist() == [0, 1, 2, 3, 4]


def simulate_ddp_metric(
    monkeypatch: pytest.MonkeyPatch,
    world: int,
    x: torch.Tensor,
    labels: torch.Tensor,
    index_field: np.ndarray,
    dataset_size: int | None,
) -> dict[str, float]:
    """RetrievalMetrics fed what each rank of a DistributedSampler run sees, in the order
    torchmetrics' gather concatenates it (rank after rank), then computed as under DDP."""
    m = RetrievalMetrics(k=KS)
    ranks, _, items, _ = sampler_rows(len(x), world, index_field, shuffle=False)
    field = torch.as_tensor(index_field)
    for r in range(world):
        monkeypatch.setattr(accumulator_module, "rank", lambda r=r: r)
        for batch in items[ranks == r].split(5):  # dataset positions of this rank's batches
            m.update(x[batch], labels[batch], field[batch], dataset_size=dataset_size)
    monkeypatch.setattr(accumulator_module, "world_size", lambda: world)
    return {name: v.item() for name, v in m.compute().items()}


@pytest.mark.parametrize("world", [2, 3])
def test_metric_under_simulated_ddp_equals_one_process(
    monkeypatch: pytest.MonkeyPatch, world: int
) -> None:
    _, x, labels = concat_data()
    repeated = np.concatenate([np.arange(40), np.arange(31)])
    single = RetrievalMetrics(k=KS)
    single.update(x, labels, torch.as_tensor(repeated))
    expected = {name: v.item() for name, v in single.compute().items()}
    got = simulate_ddp_metric(monkeypatch, world, x, labels, repeated, dataset_size=len(x))
    assert got == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="not unique per item"):
        simulate_ddp_metric(monkeypatch, world, x, labels, repeated, dataset_size=None)


@pytest.mark.ddp
def test_ddp_on_concat_dataset_equals_one_process(tmp_path: Path) -> None:
    data, x, labels = concat_data()  # 71 items: DistributedSampler pads 1 row on 2 ranks
    loader = DataLoader(data, batch_size=8)
    runs = [
        validate_on_ranks(devices, tmp_path / f"devices{devices}", loader, [RecallAtK(k=KS)])
        for devices in (1, 2)
    ]
    single, ddp = runs
    assert ddp == single
    for k in KS:
        assert single[f"val/recall@{k}"] == pytest.approx(
            brute_recall(x.numpy(), labels.numpy(), k)
        )


# ---------------------------------------------------------------- self-matches


def test_knn_of_a_set_with_itself_excludes_self_matches() -> None:
    x, _ = clustered(30, 5)
    with pytest.warns(UserWarning, match="same rows as `query`"):
        same = knn(x, x.clone(), k=3)
    assert torch.equal(same.indices, knn(x, k=3).indices)
    assert not (same.indices == torch.arange(30)[:, None]).any()
    plain = knn(x, x, k=3, exclude=torch.full((30,), -1))  # full control: self first
    assert torch.equal(plain.indices[:, 0], torch.arange(30))


def test_retrieval_metrics_with_the_query_set_as_reference_is_leave_one_out() -> None:
    x, labels = clustered(60, 12, seed=5)
    with pytest.warns(UserWarning, match="reference set is the query set"):
        got = retrieval_metrics(x, labels, KS, reference_embeddings=x, reference_labels=labels)
    assert got == retrieval_metrics(x, labels, KS)
    assert got["recall@1"] == pytest.approx(brute_recall(x.numpy(), labels.numpy(), 1))
    assert got["recall@1"] < 1.0  # self-matches would have made it 1.0


def test_recall_callback_with_the_same_data_as_query_and_gallery() -> None:
    x, labels = clustered(48, 12, seed=6)
    loaders = [DataLoader(DictDataset(x, labels), batch_size=8) for _ in range(2)]
    cb = RecallAtK(k=KS, query_dataloader_idx=0, reference_dataloader_idx=1)
    with pytest.warns(UserWarning, match="reference items are the query items again"):
        (val, _) = trainer(cb).validate(Tiny(), loaders, verbose=False)
    assert val["val/recall@1"] == pytest.approx(brute_recall(x.numpy(), labels.numpy(), 1))
    assert val["val/recall@1"] < 1.0


# ---------------------------------------------------------------- index directory saves


def two_indexes() -> tuple[EmbeddingIndex, EmbeddingIndex]:
    g = torch.Generator().manual_seed(0)
    old = EmbeddingIndex(torch.randn(20, 6, generator=g), labels=torch.arange(20) % 4)
    new = EmbeddingIndex(torch.randn(35, 6, generator=g), ids=torch.arange(100, 135))
    return old, new


def assert_is(loaded: EmbeddingIndex, expected: EmbeddingIndex) -> None:
    np.testing.assert_array_equal(loaded.embeddings, expected.embeddings)
    np.testing.assert_array_equal(loaded.ids, expected.ids)
    np.testing.assert_array_equal(loaded.labels, expected.labels)
    q = expected.embeddings[:3]
    np.testing.assert_array_equal(loaded.search(q, k=2).ids, expected.search(q, k=2).ids)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def fail_on_call(real: object, n: int) -> object:
    calls = iter(range(10**6))

    def wrapped(*args: object, **kwargs: object) -> object:
        if next(calls) == n:
            raise OSError("No space left on device")
        return real(*args, **kwargs)  # type: ignore[operator]

    return wrapped


@pytest.mark.parametrize("where", ["second npy file", "faiss file", "swap rename"])
def test_interrupted_save_keeps_the_old_index(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    import faiss

    import lightning_metric.retrieval.index.core as search

    old, new = two_indexes()
    directory = old.save(tmp_path / "index")
    if where == "second npy file":
        monkeypatch.setattr(search.np, "save", fail_on_call(np.save, 1))
    elif where == "faiss file":
        monkeypatch.setattr(faiss, "write_index", fail_on_call(faiss.write_index, 0))
    else:  # the rename that puts the new folder in place (after the old one moved aside)
        monkeypatch.setattr(search.os, "rename", fail_on_call(os.rename, 1))
    with pytest.raises(OSError, match="No space left"):
        new.save(directory)
    monkeypatch.undo()
    assert_is(EmbeddingIndex.load(directory), old)
    assert leftovers(tmp_path) == []
    new.save(directory)  # and the next save goes through
    assert_is(EmbeddingIndex.load(directory), new)
    assert leftovers(tmp_path) == []


def test_save_keeps_other_files_and_drops_stale_index_files(tmp_path: Path) -> None:
    old, new = two_indexes()
    with_paths = EmbeddingIndex(old.embeddings, paths=[f"img{i}.png" for i in range(20)])
    directory = with_paths.save(tmp_path / "index")
    (directory / "notes.txt").write_text("mine")
    new.save(directory)
    assert (directory / "notes.txt").read_text() == "mine"
    assert not (directory / "paths.txt").exists()  # the new index stores no paths
    loaded = EmbeddingIndex.load(directory)
    assert loaded.paths is None
    assert_is(loaded, new)


def test_load_points_to_the_old_index_left_by_a_crash_between_renames(tmp_path: Path) -> None:
    old, _ = two_indexes()
    directory = old.save(tmp_path / "index")
    moved = tmp_path / ".index.previous-1234abcd"
    directory.rename(moved)  # the state a crash between the two renames leaves
    with pytest.raises(FileNotFoundError, match=r"previous index in .*previous-1234abcd"):
        EmbeddingIndex.load(directory)
    assert_is(EmbeddingIndex.load(moved), old)
