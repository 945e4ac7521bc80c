"""Per-metric functions, multi-label and hierarchical relevance against a brute-force numpy
transcription of the definitions (sort by similarity, relevant = shares a label, R = the
relevant references other than the query itself, AP@R ...)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_metric.retrieval import (
    RetrievalMetrics,
    map_at_r,
    mrr,
    precision_at_k,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)
from lightning_metric.retrieval.protocol import exclusion, kept_columns
from lightning_metric.retrieval.rerank import ranking_metrics

KS = (1, 2, 5)


def brute_force(q, r, relevant, own, ks):  # type: ignore[no-untyped-def]
    """Mean metrics over scorable queries. ``relevant[i, j]``: reference j is relevant to
    query i; ``own[i]``: reference row of query i itself (-1: none), never ranked."""
    sims = q.astype(np.float64) @ r.astype(np.float64).T
    per: dict[str, list[float]] = {}
    unscorable = 0
    counts = [relevant[i].sum() - (own[i] >= 0 and relevant[i, own[i]]) for i in range(len(q))]
    r_max = max(counts)
    for i in range(len(q)):
        order = sorted((j for j in range(len(r)) if j != own[i]), key=lambda j: (-sims[i, j], j))
        rel = np.array([relevant[i, j] for j in order])
        big_r = counts[i]
        if big_r == 0:
            unscorable += 1
            continue
        for k in ks:
            per.setdefault(f"recall@{k}", []).append(float(rel[:k].any()))
            per.setdefault(f"precision@{k}", []).append(rel[:k].sum() / k)
        precision_at = [rel[: i + 1].sum() / (i + 1) for i in range(big_r)]
        per.setdefault("map@r", []).append(
            sum(p for p, x in zip(precision_at, rel[:big_r], strict=True) if x) / big_r
        )
        per.setdefault("r_precision", []).append(rel[:big_r].sum() / big_r)
        hits = np.flatnonzero(rel[:r_max])
        per.setdefault("mrr", []).append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
    out = {name: float(np.mean(v)) for name, v in per.items()}
    out["unscorable_queries"] = float(unscorable)
    return out


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _multi_hot(n: int, num_labels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hot = rng.random((n, num_labels)) < 0.25
    hot[np.arange(n), rng.integers(0, num_labels, n)] = True  # every item has a label
    return hot


def _close(got: dict[str, float], want: dict[str, float], suffix: str = "") -> None:
    for name, value in want.items():
        assert got[name + suffix] == pytest.approx(value, abs=1e-12), name + suffix


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_label_leave_one_out_equals_brute_force(seed: int) -> None:
    x, hot = _unit(40, 6, seed), _multi_hot(40, 7, seed)
    relevant = (hot.astype(int) @ hot.T.astype(int)) > 0
    want = brute_force(x, x, relevant, np.arange(40), KS)
    _close(retrieval_metrics(torch.from_numpy(x), torch.from_numpy(hot), KS), want)
    # The same items as label lists, and as a 0/1 integer matrix named explicitly.
    lists = [np.flatnonzero(row).tolist() for row in hot]
    _close(retrieval_metrics(x, lists, KS), want)
    _close(retrieval_metrics(x, hot.astype(np.int64), KS, label_kind="multi_label"), want)


def test_multi_label_split_and_masks_equal_brute_force() -> None:
    x, hot = _unit(50, 5, 3), _multi_hot(50, 6, 3)
    q, r, hq, hr = x[:15], x[15:], hot[:15], hot[15:]
    relevant = (hq.astype(int) @ hr.T.astype(int)) > 0
    want = brute_force(q, r, relevant, np.full(15, -1), KS)
    got = retrieval_metrics(q, hq, KS, reference_embeddings=r, reference_labels=hr)
    _close(got, want)
    # Masks over one set: items 10..19 are both queries and references.
    qm = torch.zeros(50, dtype=torch.bool)
    qm[:20] = True
    rm = torch.zeros(50, dtype=torch.bool)
    rm[10:] = True
    own = exclusion(qm, rm).numpy()
    rel = (hot[:20].astype(int) @ hot[10:].T.astype(int)) > 0
    want = brute_force(x[:20], x[10:], rel, own, KS)
    _close(retrieval_metrics(x, hot, KS, query_mask=qm, reference_mask=rm), want)


def test_hierarchical_levels_equal_brute_force_and_single_label_runs() -> None:
    x = _unit(60, 6, 5)
    rng = np.random.default_rng(5)
    fine = rng.integers(0, 20, 60)
    coarse = fine // 5  # 4 categories of 5 products each
    labels = np.stack([coarse, fine], 1)
    got = retrieval_metrics(x, labels, KS, label_kind="hierarchical")
    for level, column in enumerate((coarse, fine)):
        relevant = column[:, None] == column[None, :]
        want = brute_force(x, x, relevant, np.arange(60), KS)
        _close(got, want, f"/level{level}")
        single = retrieval_metrics(x, column, KS)
        assert {n: got[f"{n}/level{level}"] for n in single} == single  # bit for bit
    named = retrieval_metrics(
        x, labels, KS, label_kind="hierarchical", level_names=["category", "product"]
    )
    assert named["map@r/product"] == got["map@r/level1"]
    assert set(named) == {n.replace("level0", "category").replace("level1", "product") for n in got}


def test_functions_compose_retrieval_metrics() -> None:
    # The metric functions on the ranked relevance reproduce retrieval_metrics exactly.
    x = torch.from_numpy(_unit(30, 4, 7))
    labels = torch.from_numpy(np.random.default_rng(7).integers(0, 5, 30))
    sims = x.double() @ x.double().T
    sims.fill_diagonal_(-torch.inf)
    order = torch.sort(-sims, dim=1, stable=True).indices[:, :29]
    relevance = labels[order] == labels[:, None]
    counts = torch.bincount(labels)[labels] - 1
    ok = counts > 0
    rel, r = relevance[ok], counts[ok]
    got = retrieval_metrics(x, labels, (1, 3))
    assert float(recall_at_k(rel, 1).mean()) == got["recall@1"]
    assert float(precision_at_k(rel, 3).mean()) == got["precision@3"]
    assert float(map_at_r(rel, r).mean()) == got["map@r"]
    assert float(r_precision(rel, r).mean()) == got["r_precision"]
    assert float(mrr(rel[:, : int(r.max())]).mean()) == got["mrr"]


def test_retrieval_metrics_torchmetric_accepts_multi_label_and_hierarchy() -> None:
    x, hot = _unit(36, 5, 9), _multi_hot(36, 5, 9)
    want = retrieval_metrics(x, hot, (1, 2))
    metric = RetrievalMetrics(k=(1, 2))
    for start in (0, 12, 24):
        rows = slice(start, start + 12)
        metric.update(torch.from_numpy(x[rows]), torch.from_numpy(hot[rows]), torch.arange(12))
    got = {n: float(v) for n, v in metric.compute().items()}
    assert got == pytest.approx(want, abs=1e-6)
    fine = np.arange(36) % 9
    levels = torch.from_numpy(np.stack([fine % 3, fine], 1))
    tree = RetrievalMetrics(k=1, label_kind="hierarchical", level_names=["group", "item"])
    tree.update(torch.from_numpy(x), levels, torch.arange(36))
    values = tree.compute()
    plain = retrieval_metrics(x, fine, 1)
    assert float(values["recall@1/item"]) == pytest.approx(plain["recall@1"], abs=1e-6)
    assert "unscorable_queries/group" in values
    with pytest.raises(ValueError, match=r"2-D torch.int64 matrix .* label_kind='multi_label'"):
        RetrievalMetrics().update(torch.from_numpy(x), levels)


def test_reranked_metrics_with_multi_labels_equal_brute_force() -> None:
    x, hot = _unit(25, 4, 11), _multi_hot(25, 4, 11)
    dist = torch.from_numpy(2 - 2 * x.astype(np.float64) @ x.T.astype(np.float64))
    relevant = (hot.astype(int) @ hot.T.astype(int)) > 0
    want = brute_force(x, x, relevant, np.arange(25), (1, 3))
    got = ranking_metrics(dist, hot, hot, k=(1, 3), exclude=torch.arange(25))
    for name in ("recall@1", "recall@3", "map@r", "r_precision", "mrr", "unscorable_queries"):
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_kept_columns_skip_the_excluded_row_but_never_a_missing_neighbour() -> None:
    indices = torch.tensor([[3, -1, 4, 5], [-1, -1, 2, 0], [7, 8, 9, 1]])
    cols = kept_columns(indices, torch.tensor([4, -1, 1]), 3)
    assert cols.tolist() == [[0, 1, 3], [0, 1, 2], [0, 1, 2]]


def test_an_unscorable_level_warns_and_reports_only_its_count() -> None:
    x = _unit(6, 3, 1)
    labels = np.stack([np.zeros(6, dtype=np.int64), np.arange(6)], 1)  # level 1: singletons
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = retrieval_metrics(x, labels, 1, label_kind="hierarchical")
    assert any("level 'level1'" in str(w.message) for w in caught)
    assert got["unscorable_queries/level1"] == 6.0 and "recall@1/level1" not in got
    assert got["recall@1/level0"] == 1.0


@pytest.mark.parametrize("name", ["functional", "protocol", "relevance"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(f"lightning_metric.retrieval.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, name


def test_kept_columns_and_relevant_counts_do_what_search_evaluate_does() -> None:
    # The numpy own-entry removal and R that `search --evaluate` once computed by itself,
    # which the protocol's helpers replace.
    from lightning_metric.retrieval.relevance import relevant_counts

    rng = np.random.default_rng(0)
    index_labels = rng.integers(-1, 4, 30)
    for _ in range(20):
        need = 5
        own = rng.integers(-1, 30, 12)
        rows = np.stack([rng.permutation(30)[: need + 1] for _ in range(12)])
        rows[rng.random(rows.shape) < 0.1] = -1  # not found
        inside = own >= 0
        is_own = (rows == own[:, None]) & inside[:, None]
        old = np.take_along_axis(rows, np.argsort(is_own, axis=1, kind="stable"), axis=1)
        old[np.sort(is_own, axis=1)] = -1
        cols = kept_columns(torch.from_numpy(rows), torch.from_numpy(own), need).numpy()
        assert (np.take_along_axis(rows, cols, axis=1) == old[:, :need]).all()
    lab = rng.integers(0, 4, 12)
    classes, counts = np.unique(index_labels[index_labels >= 0], return_counts=True)
    count_of = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    old_r = np.array([count_of.get(c, 0) for c in lab.tolist()], dtype=np.int64)
    old_r -= inside & (index_labels[np.maximum(own, 0)] == lab)
    got = relevant_counts(
        torch.from_numpy(lab), torch.from_numpy(index_labels), torch.from_numpy(own)
    )
    assert got.tolist() == old_r.tolist()
