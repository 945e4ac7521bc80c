"""A sweep of bad or unusual inputs to EmbeddingIndex's dim / precision / rescore_multiplier.

Each error row is ``(id, call, exception type, message regex)``: it raises where the value
enters (construction, load, search), naming it. Each unusual-but-valid row returns
``(found, expected)``, ``expected`` computed by brute force with NumPy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_metric.checks import ArgumentTypeError
from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError

RNG = np.random.default_rng(1)
X = RNG.standard_normal((120, 16)).astype(np.float32)
Q = RNG.standard_normal((5, 16)).astype(np.float32)


def build(**kwargs: Any) -> EmbeddingIndex:
    return EmbeddingIndex(X, **kwargs)


def edit_manifest(tmp_path: Path, options: dict[str, Any], **changes: Any) -> None:
    directory = build(**options).save(tmp_path / "index")
    content = json.loads((directory / "manifest.json").read_text())
    content.update(changes)
    (directory / "manifest.json").write_text(json.dumps(content))
    EmbeddingIndex.load(directory)


def unit_prefix(x: np.ndarray, d: int) -> np.ndarray:
    p = x[:, :d]
    return p / np.linalg.norm(p, axis=1, keepdims=True)


ERRORS: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    ("unknown precision", lambda: build(precision="fp16"), ValueError, r"precision.*'fp16'"),
    (
        "precision binary_rescore",
        lambda: build(precision="binary_rescore"),
        ValueError,
        r"'binary_rescore' is written precision='binary', rescore_multiplier=4",
    ),
    ("dim zero", lambda: build(dim=0), ValueError, r"`dim`=0 .*\[1, 16\]"),
    ("dim negative", lambda: build(dim=-4), ValueError, r"`dim`=-4 .*\[1, 16\]"),
    ("dim above embedding dim", lambda: build(dim=17), ValueError, r"`dim`=17 .*16 dimensions"),
    ("dim a float", lambda: build(dim=8.0), ArgumentTypeError, r"`dim` .*got 8\.0"),
    ("dim a bool", lambda: build(dim=True), ArgumentTypeError, r"`dim` .*got True"),
    (
        "int8 without calibration data",
        lambda: EmbeddingIndex(np.empty((0, 16), np.float32), precision="int8"),
        ValueError,
        r"int8.*none were given",
    ),
    (
        "rescore zero",
        lambda: build(precision="binary", rescore_multiplier=0),
        ValueError,
        r"rescore_multiplier.*0",
    ),
    (
        "rescore negative",
        lambda: build(precision="int8", rescore_multiplier=-2),
        ValueError,
        r"rescore_multiplier.*-2",
    ),
    (
        "rescore with float32",
        lambda: build(rescore_multiplier=4),
        ValueError,
        r"`rescore_multiplier`=4 .*float32 index already ranks",
    ),
    (
        "rescore with approximate int8",
        lambda: build(precision="int8", factory="IVF4,SQ8", rescore_multiplier=2),
        ValueError,
        r"`rescore_multiplier`=2 needs a flat code index.*'IVF4,SQ8'",
    ),
    (
        "int8 with an HNSW factory",
        lambda: build(precision="int8", factory="HNSW32"),
        ValueError,
        r"`factory` 'HNSW32' does not fit precision 'int8'.*'SQ8'",
    ),
    (
        "int8 with a PQ factory",
        lambda: build(precision="int8", factory="IVF4,PQ4"),
        ValueError,
        r"'IVF4,PQ4' does not fit precision 'int8'",
    ),
    (
        "binary with an IVF factory",
        lambda: build(precision="binary", factory="IVF4,Flat"),
        ValueError,
        r"'IVF4,Flat' does not fit precision 'binary'.*'Flat'",
    ),
    (
        "nprobe on a binary index",
        lambda: build(precision="binary", nprobe=4),
        ValueError,
        r"`nprobe`=4 .*binary index",
    ),
    (
        "nprobe override on a binary search",
        lambda: build(precision="binary").search(Q, k=2, nprobe=2),
        ValueError,
        r"`nprobe`=2 .*binary index is searched exactly",
    ),
    (
        "ef_search override on a flat int8 search",
        lambda: build(precision="int8").search(Q, k=2, ef_search=8),
        ValueError,
        r"`ef_search`=8 applies to HNSW indexes; this index is 'SQ8'",
    ),
    (
        "query of neither dim",
        lambda: build(dim=8, precision="int8").search(Q[:, :10], k=2),
        ValueError,
        r"dimension 10.*16-d queries or 8-d",
    ),
    (
        "query of prefix dim without a prefix",
        lambda: build(precision="binary").search(Q[:, :8], k=2),
        ValueError,
        r"dimension 8, .*pass 16-d queries$",
    ),
    (
        "int8 codes as a query",
        lambda: build(precision="int8").search(np.zeros((2, 16), np.int8), k=2),
        ValueError,
        r"got int8 codes: this int8 index codes queries itself",
    ),
    (
        "binary codes as a query",
        lambda: build(precision="binary").search(torch.zeros(2, 2, dtype=torch.uint8), k=2),
        ValueError,
        r"got torch.uint8 codes: this binary index",
    ),
    (
        "manifest precision unknown",
        lambda tmp_path: edit_manifest(tmp_path, {}, precision="int4"),
        IndexFormatError,
        r"manifest.json.*precision.*'int4'",
    ),
    (
        "manifest dim above embedding dim",
        lambda tmp_path: edit_manifest(tmp_path, {"dim": 8}, dim=40),
        IndexFormatError,
        r"manifest.json.*`dim`=40",
    ),
    (
        "manifest int8 calibration removed",
        lambda tmp_path: edit_manifest(tmp_path, {"precision": "int8"}, calibration=None),
        IndexFormatError,
        r"int8 index needs a 'calibration'",
    ),
    (
        "manifest calibration malformed",
        lambda tmp_path: edit_manifest(tmp_path, {"precision": "int8"}, calibration={"low": [0]}),
        IndexFormatError,
        r"manifest.json.*'low' and 'high'",
    ),
    (
        "manifest calibration of another dim",
        lambda tmp_path: edit_manifest(
            tmp_path, {"precision": "int8"}, calibration={"low": [0.0] * 4, "high": [1.0] * 4}
        ),
        IndexFormatError,
        r"calibration of 4 dimensions does not fit a int8 index of 16-d",
    ),
    (
        "manifest says float32 for a binary file",
        lambda tmp_path: edit_manifest(tmp_path, {"precision": "binary"}, precision="float32"),
        IndexFormatError,
        r"index.faiss",
    ),
    (
        "manifest says binary for a float file",
        lambda tmp_path: edit_manifest(tmp_path, {}, precision="binary"),
        IndexFormatError,
        r"index.faiss",
    ),
    (
        "manifest rescore on float32",
        lambda tmp_path: edit_manifest(tmp_path, {}, rescore_multiplier=2),
        IndexFormatError,
        r"rescore_multiplier`=2",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS]
)
def test_bad_input(
    call: Callable[..., Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path) if call.__code__.co_argcount else call()


# ---------------------------------------------------------------- unusual but valid


def brute_cosine(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    base = base / np.linalg.norm(base, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def brute_hamming(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    cost = ((queries[:, None, :] > 0) != (base[None] > 0)).sum(-1)
    return np.argsort(cost, axis=1, kind="stable")[:, :k]


def prefix_is_full_dim(_: Path) -> tuple[np.ndarray, np.ndarray]:
    return build(dim=16).search(Q, k=4).ids, brute_cosine(X, Q, 4)


def prefix_of_one(_: Path) -> tuple[np.ndarray, np.ndarray]:
    # A 1-d prefix is +-1: every item with the query's sign ties, lowest rows first.
    found = build(dim=1).search(Q, k=3).ids
    same = [np.flatnonzero(np.sign(X[:, 0]) == np.sign(q[0]))[:3] for q in Q]
    return found, np.stack(same)


def binary_odd_bits(_: Path) -> tuple[np.ndarray, np.ndarray]:
    # 11 bits: the last byte is padded, which must not change the Hamming distances.
    return build(dim=11, precision="binary").search(Q, k=6).ids, brute_hamming(
        X[:, :11], Q[:, :11], 6
    )


def rescore_deeper_than_index(_: Path) -> tuple[np.ndarray, np.ndarray]:
    # multiplier * k above the item count: every item is re-scored, the float result.
    found = build(dim=8, precision="binary", rescore_multiplier=100).search(Q, k=5).ids
    return found, brute_cosine(unit_prefix(X, 8), unit_prefix(Q, 8), 5)


def k_equals_count_int8(_: Path) -> tuple[np.ndarray, np.ndarray]:
    found = np.sort(build(precision="int8").search(Q, k=len(X)).ids, axis=1)
    return found, np.tile(np.arange(len(X)), (len(Q), 1))


def constant_dimension_int8(_: Path) -> tuple[np.ndarray, np.ndarray]:
    # A dimension with one value in the reference set (low == high) codes as -128 and
    # contributes the same to every item's score: the ranking is that of the other ones.
    base = X.copy()
    base[:, 3] = 0.25
    found = EmbeddingIndex(base, metric="ip", precision="int8").search(Q, k=3).ids
    rest = np.delete(np.arange(16), 3)
    expected = EmbeddingIndex(base[:, rest], metric="ip", precision="int8").search(Q[:, rest], k=3)
    return found, expected.ids


VALID = [
    prefix_is_full_dim,
    prefix_of_one,
    binary_odd_bits,
    rescore_deeper_than_index,
    k_equals_count_int8,
    constant_dimension_int8,
]


@pytest.mark.parametrize("case", VALID, ids=[f.__name__ for f in VALID])
def test_unusual_but_valid(
    case: Callable[[Path], tuple[np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    found, expected = case(tmp_path)
    assert np.array_equal(found, expected)
