"""Quantization against numpy transcriptions and brute force: calibration, int8 and binary
codes, search on codes, float re-scoring, and the grid cells of ``retrieval_metrics``."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch

from lightning_metric.retrieval import (
    Calibration,
    RetrievalMetrics,
    binarize,
    bytes_per_vector,
    calibrate,
    dequantize_int8,
    hamming,
    map_at_r,
    precision_at_k,
    prefix,
    quantize_int8,
    recall_at_k,
    rescore,
    retrieval_metrics,
    search_codes,
)
from lightning_metric.retrieval import quantization as quantization_module


def clustered(n: int, classes: int, dim: int, noise: float, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(n) % classes
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


def np_codes(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = high - low
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(span > 0, (x - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
    return (np.floor(np.float32(255) * np.clip(t, 0, 1)).astype(np.int32) - 128).astype(np.int8)


def np_decode(codes: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + (codes.astype(np.float32) + 128 + 0.5) / 255 * (high - low)


def np_ranking(scores: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """Rows of the best ``k`` by descending score, equal scores by lower index."""
    s = scores.astype(np.float64).copy()
    if exclude is not None:
        s[np.arange(len(s)), exclude] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)
    return order[:, :k]


def test_docstring_examples() -> None:
    result = doctest.testmod(quantization_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_calibration_is_min_max_or_order_statistics() -> None:
    x = torch.randn(57, 6, generator=torch.Generator().manual_seed(1))
    c = calibrate(x)
    assert torch.equal(c.low, x.amin(0)) and torch.equal(c.high, x.amax(0))
    q = calibrate(x, quantile=0.05)
    assert np.array_equal(q.low.numpy(), np.quantile(x.numpy(), 0.05, axis=0, method="lower"))
    assert np.array_equal(q.high.numpy(), np.quantile(x.numpy(), 0.95, axis=0, method="higher"))
    back = Calibration.from_dict(json.loads(json.dumps(c.to_dict())))
    assert torch.equal(back.low, c.low) and torch.equal(back.high, c.high)


def test_int8_codes_match_numpy_and_faiss() -> None:
    faiss = pytest.importorskip("faiss")
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    x[:, 3] = 0.25  # a constant dimension: low == high
    c = calibrate(x[:200])  # queries x[200:] leave the range: saturated codes
    codes = quantize_int8(x, c)
    low, high = c.low.numpy(), c.high.numpy()
    assert np.array_equal(codes.numpy(), np_codes(x.numpy(), low, high))
    assert {-128, 127} <= set(codes[200:].flatten().tolist())
    decoded = dequantize_int8(codes, c)
    assert np.allclose(decoded.numpy(), np_decode(codes.numpy(), low, high), atol=1e-6)
    # FAISS's 8-bit scalar quantizer with the same ranges holds the same codes + 128.
    sq = faiss.ScalarQuantizer(12, faiss.ScalarQuantizer.QT_8bit)
    sq.train(x[:200].numpy())
    assert np.array_equal(faiss.vector_to_array(sq.trained)[:12], low)
    faiss_codes = sq.compute_codes(x.numpy())
    assert np.array_equal(faiss_codes, codes.numpy().view(np.uint8) ^ 0x80)
    assert np.allclose(sq.decode(faiss_codes), decoded.numpy(), atol=1e-6)
    # The decoded value is within half a step of every in-range coordinate.
    step = (c.high - c.low) / 255
    assert bool(((decoded[:200] - x[:200]).abs() <= step / 2 + 1e-6).all())


def test_codes_never_depend_on_the_queries() -> None:
    x, _ = clustered(40, 4, 16, 0.5)
    c = calibrate(x[:30])
    batch = quantize_int8(x[30:], c)
    for i in range(10):
        assert torch.equal(quantize_int8(x[30 + i : 31 + i], c), batch[i : i + 1])
        assert torch.equal(binarize(x[30 + i : 31 + i]), binarize(x[30:])[i : i + 1])
    # A lone query is searched exactly as inside its batch.
    codes = quantize_int8(x[:30], c)
    whole = search_codes(x[30:], codes, 3, "int8", calibration=c)
    one = search_codes(x[35:36], codes, 3, "int8", calibration=c)
    assert torch.equal(one.indices, whole.indices[5:6])


@pytest.mark.parametrize("dim", [1, 7, 8, 13, 64])
def test_binarize_is_packbits_and_hamming_is_popcount(dim: int) -> None:
    x = torch.randn(9, dim, generator=torch.Generator().manual_seed(dim))
    x[0, 0] = 0.0  # zero is not positive
    codes = binarize(x)
    assert codes.dtype == torch.uint8
    assert np.array_equal(codes.numpy(), np.packbits(x.numpy() > 0, axis=1))
    bits = np.unpackbits(codes.numpy(), axis=1)
    expected = (bits[:, None, :] != bits[None, :, :]).sum(2)
    assert np.array_equal(hamming(codes, codes).numpy(), expected)


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_binary_knn_is_brute_force_hamming(leave_one_out: bool) -> None:
    # 12 bits over 60 items: many equal distances, so the tie order is tested too.
    x = torch.randn(60, 12, generator=torch.Generator().manual_seed(3))
    query, ref = (x, x) if leave_one_out else (x[:20], x[20:])
    exclude = torch.arange(60) if leave_one_out else None
    nn = search_codes(binarize(query), binarize(ref), 7, "binary", exclude=exclude)
    bits_q = np.unpackbits(binarize(query).numpy(), axis=1)
    bits_r = np.unpackbits(binarize(ref).numpy(), axis=1)
    dist = (bits_q[:, None, :] != bits_r[None, :, :]).sum(2)
    ex = None if exclude is None else exclude.numpy()
    order = np_ranking(-dist, 7, ex)
    assert np.array_equal(nn.indices.numpy(), order)
    assert np.array_equal(nn.values.numpy(), np.take_along_axis(dist, order, 1))
    # Float queries are binarized on the way in.
    assert torch.equal(
        search_codes(query, binarize(ref), 7, "binary", exclude=exclude).indices, nn.indices
    )


def test_int8_knn_is_brute_force_on_decoded_references() -> None:
    x, _ = clustered(80, 8, 24, 0.6, seed=4)
    c = calibrate(x)
    codes = quantize_int8(x, c)
    nn = search_codes(x, codes, 5, "int8", calibration=c, exclude=torch.arange(80))
    decoded = np_decode(codes.numpy(), c.low.numpy(), c.high.numpy())
    scores = x.numpy().astype(np.float64) @ decoded.astype(np.float64).T
    assert np.array_equal(nn.indices.numpy(), np_ranking(scores, 5, np.arange(80)))
    assert np.allclose(nn.values.numpy(), np.sort(scores - 1e9 * np.eye(80), 1)[:, ::-1][:, :5])
    # int8 queries are decoded first (symmetric search).
    both = search_codes(codes, codes, 5, "int8", calibration=c, exclude=torch.arange(80))
    by_hand = np_ranking(decoded.astype(np.float64) @ decoded.T, 5, np.arange(80))
    assert np.array_equal(both.indices.numpy(), by_hand)


@pytest.mark.parametrize("coded", ["binary", "int8"])
def test_rescore_is_brute_force_float_rescoring_of_the_candidates(coded: str) -> None:
    x, _ = clustered(90, 9, 32, 0.7, seed=5)
    c = calibrate(x)
    codes = binarize(x) if coded == "binary" else quantize_int8(x, c)
    found = search_codes(x, codes, 12, coded, calibration=c, exclude=torch.arange(90))  # type: ignore[arg-type]
    nn = rescore(x, x, found.indices, 3)
    cand = found.indices.numpy()
    scores = np.einsum("qd,qcd->qc", x.numpy().astype(np.float64), x.numpy()[cand])
    best = np.take_along_axis(cand, np_ranking(scores, 3, None), 1)
    assert np.array_equal(nn.indices.numpy(), best)
    assert np.allclose(nn.values.numpy(), np.sort(scores, 1)[:, ::-1][:, :3], atol=1e-6)
    l2 = rescore(x, x, found.indices, 3, metric="l2")
    dist = ((x.numpy()[:, None, :] - x.numpy()[cand]) ** 2).sum(2)
    assert np.array_equal(
        l2.indices.numpy(), np.take_along_axis(cand, np_ranking(-dist, 3, None), 1)
    )


def test_int8_recall_moves_only_for_queries_within_the_quantization_error() -> None:
    """Every decoded reference is within ``e = max ||r - decode(r)||`` of its float vector,
    so every score of a unit-norm query moves by at most ``e``: a query's recall@1 can change
    only if its best relevant and best irrelevant float scores are within ``2e``."""
    x, labels = clustered(600, 30, 64, 1.5, seed=6)
    c = calibrate(x)
    e = float((dequantize_int8(quantize_int8(x, c), c) - x).norm(dim=1).max())
    scores = x @ x.T
    scores.fill_diagonal_(-torch.inf)
    same = labels[:, None] == labels[None, :]
    best_rel = scores.masked_fill(~same, -torch.inf).amax(1)
    best_irr = scores.masked_fill(same, -torch.inf).amax(1)
    fragile = float(((best_rel - best_irr).abs() <= 2 * e).double().mean())
    full = retrieval_metrics(x, labels, 1)["recall@1"]
    int8 = retrieval_metrics(x, labels, 1, quantization="int8")["recall@1"]
    assert 0.5 < full < 1.0  # neither trivial nor hopeless
    assert abs(int8 - full) <= fragile + 1e-12
    assert fragile < 0.1  # and the bound says something: most queries cannot move


def by_hand(x: torch.Tensor, labels: torch.Tensor, dim: int, precision: str, ks, m=4) -> dict:
    """One grid cell from the pure functions: prefix, codes, exact search, relevance."""
    p = prefix(x, dim)
    n = len(p)
    r = torch.bincount(labels)[labels] - 1
    depth = max(max(ks), int(r.max()))
    exclude = torch.arange(n)
    if precision == "float32":
        scores = (p @ p.T).fill_diagonal_(-torch.inf).double()
        order = torch.from_numpy(np_ranking(scores.numpy(), depth, None))
    elif precision == "int8":
        c = calibrate(p)
        codes = quantize_int8(p, c)
        order = search_codes(p, codes, depth, "int8", calibration=c, exclude=exclude).indices
    elif precision == "binary":
        order = search_codes(p, binarize(p), depth, "binary", exclude=exclude).indices
    else:
        found = search_codes(p, binarize(p), m * depth, "binary", exclude=exclude)
        order = rescore(p, p, found.indices, depth).indices
    match = labels[order] == labels[:, None]
    out = {f"recall@{k}": float(recall_at_k(match, k).mean()) for k in ks}
    out.update({f"precision@{k}": float(precision_at_k(match, k).mean()) for k in ks})
    out["map@r"] = float(map_at_r(match, r).mean())
    out["bytes_per_vector"] = float(bytes_per_vector(dim, precision))  # type: ignore[arg-type]
    return out


def test_grid_cells_equal_the_pure_functions() -> None:
    x, labels = clustered(120, 12, 32, 1.0, seed=7)
    x = x * torch.linspace(0.5, 2.0, 120)[:, None]  # not unit norm: the prefix normalises
    precisions = ["float32", "int8", "binary", "binary_rescore"]
    metric = RetrievalMetrics(k=(1, 2), dims=[8, 32], precisions=precisions)
    plain = RetrievalMetrics(k=(1, 2))
    for start in range(0, 120, 50):
        for m in (metric, plain):
            m.update(x[start : start + 50], labels[start : start + 50])
    values = {name: float(v) for name, v in metric.compute().items()}
    plain_values = {name: float(v) for name, v in plain.compute().items()}
    assert {n: values[n] for n in plain_values} == plain_values  # today's keys unchanged
    for dim in (8, 32):
        for precision in precisions:
            expected = by_hand(x, labels, dim, precision, (1, 2))
            for name, value in expected.items():
                got = values.pop(f"d{dim}/{precision}/{name}")
                assert got == pytest.approx(value, abs=1e-6), (dim, precision, name)
    # Each cell also logs r_precision and mrr; nothing else was added.
    leftover = {n for n in values if n not in plain_values}
    assert {n.rsplit("/", 1)[1] for n in leftover} == {"r_precision", "mrr"}
    assert values["d32/float32/mrr"] == pytest.approx(plain_values["mrr"], abs=1e-6)


def test_split_sets_calibrate_on_the_reference_only() -> None:
    x, labels = clustered(100, 10, 16, 0.8, seed=8)
    queries, references = x[:40].clone(), x[40:]
    queries[:, 0] += 4.0  # far outside the references' range in dimension 0
    ql, rl = labels[:40], labels[40:]
    got = retrieval_metrics(
        queries,
        ql,
        (1, 2),
        reference_embeddings=references,
        reference_labels=rl,
        dim=12,
        quantization="int8",
        mrr=False,
        precision=False,
    )
    pq, pr = prefix(queries, 12), prefix(references, 12)
    c = calibrate(pr)
    r = torch.bincount(rl, minlength=10)[ql]
    nn = search_codes(pq, quantize_int8(pr, c), int(r.max()), "int8", calibration=c)
    match = rl[nn.indices] == ql[:, None]
    assert got["recall@2"] == pytest.approx(float(recall_at_k(match, 2).mean()))
    assert got["map@r"] == pytest.approx(float(map_at_r(match, r).mean()))
    # Ranges that had seen the queries would code the references differently.
    seen = calibrate(torch.cat([pq, pr]))
    assert not torch.equal(quantize_int8(pr, seen), quantize_int8(pr, c))
