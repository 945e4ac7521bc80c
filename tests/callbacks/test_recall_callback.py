"""RecallAtK on a tiny LightningModule (independent of MetricLearningModule)."""

from __future__ import annotations

import pytest
import torch
from tiny_retrieval import DictDataset, Tiny, clustered, trainer
from torch.utils.data import DataLoader

from lightning_metric.callbacks import RecallAtK
from lightning_metric.retrieval import retrieval_metrics


class TupleDataset(DictDataset):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.x[i], self.labels[i]


@pytest.mark.parametrize("return_outputs", [True, False])
def test_validate_and_test_match_functional(return_outputs: bool) -> None:
    x, labels = clustered(101, 10)
    # One singleton class: unscorable, must be counted, not treated as a miss.
    labels[100] = 99
    loader = DataLoader(DictDataset(x, labels), batch_size=16)
    cb = RecallAtK(k=(1, 2, 4, 8))
    t = trainer(cb)
    (val,) = t.validate(Tiny(return_outputs), loader, verbose=False)
    (test,) = t.test(Tiny(return_outputs), loader, verbose=False)
    expected = retrieval_metrics(x, labels, (1, 2, 4, 8), precision=False)
    assert expected["unscorable_queries"] == 1.0
    for name, value in expected.items():
        assert val[f"val/{name}"] == pytest.approx(value, abs=1e-6)
        assert test[f"test/{name}"] == pytest.approx(value, abs=1e-6)


def test_tuple_batches_without_outputs() -> None:
    x, labels = clustered(40, 4)
    loader = DataLoader(TupleDataset(x, labels), batch_size=8)
    (val,) = trainer(RecallAtK(k=[1, 3])).validate(Tiny(False), loader, verbose=False)
    expected = retrieval_metrics(x, labels, (1, 3), precision=False)
    assert val["val/recall@3"] == pytest.approx(expected["recall@3"], abs=1e-6)


def test_query_gallery_dataloaders() -> None:
    xq, lq = clustered(30, 5, seed=1)
    xg, lg = clustered(50, 5, seed=2)
    loaders = [
        DataLoader(DictDataset(xq, lq), batch_size=8),
        DataLoader(DictDataset(xg, lg), batch_size=8),
    ]
    cb = RecallAtK(k=(1, 5), query_dataloader_idx=0, reference_dataloader_idx=1)
    (val, _) = trainer(cb).validate(Tiny(), loaders, verbose=False)
    expected = retrieval_metrics(
        xq, lq, (1, 5), reference_embeddings=xg, reference_labels=lg, precision=False
    )
    for name, value in expected.items():
        assert val[f"val/{name}"] == pytest.approx(value, abs=1e-6)


def test_independent_dataloaders_get_suffix() -> None:
    x1, l1 = clustered(30, 5, seed=1)
    x2, l2 = clustered(20, 4, seed=2)
    loaders = [
        DataLoader(DictDataset(x1, l1), batch_size=8),
        DataLoader(DictDataset(x2, l2), batch_size=8),
    ]
    results = trainer(RecallAtK(k=1)).validate(Tiny(), loaders, verbose=False)
    e2 = retrieval_metrics(x2, l2, 1)
    assert results[1]["val/recall@1/dataloader_idx_1"] == pytest.approx(e2["recall@1"], abs=1e-6)


def test_k_larger_than_set_is_clamped_with_warning() -> None:
    x, labels = clustered(6, 2)
    loader = DataLoader(DictDataset(x, labels), batch_size=4)
    with pytest.warns(UserWarning, match="k=8 exceeds the 5 retrievable items"):
        (val,) = trainer(RecallAtK(k=(1, 8))).validate(Tiny(), loader, verbose=False)
    assert val["val/recall@8"] == 1.0


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="`k` values must be >= 1, got 0"):
        RecallAtK(k=(0, 1))
    with pytest.raises(ValueError, match="both query_dataloader_idx and reference"):
        RecallAtK(query_dataloader_idx=0)
    with pytest.raises(ValueError, match="`metric` must be one of"):
        RecallAtK(metric="hamming")  # type: ignore[arg-type]


def test_multi_label_and_hierarchical_labels_match_functional() -> None:
    x, labels = clustered(48, 6, seed=3)
    hot = torch.nn.functional.one_hot(labels, 8).bool()
    hot[::5, 7] = True  # every fifth item also carries a shared label 7
    loader = DataLoader(DictDataset(x, hot), batch_size=10)
    (val,) = trainer(RecallAtK(k=(1, 4))).validate(Tiny(), loader, verbose=False)
    expected = retrieval_metrics(x, hot, (1, 4))
    assert set(val) == {f"val/{n}" for n in expected}
    for name, value in expected.items():
        assert val[f"val/{name}"] == pytest.approx(value, abs=1e-6)
    tree = torch.stack([labels // 3, labels], 1)
    loader = DataLoader(DictDataset(x, tree), batch_size=10)
    cb = RecallAtK(k=1, label_kind="hierarchical", level_names=["coarse", "fine"])
    (val,) = trainer(cb).validate(Tiny(), loader, verbose=False)
    for level, column in (("coarse", labels // 3), ("fine", labels)):
        plain = retrieval_metrics(x, column, 1)
        assert val[f"val/map@r/{level}"] == pytest.approx(plain["map@r"], abs=1e-6)
        assert val[f"val/recall@1/{level}"] == pytest.approx(plain["recall@1"], abs=1e-6)
