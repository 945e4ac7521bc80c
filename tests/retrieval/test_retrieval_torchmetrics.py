"""RetrievalMetrics (torchmetrics) and the dedupe helper, single process."""

from __future__ import annotations

import pytest
import torch

from lightning_metric.distributed import dedupe_by_index, gather_uneven
from lightning_metric.retrieval import RetrievalMetrics, retrieval_metrics


def data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 7
    x = torch.randn(7, 5, generator=g)[labels] + torch.randn(n, 5, generator=g)
    return x, labels


def test_single_process_keeps_repeated_indexes_and_order_does_not_matter() -> None:
    x, labels = data()
    m = RetrievalMetrics(k=(1, 4))
    # Shuffled batches plus rows that repeat an index: in one process nothing is padding,
    # so every row counts (DDP padding removal: tests/retrieval/test_retrieval_reliability.py).
    perm = torch.randperm(60)
    rows = torch.cat([perm, perm[:3]])
    expected = retrieval_metrics(x[rows], labels[rows], (1, 4))
    for chunk in perm.split(16):
        m.update(x[chunk], labels[chunk], chunk)
    m.update(x[perm[:3]], labels[perm[:3]], perm[:3])
    got = m.compute()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, abs=1e-6)


def test_query_and_reference_roles() -> None:
    xq, lq = data(20, seed=1)
    xr, lr = data(40, seed=2)
    m = RetrievalMetrics(k=(1, 2), precision=False)
    m.update(xq, lq, torch.arange(20), role="query")
    m.update(xr, lr, torch.arange(40), role="reference")
    got = m.compute()
    expected = retrieval_metrics(
        xq, lq, (1, 2), reference_embeddings=xr, reference_labels=lr, precision=False
    )
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, abs=1e-6)


def test_metric_errors() -> None:
    m = RetrievalMetrics()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match=r"`labels` must have shape \[4\]"):
        m.update(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`role` must be one of"):
        m.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), role="gallery")  # type: ignore[arg-type]
    m.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), role="query")
    with pytest.raises(ValueError, match="no reference items"):
        m.compute()


def test_all_unscorable_metric_reports_only_the_count() -> None:
    m = RetrievalMetrics(k=1)
    m.update(torch.randn(5, 3), torch.arange(5), torch.arange(5))
    with pytest.warns(UserWarning, match="unavailable"):
        got = m.compute()
    assert {k: v.item() for k, v in got.items()} == {"unscorable_queries": 5.0}


def test_dedupe_by_index_and_gather_single_process() -> None:
    index = torch.tensor([3, 1, 3, 0, 1])
    values = torch.tensor([30, 10, 31, 0, 11])
    kept_index, kept = dedupe_by_index(index, values)
    assert kept_index.tolist() == [0, 1, 3]
    assert kept.tolist() == [0, 10, 30]
    assert gather_uneven(values) is values
    with pytest.raises(ValueError, match="one row per index"):
        dedupe_by_index(index, values[:3])
