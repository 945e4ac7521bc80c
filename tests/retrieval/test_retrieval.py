"""Functional retrieval core against a brute-force numpy reference and PML."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

from lightning_metric.retrieval import (
    knn,
    retrieval_metrics,
    retrieval_metrics_per_class,
    verification_metrics,
)
from lightning_metric.retrieval.knn import _knn_torch, prepare

KS = (1, 2, 3, 4, 8)


# ---------------------------------------------------------------- references


def ref_order(q: np.ndarray, r: np.ndarray, metric: str) -> np.ndarray:
    """Full ranking of the reference rows per query, ties by lower index (float64)."""
    q, r = q.astype(np.float64), r.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    key = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1) if metric == "l2" else -(q @ r.T)
    cols = np.broadcast_to(np.arange(r.shape[0]), key.shape)
    return np.lexsort((cols, key), axis=1)


def ref_metrics(q, ql, r, rl, exclude, ks, metric="cosine", average="micro"):  # type: ignore[no-untyped-def]
    order = ref_order(q, r, metric)
    r_counts = np.array(
        [(rl == ql[i]).sum() - (exclude[i] >= 0) for i in range(len(q))], dtype=np.int64
    )
    r_max = r_counts.max()
    per: dict[str, list[float]] = {}
    labels_scored = []
    for i in range(len(q)):
        if r_counts[i] == 0:
            continue
        labels_scored.append(ql[i])
        o = order[i][order[i] != exclude[i]]
        match = rl[o] == ql[i]
        R = r_counts[i]
        for k in ks:
            per.setdefault(f"recall@{k}", []).append(float(match[:k].any()))
            per.setdefault(f"precision@{k}", []).append(match[:k].sum() / k)
        rel = match[:R]
        prec = np.cumsum(rel) / np.arange(1, R + 1)
        per.setdefault("map@r", []).append((prec * rel).sum() / R)
        per.setdefault("r_precision", []).append(rel.sum() / R)
        hit = np.flatnonzero(match[:r_max])
        per.setdefault("mrr", []).append(1.0 / (hit[0] + 1) if hit.size else 0.0)
    out = {}
    labels_scored = np.array(labels_scored)
    for name, v in per.items():
        v = np.array(v)
        if average == "micro":
            out[name] = v.mean()
        else:
            out[name] = np.mean([v[labels_scored == c].mean() for c in np.unique(labels_scored)])
    out["unscorable_queries"] = float((r_counts == 0).sum())
    return out


def tie_data(n: int = 240, dim: int = 6, num_classes: int = 25, seed: int = 0):  # type: ignore[no-untyped-def]
    """Small integer vectors: many exactly tied scores, exact duplicates, singleton classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centers = rng.integers(-3, 4, (num_classes, dim))
    x = centers[labels] + rng.integers(-1, 2, (n, dim))
    # Duplicates of earlier rows with the same label (PML removes the first column instead of
    # self, which only agrees with exclusion by index when duplicates share a label).
    x[n - 20 :] = x[:20]
    labels[n - 20 :] = labels[:20]
    labels[5] = 1000  # singleton class
    labels[7] = 1001
    x[np.all(x == 0, axis=1)] = 1
    return x.astype(np.float32), labels.astype(np.int64)


def random_data(n: int = 300, dim: int = 16, num_classes: int = 30, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    x = rng.standard_normal((num_classes, dim))[labels] + rng.standard_normal((n, dim))
    labels[3] = 999
    return x.astype(np.float32), labels.astype(np.int64)


def assert_close(actual: dict, expected: dict, tol: float = 1e-6) -> None:  # type: ignore[type-arg]
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=tol), name


# ---------------------------------------------------------------- knn


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_knn_matches_reference_with_ties(metric: str) -> None:
    x, _ = tie_data()
    order = ref_order(x, x, metric)
    n = len(x)
    expected = np.stack([o[o != i][:7] for i, o in enumerate(order)])
    if metric == "cosine":
        # float32 normalisation breaks some float64 ties; compare on integer-exact metrics.
        x, _ = random_data()
        order = ref_order(x, x, metric)
        expected = np.stack([o[o != i][:7] for i, o in enumerate(order)])
        n = len(x)
    res = knn(torch.from_numpy(x), k=7, metric=metric)  # type: ignore[arg-type]
    np.testing.assert_array_equal(res.indices.numpy(), expected)
    assert res.indices.shape == (n, 7)
    # The torch (accelerator) path gives the same neighbours.
    p = prepare(torch.from_numpy(x), metric)  # type: ignore[arg-type]
    _, idx = _knn_torch(p, p, 7, metric, torch.arange(n), 50, False)  # type: ignore[arg-type]
    np.testing.assert_array_equal(idx.numpy(), expected)


