"""Bad and unusual inputs of the retrieval protocol, the relevance kinds and the per-metric
functions: each row is a call and the exception (type + message naming the value) it must
raise, or an unusual-but-valid input whose result is checked against ground truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from lightning_metric.retrieval import (
    KReciprocal,
    RetrievalMetrics,
    map_at_r,
    mrr,
    precision_at_k,
    r_precision,
    recall_at_k,
    retrieval_metrics,
    retrieval_metrics_per_class,
)
from lightning_metric.retrieval.protocol import check_mask, clamp_k, kept_columns
from lightning_metric.retrieval.rerank import ranking_metrics

X = torch.nn.functional.normalize(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
REL = torch.tensor([[True, False, True], [False, True, False]])
R = torch.tensor([2, 1])
HOT = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 1]]).bool()
TREE = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 1], [1, 2], [1, 2], [1, 3], [1, 3]])


def _tree_with_two_parents() -> None:
    bad = TREE.clone()
    bad[7] = torch.tensor([0, 3])  # product 3 under categories 1 and 0
    retrieval_metrics(X, bad, 1, label_kind="hierarchical")


def _metric_update_then(labels: torch.Tensor, then: torch.Tensor) -> None:
    metric = RetrievalMetrics(k=1)
    metric.update(X[:4], labels)
    metric.update(X[4:], then)


BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("relevance not a tensor", lambda: recall_at_k([[True]], 1), TypeError, r"got list"),
    ("relevance int dtype", lambda: recall_at_k(REL.long(), 1), TypeError, r"dtype torch.int64"),
    ("relevance 1-D", lambda: mrr(REL[0]), ValueError, r"2-D \[num_queries, depth\].*\(3,\)"),
    ("k deeper than ranks", lambda: precision_at_k(REL, 4), ValueError, r"k=4 is deeper.*3"),
    ("k zero", lambda: recall_at_k(REL, 0), ValueError, r"`k` must be an integer >= 1, got 0"),
    ("R float", lambda: map_at_r(REL, R.float()), TypeError, r"integers, got dtype torch.float32"),
    ("R wrong shape", lambda: map_at_r(REL, R[:1]), ValueError, r"shape \[2\].*got \(1,\)"),
    ("R zero", lambda: r_precision(REL, torch.tensor([2, 0])), ValueError, r"R=0 for query 1"),
    (
        "R below the relevant count",
        lambda: map_at_r(REL, torch.tensor([1, 1])),
        ValueError,
        r"query 0 has 2 relevant neighbours .* R=1",
    ),
    ("R deeper than ranks", lambda: map_at_r(REL, torch.tensor([4, 1])), ValueError, r"R=4"),
    (
        "multi-label item with no label",
        lambda: retrieval_metrics(X, [[0], [1], [], [0], [1], [0], [1], [0]], 1),
        ValueError,
        r"1 item\(s\) have no label \(first rows: \[2\]\)",
    ),
    (
        "multi-hot row all zero",
        lambda: retrieval_metrics(X, torch.cat([HOT[:7], torch.zeros(1, 2).bool()]), 1),
        ValueError,
        r"no label \(first rows: \[7\]\)",
    ),
    (
        "multi-hot value 2",
        lambda: retrieval_metrics(X, HOT.long() * 2, 1, label_kind="multi_label"),
        ValueError,
        r"0/1 multi-hot matrix, found the value 2",
    ),
    (
        "negative label in a list",
        lambda: retrieval_metrics(X, [[0], [-1], [1], [0], [1], [0], [1], [0]], 1),
        ValueError,
        r"item 1 has label -1",
    ),
    (
        "2-D integer labels without a kind",
        lambda: retrieval_metrics(X, TREE, 1),
        ValueError,
        r"2-D torch.int64 matrix of shape \(8, 2\).*label_kind='hierarchical'",
    ),
    (
        "hierarchy: fine label under two coarse",
        _tree_with_two_parents,
        ValueError,
        r"label 3 of level 1 lies under labels 0 and 1 of level 0",
    ),
    (
        "hierarchy given fine to coarse",
        lambda: retrieval_metrics(X, TREE.flip(1), 1, label_kind="hierarchical"),
        ValueError,
        r"not a hierarchy.*coarse to fine",
    ),
    (
        "hierarchy float",
        lambda: retrieval_metrics(X, TREE.float(), 1, label_kind="hierarchical"),
        TypeError,
        r"integer class ids, got dtype torch.float32",
    ),
    (
        "level names count",
        lambda: retrieval_metrics(X, TREE, 1, label_kind="hierarchical", level_names=["a"]),
        ValueError,
        r"2 distinct names .* got \['a'\]",
    ),
    (
        "level names for single labels",
        lambda: retrieval_metrics(X, TREE[:, 1], 1, level_names=["a"]),
        ValueError,
        r"`level_names` is for hierarchical labels, but the labels are single",
    ),
    (
        "unknown label kind",
        lambda: retrieval_metrics(X, TREE[:, 1], 1, label_kind="tree"),  # type: ignore[arg-type]
        ValueError,
        r"`label_kind` must be one of .* got 'tree'",
    ),
    (
        "macro average of multi-label",
        lambda: retrieval_metrics(X, HOT, 1, average="macro"),
        ValueError,
        r"average='macro'.*multi-label",
    ),
    (
        "per-class of multi-label",
        lambda: retrieval_metrics_per_class(X, HOT, 1),
        ValueError,
        r"multi-label items belong to several",
    ),
    (
        "reference labels of another kind",
        lambda: retrieval_metrics(
            X[:4], HOT[:4], 1, reference_embeddings=X[4:], reference_labels=TREE[4:, 1]
        ),
        ValueError,
        r"`labels` are multi_label labels but `reference_labels` are single",
    ),
    (
        "same rows passed as reference, other labels",
        lambda: retrieval_metrics(
            X, TREE[:, 1], 1, reference_embeddings=X, reference_labels=TREE[:, 0]
        ),
        ValueError,
        r"same rows as `embeddings` but their labels differ",
    ),
    (
        "mask of ints",
        lambda: check_mask(torch.ones(8, dtype=torch.long), 8, "query_mask"),
        ValueError,
        r"`query_mask` must be a bool tensor of shape \[8\], got dtype torch.int64",
    ),
    (
        "torchmetric: label kinds change between batches",
        lambda: _metric_update_then(TREE[:4, 1], HOT[4:]),
        ValueError,
        r"multi_label labels of shape \(4, 2\) after single labels",
    ),
    (
        "torchmetric: float multi-hot",
        lambda: RetrievalMetrics(label_kind="multi_label").update(X, HOT.float()),
        ValueError,
        r"0/1 multi-hot|integer ids or a bool multi-hot matrix, got dtype torch.float32",
    ),
    (
        "KReciprocal strict not a bool",
        lambda: KReciprocal(strict=1),  # type: ignore[arg-type]
        TypeError,
        r"`strict` must be True .* got 1",
    ),
    (
        "ranking_metrics multi-label with an empty row",
        lambda: ranking_metrics(
            torch.ones(2, 2),
            [[0], []],
            [[0], [0]],
            1,  # query 1 has no label
        ),
        ValueError,
        r"`query_labels`: 1 item\(s\) have no label",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [pytest.param(c, e, m, id=n) for n, c, e, m in BAD]
)
def test_bad_input(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ValueError | TypeError)


def _lists_equal_multi_hot() -> bool:
    lists = [np.flatnonzero(row).tolist() for row in HOT.numpy()]
    return retrieval_metrics(X, lists, (1, 2)) == retrieval_metrics(X, HOT, (1, 2))


def _one_label_everywhere_is_single_label() -> bool:
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    hot = torch.nn.functional.one_hot(labels).bool()
    return retrieval_metrics(X, hot, (1, 2), mrr=False) == retrieval_metrics(
        X, labels, (1, 2), mrr=False
    )


def _one_level_hierarchy_is_single_label() -> bool:
    got = retrieval_metrics(X, TREE[:, 1:], (1, 2), label_kind="hierarchical")
    plain = retrieval_metrics(X, TREE[:, 1], (1, 2))
    return {n: got[f"{n}/level0"] for n in plain} == plain


def _everything_relevant() -> bool:
    # One shared label: every neighbour is relevant, so every metric is exactly 1.
    got = retrieval_metrics(X, [[0, 1]] * 8, (1, 7))
    return all(v == 1.0 for n, v in got.items() if n != "unscorable_queries")


def _level_without_scorable_query() -> bool:
    labels = torch.stack([torch.zeros(8, dtype=torch.long), torch.arange(8)], 1)
    with pytest.warns(UserWarning, match="at level 'level1'"):
        got = retrieval_metrics(X, labels, 1, label_kind="hierarchical")
    return got["unscorable_queries/level1"] == 8.0 and got["recall@1/level0"] == 1.0


def _kept_columns_with_missing() -> bool:
    cols = kept_columns(torch.tensor([[-1, 2, 0]]), torch.tensor([-1]), 2)
    return cols.tolist() == [[0, 1]]


def _clamped_k() -> bool:
    with pytest.warns(UserWarning, match="k=9 exceeds the 7 retrievable items"):
        return clamp_k((1, 9), 7) == {1: 1, 9: 7}


def _mrr_zero_without_hit() -> bool:
    return mrr(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [0.0, 0.0]


def _empty_relevance() -> bool:
    empty = torch.zeros(0, 3, dtype=torch.bool)
    return map_at_r(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)


UNUSUAL: list[tuple[str, Callable[[], bool]]] = [
    ("label lists equal their multi-hot matrix", _lists_equal_multi_hot),
    ("one label per item as multi-hot equals single labels", _one_label_everywhere_is_single_label),
    ("a one-level hierarchy equals single labels", _one_level_hierarchy_is_single_label),
    ("all items share a label: every metric is 1", _everything_relevant),
    ("a level with no scorable query reports its count", _level_without_scorable_query),
    ("a missing neighbour (-1) is never the excluded row", _kept_columns_with_missing),
    ("k beyond the candidates is clamped with a warning", _clamped_k),
    ("mrr is 0 without a relevant neighbour", _mrr_zero_without_hit),
    ("no queries: empty results", _empty_relevance),
]


@pytest.mark.parametrize("check", [pytest.param(c, id=n) for n, c in UNUSUAL])
def test_unusual_but_valid_input(check: Callable[[], bool]) -> None:
    assert check()


def test_table_is_large_and_ids_unique() -> None:
    names = [row[0] for row in BAD] + [row[0] for row in UNUSUAL]
    assert len(names) >= 20 and len(set(names)) == len(names)
