"""Re-ranking against direct transcriptions of the papers' equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_metric.retrieval import retrieval_metrics
from lightning_metric.retrieval.rerank import (
    KReciprocal,
    QueryExpansion,
    Reranker,
    alpha_query_expansion,
    database_side_augmentation,
    k_reciprocal,
    k_reciprocal_all,
    ranking_metrics,
)


def paper_k_reciprocal(
    dist: np.ndarray, nq: int, k1: int, k2: int, lam: float, strict: bool = False
) -> np.ndarray:
    """Zhong et al. 2017, equation by equation, with plain loops and Python sets.

    ``dist`` is over P = probes (first ``nq``) + gallery. Conventions stated in the module
    docstring: distances divided by the row maximum, N(p, k) = p and its k nearest, kernel
    weights normalised per row. ``strict=False``: eq. 6 as printed (``>=``); ``True``: the
    authors' released code (``>``).
    """
    n = len(dist)
    d = [[dist[i][j] / max(dist[i]) for j in range(n)] for i in range(n)]

    def nn(p: int, k: int) -> list[int]:  # N(p, k): sorted by distance, ties by index
        return sorted(range(n), key=lambda j: (d[p][j], j))[: k + 1]

    def r_set(p: int, k: int) -> set[int]:  # eq. 4
        return {g for g in nn(p, k) if p in nn(g, k)}

    half = round(k1 / 2)
    v = []
    for p in range(n):
        r = r_set(p, k1)
        r_star = set(r)
        for q in r:  # eq. 6
            rq = r_set(q, half)
            shared = len(r & rq)
            if (shared > 2 / 3 * len(rq)) if strict else (shared >= 2 / 3 * len(rq)):
                r_star |= rq
        row = [math.exp(-d[p][g]) if g in r_star else 0.0 for g in range(n)]  # eq. 7
        total = sum(row)
        v.append([x / total for x in row])
    if k2 > 1:  # eq. 11
        v = [[sum(v[g][j] for g in nn(p, k2 - 1)) / k2 for j in range(n)] for p in range(n)]
    out = np.zeros((nq, n))
    for p in range(nq):
        for g in range(n):
            num = sum(min(v[p][j], v[g][j]) for j in range(n))
            den = sum(max(v[p][j], v[g][j]) for j in range(n))
            out[p][g] = (1 - lam) * (1 - num / den) + lam * d[p][g]  # eq. 10, 12
    return out


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 3, 0.3), (4, 1, 0.5)])
def test_k_reciprocal_equals_the_paper(k1: int, k2: int, lam: float, strict: bool) -> None:
    rng = np.random.default_rng(k1)
    centres = rng.standard_normal((5, 6))
    q = centres[rng.integers(0, 5, 7)] + 0.6 * rng.standard_normal((7, 6))
    g = centres[rng.integers(0, 5, 30)] + 0.6 * rng.standard_normal((30, 6))
    got = k_reciprocal(_sq_dist(q, g), _sq_dist(q, q), _sq_dist(g, g), k1, k2, lam, strict)
    allx = np.concatenate([q, g])
    expected = paper_k_reciprocal(_sq_dist(allx, allx), 7, k1, k2, lam, strict)[:, 7:]
    assert got.shape == (7, 30)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert not np.allclose(got, lam * _sq_dist(q, g) / 1.0)  # it does re-rank


def test_k_reciprocal_all_leave_one_out_and_bad_input() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((25, 4))
    d = _sq_dist(x, x)
    np.testing.assert_allclose(
        k_reciprocal_all(d, 6, 3, 0.3), paper_k_reciprocal(d, 25, 6, 3, 0.3, True), atol=1e-12
    )
    np.testing.assert_allclose(
        k_reciprocal_all(d, 6, 3, 0.3, strict=False),
        paper_k_reciprocal(d, 25, 6, 3, 0.3, False),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="negative"):
        k_reciprocal_all(-d, 6, 3, 0.3)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_all(d, 6, 3, 1.5)
    with pytest.raises(ValueError, match=r"q_q must be \(2, 2\)"):
        k_reciprocal(d[:2, 2:], d[:3, :3], d[2:, 2:])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def test_alpha_query_expansion_and_dba_formulas() -> None:
    torch.manual_seed(0)
    q, g = _unit(torch.randn(4, 8)), _unit(torch.randn(12, 8))
    k, alpha = 3, 2.5
    got = alpha_query_expansion(q, g, k, alpha)
    for i in range(4):
        sims = [float(q[i] @ g[j]) for j in range(12)]
        top = sorted(range(12), key=lambda j: -sims[j])[:k]
        acc = q[i].clone()
        for j in top:
            acc += max(sims[j], 0.0) ** alpha * g[j]
        torch.testing.assert_close(got[i], acc / acc.norm())
    dba = database_side_augmentation(g, k, alpha)
    for i in range(12):
        sims = [float(g[i] @ g[j]) if j != i else -math.inf for j in range(12)]
        top = sorted(range(12), key=lambda j: -sims[j])[:k]
        acc = g[i].clone()
        for j in top:
            acc += max(sims[j], 0.0) ** alpha * g[j]
        torch.testing.assert_close(dba[i], acc / acc.norm())
    avg = alpha_query_expansion(q, g, 2, 0.0)  # alpha = 0: average QE
    top2 = (q @ g.T).topk(2).indices
    torch.testing.assert_close(avg, _unit(q + g[top2].sum(1)))


def test_ranking_metrics_equal_retrieval_metrics_on_plain_distances() -> None:
    torch.manual_seed(1)
    emb = _unit(torch.randn(60, 8))
    labels = torch.randint(0, 6, (60,))
    plain = retrieval_metrics(emb, labels, k=(1, 2, 4), precision=False)
    dist = 2 - 2 * emb.double() @ emb.double().T
    got = ranking_metrics(dist, labels, labels, k=(1, 2, 4), exclude=torch.arange(60))
    assert got.keys() == plain.keys()
    for key in plain:
        assert got[key] == pytest.approx(plain[key], abs=1e-6), key
    q, r = emb[:20], emb[20:]
    split = retrieval_metrics(
        q, labels[:20], k=(1, 2), reference_embeddings=r, reference_labels=labels[20:]
    )
    got = ranking_metrics(2 - 2 * q.double() @ r.double().T, labels[:20], labels[20:], k=(1, 2))
    for key in got:
        assert got[key] == pytest.approx(split[key], abs=1e-6), key


def test_rerankers_shapes_and_yaml_friendly_arguments() -> None:
    torch.manual_seed(2)
    emb = _unit(torch.randn(30, 8))
    assert KReciprocal(k1=5, k2=2)(emb, None, "cosine").shape == (30, 30)
    assert KReciprocal(k1=5, k2=2)(emb[:10], emb[10:], "cosine").shape == (10, 20)
    assert QueryExpansion(k=2, dba=True)(emb[:10], emb[10:], "cosine").shape == (10, 20)
    assert QueryExpansion(k=2)(emb, None, "cosine").shape == (30, 30)
    with pytest.raises(ValueError, match="k1"):
        KReciprocal(k1=0)


def test_retrieval_metrics_report_reranked_values_beside_plain_ones() -> None:
    from lightning_metric.retrieval import RetrievalMetrics

    torch.manual_seed(3)
    emb = _unit(torch.randn(40, 8))
    labels = torch.randint(0, 5, (40,))
    reranker = KReciprocal(k1=6, k2=3)
    metric = RetrievalMetrics(k=(1, 2), rerank=reranker)
    metric.update(emb, labels, torch.arange(40))
    values = metric.compute()
    expected = ranking_metrics(
        reranker(emb, None, "cosine"), labels, labels, k=(1, 2), exclude=torch.arange(40)
    )
    for name in ("recall@1", "recall@2", "map@r", "mrr"):
        assert float(values[f"rerank/{name}"]) == pytest.approx(expected[name], abs=1e-6)
    assert float(values["recall@1"]) == pytest.approx(retrieval_metrics(emb, labels)["recall@1"])
    split = RetrievalMetrics(k=1, rerank=QueryExpansion(k=2))
    split.update(emb[:10], labels[:10], torch.arange(10), role="query")
    split.update(emb[10:], labels[10:], torch.arange(30), role="reference")
    assert "rerank/recall@1" in split.compute()


def test_recall_callback_builds_a_reranker_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    from lightning_metric.callbacks import RecallAtK

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RecallAtK, "recall")
    config = parser.parse_object(
        {
            "recall": {
                "k": [1, 2],
                "rerank": {
                    "class_path": "lightning_metric.retrieval.rerank.KReciprocal",
                    "init_args": {"k1": 10, "k2": 3},
                },
            }
        }
    )
    callback = parser.instantiate_classes(config).recall
    assert isinstance(callback.metrics.rerank, KReciprocal) and callback.metrics.rerank.k1 == 10


def test_recall_callback_logs_reranked_metrics_in_a_fit() -> None:
    from functools import partial

    import lightning as L

    from lightning_metric import MetricLearningModule, SmallCNN
    from lightning_metric.callbacks import RecallAtK
    from lightning_metric.data import DigitsDataModule
    from lightning_metric.heads import ArcFaceHead

    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64)
    model = MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=8),
        embedding_dim=16,
        head=partial(ArcFaceHead, scale=16.0, margin=0.3),
        num_classes=data.num_classes,
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=2,
        callbacks=[RecallAtK(k=(1, 2), rerank=QueryExpansion(k=2))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    logged = trainer.callback_metrics
    assert {"val/recall@1", "val/rerank/recall@1", "val/rerank/map@r"} <= set(logged)
    assert 0.0 <= float(logged["val/rerank/recall@1"]) <= 1.0


class _NaNReranker(Reranker):
    """A user's re-ranker gone wrong: NaN where it should give a distance."""

    def __call__(self, query: torch.Tensor, reference, metric: str) -> torch.Tensor:
        out = 2 - 2 * query.double() @ (query if reference is None else reference).double().T
        out[:, 0] = float("nan")
        return out