def test_knn_duplicates_excluded_by_index() -> None:
    x = torch.ones(5, 3)
    res = knn(x, k=4, metric="ip")
    expected = [[j for j in range(5) if j != i] for i in range(5)]
    assert res.indices.tolist() == expected


def test_knn_query_reference_and_numpy() -> None:
    x, _ = random_data()
    q, r = x[:50], x[50:]
    res = knn(q, r, k=5)
    expected = ref_order(q, r, "cosine")[:, :5]
    np.testing.assert_array_equal(res.indices.numpy(), expected)


def test_fast_candidate_pass_is_exact() -> None:
    # float16 candidates + float32 re-scoring must reproduce the exact search, including rows
    # whose candidate set cannot be proven complete (exact duplicates force the fallback).
    x, _ = random_data(n=400, dim=32)
    x[100:140] = x[:40]
    p = prepare(torch.from_numpy(x), "cosine")
    ex = torch.arange(len(x))
    v_exact, i_exact = _knn_torch(p, p, 8, "cosine", ex, 64, False)
    v_fast, i_fast = _knn_torch(p, p, 8, "cosine", ex, 64, True)
    torch.testing.assert_close(i_fast, i_exact, rtol=0, atol=0)
    torch.testing.assert_close(v_fast, v_exact, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- metrics vs numpy


@pytest.mark.parametrize("average", ["micro", "macro"])
@pytest.mark.parametrize(("data", "metric"), [("ties", "ip"), ("ties", "l2"), ("random", "cosine")])
def test_leave_one_out_matches_numpy(data: str, metric: str, average: str) -> None:
    x, labels = tie_data() if data == "ties" else random_data()
    got = retrieval_metrics(x, labels, KS, metric=metric, average=average)  # type: ignore[arg-type]
    ex = np.arange(len(x))
    assert_close(got, ref_metrics(x, labels, x, labels, ex, KS, metric, average))
    assert got["unscorable_queries"] == 2.0 if data == "ties" else 1.0


def test_query_reference_split_matches_numpy() -> None:
    x, labels = tie_data(seed=3)
    q, ql, r, rl = x[:80], labels[:80], x[80:], labels[80:]
    got = retrieval_metrics(q, ql, KS, reference_embeddings=r, reference_labels=rl, metric="ip")
    assert_close(got, ref_metrics(q, ql, r, rl, np.full(80, -1), KS, "ip"))


def test_masks_with_overlap_match_numpy() -> None:
    x, labels = random_data(seed=4)
    n = len(x)
    qm = np.zeros(n, bool)
    rm = np.zeros(n, bool)
    qm[:120] = True
    rm[60:] = True  # rows 60..119 are both query and reference
    got = retrieval_metrics(
        x, labels, KS, query_mask=torch.from_numpy(qm), reference_mask=torch.from_numpy(rm)
    )
    ref_rows = np.flatnonzero(rm)
    exclude = np.array([np.searchsorted(ref_rows, i) if rm[i] else -1 for i in range(120)])
    assert_close(got, ref_metrics(x[qm], labels[qm], x[rm], labels[rm], exclude, KS))


def test_large_classes_are_chunked() -> None:
    # R_max = 99 forces a deep search; a tiny chunk exercises the chunked scoring.
    x, labels = random_data(n=300, num_classes=3, seed=5)
    got = retrieval_metrics(x, labels, (1, 10), chunk_size=7)
    assert_close(got, ref_metrics(x, labels, x, labels, np.arange(300), (1, 10)))


def test_per_class() -> None:
    x, labels = random_data(seed=6)
    per = retrieval_metrics_per_class(x, labels, (1, 4))
    macro = retrieval_metrics(x, labels, (1, 4), average="macro")
    assert np.mean(list(per["recall@4"].values())) == pytest.approx(macro["recall@4"], abs=1e-9)
    assert per["unscorable_queries"][999] == 1.0
    assert 999 not in per["recall@1"]


def test_clustering_scores() -> None:
    x, labels = random_data(n=200, num_classes=5, seed=7)
    got = retrieval_metrics(x, labels, 1, clustering=True)
    assert 0.0 < got["nmi"] <= 1.0
    assert got["ami"] <= got["nmi"] + 1e-9


# ---------------------------------------------------------------- metrics vs PML


PML_KEYS = {
    "precision_at_1": "recall@1",
    "mean_average_precision_at_r": "map@r",
    "r_precision": "r_precision",
    "mean_reciprocal_rank": "mrr",
}


def pml(q, ql, r=None, rl=None, index=faiss.IndexFlatIP, avg_of_avgs=False):  # type: ignore[no-untyped-def]
    calc = AccuracyCalculator(
        include=tuple(PML_KEYS),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=index, reset_before=True, reset_after=True),
        avg_of_avgs=avg_of_avgs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calc.get_accuracy(
            torch.from_numpy(q), torch.from_numpy(ql),
            None if r is None else torch.from_numpy(r),
            None if rl is None else torch.from_numpy(rl),
        )  # fmt: skip


@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_matches_pml_with_ties_duplicates_singletons(avg_of_avgs: bool) -> None:
    # l2, because PML drops the first neighbour instead of the query itself, which is only
    # the query (or an identical same-label duplicate) when self-distance is the minimum.
    x, labels = tie_data(seed=1)
    average = "macro" if avg_of_avgs else "micro"
    got = retrieval_metrics(x, labels, 1, metric="l2", average=average)
    expected = pml(x, labels, index=faiss.IndexFlatL2, avg_of_avgs=avg_of_avgs)
    for key, name in PML_KEYS.items():
        assert got[name] == pytest.approx(expected[key], abs=1e-6), name


def test_matches_pml_random_cosine_and_split() -> None:
    x, labels = random_data(seed=2)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = retrieval_metrics(x, labels, 1)
    expected = pml(x, labels)
    for key, name in PML_KEYS.items():
        assert got[name] == pytest.approx(expected[key], abs=1e-6), name
    q, ql, r, rl = x[:100], labels[:100], x[100:], labels[100:]
    got = retrieval_metrics(q, ql, 1, reference_embeddings=r, reference_labels=rl)
    expected = pml(q, ql, r, rl)
    for key, name in PML_KEYS.items():
        assert got[name] == pytest.approx(expected[key], abs=1e-6), name


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.randn(10, 4)
    y = torch.arange(10) % 2
    bad = x.clone()
    bad[2, 0] = float("nan")
    bad[5, 1] = float("inf")
    with pytest.raises(ValueError, match="2 of 10 rows containing NaN or Inf"):
        retrieval_metrics(bad, y)
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(torch.empty(0, 4), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`k` values must be >= 1, got 0"):
        retrieval_metrics(x, y, k=(0, 1))
    with pytest.raises(ValueError, match=r"k=10 is larger than the number of reference items.*9"):
        retrieval_metrics(x, y, k=10)
    with pytest.raises(ValueError, match="k=11 is larger than the number of reference"):
        knn(x, k=11)
    with pytest.raises(ValueError, match="`labels` must have 10 entries, got 9"):
        retrieval_metrics(x, y[:9])
    with pytest.raises(ValueError, match="dims differ.*4.*3"):
        retrieval_metrics(x, y, 1, reference_embeddings=torch.randn(5, 3), reference_labels=y[:5])
    with pytest.raises(ValueError, match="dims differ"):
        knn(x, torch.randn(5, 3), k=1)
    with pytest.raises(ValueError, match="integer class ids"):
        retrieval_metrics(x, y.float())
    with pytest.raises(ValueError, match="`metric` must be one of"):
        retrieval_metrics(x, y, metric="dot")  # type: ignore[arg-type]


def test_all_unscorable_reports_unavailable() -> None:
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="unavailable"):
        got = retrieval_metrics(x, torch.arange(6), k=(1, 2))
    assert got == {"unscorable_queries": 6.0}


# ---------------------------------------------------------------- verification


def test_verification_all_pairs_and_pair_list() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 300)
    x = rng.standard_normal((20, 16))[labels] + 1.5 * rng.standard_normal((300, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    with pytest.warns(UserWarning, match="impostor pairs"):
        got = verification_metrics(x, labels, far=(1e-6, 1e-3, 1e-1))
    s = (x.astype(np.float64) @ x.T.astype(np.float64))[np.triu_indices(300, 1)]
    same = (labels[:, None] == labels[None, :])[np.triu_indices(300, 1)]
    imp = np.sort(s[~same])[::-1]
    for far in (1e-3, 1e-1):
        t = imp[int(np.floor(far * imp.size))]
        assert (s[~same] > t).mean() <= far
        assert got[f"tar@far={far:.0e}"] == pytest.approx((s[same] > t).mean(), abs=1e-6)
        assert got[f"fnmr@fmr={far:.0e}"] == pytest.approx(1 - got[f"tar@far={far:.0e}"])
    assert "tar@far=1e-06" not in got
    assert 0.0 < got["eer"] < 0.5
    i, j = np.triu_indices(300, 1)
    pairs = np.stack([i, j], 1)
    by_pairs = verification_metrics(x, pairs=pairs, is_same=same, far=(1e-3, 1e-1))
    assert by_pairs["tar@far=1e-01"] == pytest.approx(got["tar@far=1e-01"], abs=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        verification_metrics(x)
