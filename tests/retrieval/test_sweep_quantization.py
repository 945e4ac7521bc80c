"""Bad and unusual inputs of quantization and the evaluation grid: each row is a call and the
exception (type + message naming the value) it must raise, or an unusual-but-valid input
whose result is checked against ground truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from lightning_metric.callbacks import RecallAtK
from lightning_metric.retrieval import (
    Calibration,
    RetrievalMetrics,
    binarize,
    bytes_per_vector,
    calibrate,
    dequantize_int8,
    hamming,
    prefix,
    quantize_int8,
    rescore,
    retrieval_metrics,
    search_codes,
)

X = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
LABELS = torch.arange(12) % 3
CAL = calibrate(X)
CODES = quantize_int8(X, CAL)
BITS = binarize(X)
NAN = X.clone()
NAN[4, 2] = float("nan")


def _update_wider_than(dims: list[int]) -> None:
    RetrievalMetrics(dims=dims).update(X, LABELS)


BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "prefix dim 0",
        lambda: prefix(X, 0),
        ValueError,
        r"`dim` must be an integer in \[1, 8\], got 0",
    ),
    ("prefix above size", lambda: prefix(X, 9), ValueError, r"`dim` .*\[1, 8\], got 9"),
    ("prefix dim float", lambda: prefix(X, 4.0), TypeError, r"`dim` must be an integer.*4\.0"),
    ("prefix of NaN rows", lambda: prefix(NAN, 4), ValueError, r"1 of 12 rows .*NaN.*\[4\]"),
    ("calibrate NaN", lambda: calibrate(NAN), ValueError, r"`reference` has 1 of 12 rows"),
    (
        "calibrate quantile 0.5",
        lambda: calibrate(X, 0.5),
        ValueError,
        r"`quantile` must be in \(0, 0.5\), got 0.5",
    ),
    ("calibrate 1-D", lambda: calibrate(X[0]), ValueError, r"`reference` must be 2-D.*\(8,\)"),
    (
        "calibration low above high",
        lambda: Calibration(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5])),
        ValueError,
        r"low=1.0 > high=0.5 in dimension 1",
    ),
    (
        "calibration lengths differ",
        lambda: Calibration(torch.zeros(3), torch.ones(2)),
        ValueError,
        r"same dimension, got 3 and 2",
    ),
    (
        "calibration record of strings",
        lambda: Calibration.from_dict({"low": ["a"], "high": [1.0]}),
        ValueError,
        r"lists of numbers, got \{'low': \['a'\]",
    ),
    (
        "calibration record keys",
        lambda: Calibration.from_dict({"low": [0.0]}),
        ValueError,
        r"exactly the keys 'low' and 'high'",
    ),
    (
        "calibration dims differ from embeddings",
        lambda: quantize_int8(X[:, :4], CAL),
        ValueError,
        r"`calibration` has 8 dimensions but `embeddings` has 4.*calibrate\(prefix\(reference, 4\)\)",
    ),
    (
        "quantize without a Calibration",
        lambda: quantize_int8(X, (0.0, 1.0)),
        TypeError,
        r"must be a Calibration .*got tuple",
    ),
    (
        "quantize Inf",
        lambda: quantize_int8(NAN.nan_to_num(posinf=1.0, nan=float("inf")), CAL),
        ValueError,
        r"rows containing NaN or Inf",
    ),
    (
        "dequantize float codes",
        lambda: dequantize_int8(X, CAL),
        ValueError,
        r"`codes` must be non-empty torch.int8 codes.*torch.float32",
    ),
    (
        "hamming widths differ",
        lambda: hamming(BITS, binarize(torch.randn(3, 20))),
        ValueError,
        r"`a` has 1 bytes per code but `b` has 3",
    ),
    (
        "unknown precision",
        lambda: bytes_per_vector(8, "fp16"),
        ValueError,
        r"`precision` must be one of \('float32', 'int8', 'binary', 'binary_rescore'\), got 'fp16'",
    ),
    (
        "search: int8 without calibration",
        lambda: search_codes(X, CODES, 1, "int8"),
        ValueError,
        r"need their `calibration`.*got None",
    ),
    (
        "search: unknown precision",
        lambda: search_codes(X, CODES, 1, "int4"),
        ValueError,
        r"`precision` must be one of \('int8', 'binary'\), got 'int4'",
    ),
    (
        "search: binary codes as int8",
        lambda: search_codes(X, BITS, 1, "int8", calibration=CAL),
        ValueError,
        r"`codes` must be non-empty torch.int8 codes.*torch.uint8",
    ),
    (
        "search: query dim differs",
        lambda: search_codes(X[:, :4], CODES, 1, "int8", calibration=CAL),
        ValueError,
        r"`query` has 4 dimensions but the reference codes have 8",
    ),
    (
        "search: query bytes differ",
        lambda: search_codes(torch.randn(2, 20), BITS, 1, "binary"),
        ValueError,
        r"`query` has 3 bytes per code but the reference codes have 1",
    ),
    (
        "search: k above candidates",
        lambda: search_codes(BITS, BITS, 12, "binary", exclude=torch.arange(12)),
        ValueError,
        r"k=12 is larger .* \(11\); use k <= 11",
    ),
    (
        "search: NaN query",
        lambda: search_codes(NAN, CODES, 1, "int8", calibration=CAL),
        ValueError,
        r"`query` has 1 of 12 rows",
    ),
    (
        "rescore: k above candidates",
        lambda: rescore(X, X, torch.zeros(12, 2, dtype=torch.long), 3),
        ValueError,
        r"k=3 is larger than the number of candidates per query \(2\)",
    ),
    (
        "rescore: candidate out of range",
        lambda: rescore(X, X, torch.full((12, 2), 12), 1),
        ValueError,
        r"reference rows in \[0, 12\).*\[12, 12\]",
    ),
    (
        "rescore: float candidates",
        lambda: rescore(X, X, torch.zeros(12, 2), 1),
        ValueError,
        r"integer reference rows \[12, C\].*torch.float32",
    ),
    (
        "retrieval_metrics: unknown quantization",
        lambda: retrieval_metrics(X, LABELS, 1, quantization="int4"),
        ValueError,
        r"`quantization` must be one of .*got 'int4'",
    ),
    (
        "retrieval_metrics: rescore_multiplier 0",
        lambda: retrieval_metrics(
            X, LABELS, 1, quantization="binary_rescore", rescore_multiplier=0
        ),
        ValueError,
        r"`rescore_multiplier` must be an integer >= 1, got 0",
    ),
    (
        "retrieval_metrics: dim above size",
        lambda: retrieval_metrics(X, LABELS, 1, dim=16),
        ValueError,
        r"`dim` must be an integer in \[1, 8\], got 16",
    ),
    (
        "grid: dims not increasing",
        lambda: RecallAtK(dims=[64, 32]),
        ValueError,
        r"`dims` must be strictly increasing.*\[64, 32\]; e.g. \[32, 64\]",
    ),
    (
        "grid: dims repeated",
        lambda: RetrievalMetrics(dims=[32, 32]),
        ValueError,
        r"strictly increasing.*\[32, 32\]",
    ),
    (
        "grid: dims empty",
        lambda: RetrievalMetrics(dims=[]),
        ValueError,
        r"at least one prefix size, got an empty list",
    ),
    (
        "grid: dims a number",
        lambda: RetrievalMetrics(dims=64),
        TypeError,
        r"`dims` must be a list of prefix sizes.*got 64",
    ),
    (
        "grid: dim zero",
        lambda: RetrievalMetrics(dims=[0, 8]),
        ValueError,
        r"`dims\[0\]` must be an integer >= 1, got 0",
    ),
    (
        "grid: unknown precision",
        lambda: RecallAtK(precisions=["float32", "fp8"]),
        ValueError,
        r"`precisions\[1\]` must be one of .*got 'fp8'",
    ),
    (
        "grid: precision twice",
        lambda: RetrievalMetrics(precisions=["int8", "int8"]),
        ValueError,
        r"lists a precision twice: \['int8', 'int8'\]",
    ),
    (
        "grid: precisions a string",
        lambda: RetrievalMetrics(precisions="int8"),
        TypeError,
        r"`precisions` must be a list of precisions.*got 'int8'",
    ),
    (
        "grid: rescore_multiplier 0",
        lambda: RecallAtK(rescore_multiplier=0),
        ValueError,
        r"`rescore_multiplier` must be an integer >= 1, got 0",
    ),
    (
        "grid: dims above the embeddings",
        lambda: _update_wider_than([4, 16]),
        ValueError,
        r"dims=\[4, 16\]\) asks for a prefix of 16 dimensions, but the embeddings have 8",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [pytest.param(c, e, m, id=n) for n, c, e, m in BAD]
)
def test_bad_input(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------ unusual but valid


def test_constant_dimension_codes_and_decodes_to_its_value() -> None:
    x = X.clone()
    x[:, 5] = 0.125
    c = calibrate(x)
    codes = quantize_int8(x, c)
    assert bool((codes[:, 5] == -128).all())
    assert bool((dequantize_int8(codes, c)[:, 5] == 0.125).all())


def test_prefix_of_full_size_is_the_normalised_embedding() -> None:
    y = X * 3.0
    assert torch.allclose(prefix(y, 8), X, atol=1e-6)
    assert torch.equal(prefix(y, 1), torch.sign(y[:, :1]))


def test_rescore_multiplier_past_the_set_is_exact_float_search() -> None:
    # 100 x 1 candidates cover every item: re-scoring is then the exact float ranking.
    exact = retrieval_metrics(X, LABELS, (1, 2))
    rescored = retrieval_metrics(
        X, LABELS, (1, 2), quantization="binary_rescore", rescore_multiplier=100
    )
    assert rescored == pytest.approx(exact, abs=1e-9)


def test_identical_binary_codes_rank_by_lower_row() -> None:
    same = torch.ones(5, 8)  # every code equal: all distances 0
    nn = search_codes(same, binarize(same), 2, "binary", exclude=torch.arange(5))
    assert nn.indices.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]]
    assert nn.values.eq(0).all()


def test_numpy_inputs_are_accepted() -> None:
    codes = binarize(X.numpy())
    assert np.array_equal(codes.numpy(), np.packbits(X.numpy() > 0, axis=1))
    assert bytes_per_vector(9, "binary") == 2 and bytes_per_vector(9, "int8") == 9