def test_a_re_ranker_returning_nan_is_an_error_not_a_perfect_recall() -> None:
    from lightning_metric.retrieval import RetrievalMetrics

    torch.manual_seed(4)
    emb = _unit(torch.randn(20, 8))
    labels = torch.randint(0, 4, (20,))
    metric = RetrievalMetrics(k=1, rerank=_NaNReranker())
    metric.update(emb, labels, torch.arange(20))
    with pytest.raises(ValueError, match=r"re-ranker .*_NaNReranker.* 20 NaN/Inf distances"):
        metric.compute()


def test_query_expansion_with_k_above_the_gallery_uses_the_whole_gallery() -> None:
    torch.manual_seed(5)
    q, g = _unit(torch.randn(3, 4)), _unit(torch.randn(5, 4))
    expected = q + ((q @ g.T).clamp(min=0) ** 2.0) @ g  # every gallery vector, by formula
    torch.testing.assert_close(alpha_query_expansion(q, g, k=50, alpha=2.0), _unit(expected))


def test_k_reciprocal_default_is_the_released_code_and_differs_from_eq_6_at_the_boundary() -> None:
    # Small neighbourhoods (k1 = 4: R(q, 2) has at most 3 items) hit |R ∩ R_q| = 2/3 |R_q|
    # often, where '>' and '>=' disagree; both must match their transcription.
    differ = 0
    for seed in range(6):
        x = np.random.default_rng(seed).standard_normal((14, 3))
        d = _sq_dist(x, x)
        code = k_reciprocal_all(d, 4, 1, 0.0)
        paper = k_reciprocal_all(d, 4, 1, 0.0, strict=False)
        np.testing.assert_allclose(code, paper_k_reciprocal(d, 14, 4, 1, 0.0, True), atol=1e-12)
        np.testing.assert_allclose(paper, paper_k_reciprocal(d, 14, 4, 1, 0.0, False), atol=1e-12)
        differ += int(not np.allclose(code, paper))
        # The Reranker passes its option through (on its own distance computation).
        t = torch.from_numpy(x)
        d_t = torch.cdist(t, t).pow(2).numpy()
        for strict in (True, False):
            np.testing.assert_allclose(
                KReciprocal(k1=4, k2=1, lambda_value=0.0, strict=strict)(t, None, "l2").numpy(),
                k_reciprocal_all(d_t, 4, 1, 0.0, strict=strict),
            )
    assert differ > 0
    assert KReciprocal().strict is True and "strict=True" in repr(KReciprocal())
    with pytest.raises(TypeError, match=r"`strict` must be True .* got 'yes'"):
        KReciprocal(strict="yes")  # type: ignore[arg-type]
