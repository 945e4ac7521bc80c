"""A sweep of bad or unusual inputs to EmbeddingIndex: construction, search, add, save, load.

Each error row is ``(id, call, exception type, message regex)``: it raises where the value
enters, naming it. Each unusual-but-valid row returns ``(found, expected)`` where
``expected`` is computed by brute force with NumPy, independent of FAISS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_metric.checks import ArgumentTypeError
from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((300, 8)).astype(np.float32)
Q = RNG.standard_normal((6, 8)).astype(np.float32)
EMPTY = np.empty((0, 8), dtype=np.float32)


def brute(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine") -> np.ndarray:
    """Row numbers of the k nearest, ties to the lower row (a stable sort)."""
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        cost = ((queries[:, None, :] - base[None]) ** 2).sum(-1)
    else:
        cost = -(queries @ base.T)
    return np.argsort(cost, axis=1, kind="stable")[:, :k]


def flat(**kwargs: Any) -> EmbeddingIndex:
    return EmbeddingIndex(X, **kwargs)


def saved(tmp_path: Path, **kwargs: Any) -> Path:
    return flat(**kwargs).save(tmp_path / "index")


def edit_manifest(tmp_path: Path, **changes: Any) -> None:
    directory = saved(tmp_path)
    content = json.loads((directory / "manifest.json").read_text())
    content.update(changes)
    (directory / "manifest.json").write_text(json.dumps(content))
    EmbeddingIndex.load(directory)


def load_a_file(tmp_path: Path) -> None:
    (tmp_path / "index").write_text("not a directory")
    EmbeddingIndex.load(tmp_path / "index")


def save_over_a_file(tmp_path: Path) -> None:
    (tmp_path / "index").write_text("mine")
    flat().save(tmp_path / "index")


def add_existing_id(_: Path) -> None:
    flat().add(X[:2], ids=np.array([400, 17]))


ERRORS: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    # factory strings
    ("factory not a string", lambda: flat(factory=123), ArgumentTypeError, r"`factory` .*got 123"),
    ("factory empty", lambda: flat(factory="  "), ArgumentTypeError, r"`factory` .*got '  '"),
    ("factory lowercase", lambda: flat(factory="flat"), ValueError, r"'flat' is not a FAISS"),
    ("factory IVF0", lambda: flat(factory="IVF0,Flat"), ValueError, r"'IVF0,Flat' gives 0 IVF"),
    ("factory HNSW1", lambda: flat(factory="HNSW1"), ValueError, r"'HNSW1' gives 0 HNSW links"),
    ("factory SQ0", lambda: flat(factory="SQ0"), ValueError, r"'SQ0' gives 0 bytes per stored"),
    ("factory PQ8x0", lambda: flat(factory="PQ8x0"), ValueError, r"'PQ8x0' gives 0 bytes"),
    ("factory IDMap", lambda: flat(factory="IDMap,Flat"), ValueError, r"drop the 'IDMap' part"),
    ("factory PQ3 of 8-d", lambda: flat(factory="PQ3"), ValueError, r"dimension 8 .*by 3"),
    ("IVF too many lists", lambda: flat(factory="IVF512,Flat"), ValueError, r"at least 512"),
    ("IVF on no vectors", lambda: EmbeddingIndex(EMPTY, factory="IVF4,Flat"), ValueError, r"0 emb"),
    # search parameters on the wrong index type, or out of range
    ("nprobe on HNSW", lambda: flat(factory="HNSW16", nprobe=4), ValueError, r"`nprobe`=4 .*IVF"),
    ("ef_search on Flat", lambda: flat(ef_search=8), ValueError, r"`ef_search`=8 .*'Flat'"),
    (
        "ef_search per call on IVF",
        lambda: flat(factory="IVF8,Flat").search(Q, k=2, ef_search=8),
        ValueError,
        r"`ef_search`=8 applies to HNSW indexes; this index is 'IVF8,Flat'",
    ),
    ("nprobe zero", lambda: flat(factory="IVF8,Flat", nprobe=0), ValueError, r"`nprobe` .*got 0"),
    ("nprobe bool", lambda: flat(factory="IVF8,Flat", nprobe=True), ArgumentTypeError, r"True"),
    ("train_size zero", lambda: flat(factory="IVF8,Flat", train_size=0), ValueError, r"got 0"),
    ("metric unknown", lambda: flat(metric="euclid"), ValueError, r"got 'euclid'"),
    # k
    ("k above count", lambda: flat().search(Q, k=301), ValueError, r"k=301 .*\(300\)"),
    ("k on empty index", lambda: EmbeddingIndex(EMPTY).search(Q, k=1), ValueError, r"\(0\)"),
    ("k zero", lambda: flat().search(Q, k=0), ValueError, r"`k` must be an integer >= 1, got 0"),
    # queries
    ("NaN query", lambda: flat().search(Q * np.nan, k=1), ValueError, r"6 of 6 rows .*NaN"),
    ("wrong-dim query", lambda: flat().search(Q[:, :5], k=1), ValueError, r"dimension 5, but .*8"),
    ("1-D query", lambda: flat().search(Q[0], k=1), ValueError, r"got ndarray of shape \(8,\)"),
    ("integer query", lambda: flat().search(Q.astype(int), k=1), ValueError, r"dtype int64"),
    # ids, labels, paths
    (
        "duplicate ids",
        lambda: EmbeddingIndex(X[:4], ids=np.array([1, 2, 2, 3])),
        ValueError,
        r"ids must be unique; these occur more than once: \[2\]",
    ),
    ("id already stored", add_existing_id, ValueError, r"more than once: \[17\]"),
    (
        "id -1",
        lambda: EmbeddingIndex(X[:3], ids=np.array([5, -1, 6])),
        ValueError,
        r"ids must not be -1 \(row 1\)",
    ),
    ("float ids", lambda: EmbeddingIndex(X[:2], ids=np.array([0.5, 1])), ValueError, r"float64"),
    ("labels short", lambda: EmbeddingIndex(X[:3], labels=[0, 1]), ValueError, r"shape \[3\]"),
    (
        "path with newline",
        lambda: EmbeddingIndex(X[:2], paths=["a.png", "b\n.png"]),
        ValueError,
        r"line breaks, got 'b\\n\.png'",
    ),
    (
        "paths for some additions",
        lambda: EmbeddingIndex(X[:2], paths=["a", "b"]).add(X[:1]),
        ValueError,
        r"stores a path per item; pass paths for all additions",
    ),
    # save / load
    ("save without directory", lambda: flat().save(), ValueError, r"pass save\(directory\)"),
    ("save over a file", save_over_a_file, NotADirectoryError, r"index' exists and is not a dir"),
    ("load a file", load_a_file, NotADirectoryError, r"index' is a file"),
    (
        "load nothing",
        lambda tmp_path: EmbeddingIndex.load(tmp_path / "none"),
        FileNotFoundError,
        r"'.*none' does not exist",
    ),
    (
        "load an empty directory",
        lambda tmp_path: EmbeddingIndex.load(tmp_path),
        IndexFormatError,
        r"missing .*manifest\.json",
    ),
    (
        "manifest factory unbuildable",
        lambda tmp_path: edit_manifest(tmp_path, factory="IVF0,Flat"),
        IndexFormatError,
        r"factory 'IVF0,Flat': `factory` 'IVF0,Flat' gives 0 IVF lists",
    ),
    (
        "manifest factory not a string",
        lambda tmp_path: edit_manifest(tmp_path, factory=7),
        IndexFormatError,
        r"'factory' must be a string .*got 7",
    ),
    (
        "manifest count edited",
        lambda tmp_path: edit_manifest(tmp_path, count=299),
        IndexFormatError,
        r"embeddings\.npy' holds float32 \(300, 8\), expected float32 \(299, 8\)",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(call, error, match, id=name) for name, call, error, match in ERRORS],
)
def test_bad_input(
    call: Callable[..., Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path) if call.__code__.co_argcount else call()


# ---------------------------------------------------------------- unusual but valid


def k_equals_count(_: Path) -> tuple[np.ndarray, np.ndarray]:
    return flat().search(Q, k=300).ids, brute(X, Q, 300)


def l2_metric(_: Path) -> tuple[np.ndarray, np.ndarray]:
    return flat(metric="l2").search(Q, k=5).ids, brute(X, Q, 5, "l2")


def duplicate_vectors_tie_to_lower_id(_: Path) -> tuple[np.ndarray, np.ndarray]:
    base = np.concatenate([X[:50], X[:50]])  # rows i and i + 50 tie exactly
    found = EmbeddingIndex(base).search(X[:10], k=2).ids
    return found, np.stack([np.arange(10), np.arange(10) + 50], axis=1)


def nprobe_above_nlist_is_exact(_: Path) -> tuple[np.ndarray, np.ndarray]:
    return flat(factory="IVF8,Flat", nprobe=1000).search(Q, k=5).ids, brute(X, Q, 5)


def float64_tensor_queries(_: Path) -> tuple[np.ndarray, np.ndarray]:
    return flat().search(torch.from_numpy(Q).double(), k=3).ids, brute(X, Q, 3)


def train_size_above_count(_: Path) -> tuple[np.ndarray, np.ndarray]:
    # a sample larger than the data is the data: same as training on everything
    sampled = flat(factory="IVF8,Flat", nprobe=8, train_size=10**6).search(Q, k=4).ids
    return sampled, brute(X, Q, 4)


def empty_index_round_trip(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = EmbeddingIndex.load(EmbeddingIndex(EMPTY).save(tmp_path / "index"))
    loaded.add(X[:20], ids=np.arange(100, 120))
    return loaded.search(Q, k=3).ids, brute(X[:20], Q, 3) + 100


def add_nothing(_: Path) -> tuple[np.ndarray, np.ndarray]:
    index = flat()
    return np.array([len(index.add(EMPTY)), len(index)]), np.array([0, 300])


def symlinked_directory(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Saving through a link replaces the folder it points to and keeps the link."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    EmbeddingIndex(X[:30]).save(tmp_path / "link")
    EmbeddingIndex(X[30:90], ids=np.arange(30, 90)).save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    found = EmbeddingIndex.load(tmp_path / "link").search(Q, k=3).ids
    return found, brute(X[30:90], Q, 3) + 30


def save_over_a_bigger_index(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    flat(paths=[f"{i}.png" for i in range(300)]).save(tmp_path / "index")
    EmbeddingIndex(X[:40]).save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.paths is None and not (tmp_path / "index" / "paths.txt").exists()
    return loaded.search(Q, k=3).ids, brute(X[:40], Q, 3)


def ids_far_apart(_: Path) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([-(2**62), 0, 2**62, -500, 1000] * 60) + np.repeat(np.arange(60), 5)
    found = EmbeddingIndex(X, ids=ids).search(Q, k=4).ids
    return found, ids[brute(X, Q, 4)]


VALID: list[tuple[str, Callable[[Path], tuple[np.ndarray, np.ndarray]]]] = [
    ("k equals count", k_equals_count),
    ("l2 metric", l2_metric),
    ("duplicate vectors tie to the lower id", duplicate_vectors_tie_to_lower_id),
    ("nprobe above nlist is exact", nprobe_above_nlist_is_exact),
    ("float64 tensor queries", float64_tensor_queries),
    ("train_size above count", train_size_above_count),
    ("empty index saved, loaded, grown", empty_index_round_trip),
    ("add nothing", add_nothing),
    ("symlinked directory", symlinked_directory),
    ("save over a bigger index", save_over_a_bigger_index),
    ("ids far apart and negative", ids_far_apart),
]


@pytest.mark.parametrize("call", [pytest.param(call, id=name) for name, call in VALID])
def test_unusual_input_matches_brute_force(
    call: Callable[[Path], tuple[np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    found, expected = call(tmp_path)
    np.testing.assert_array_equal(found, expected)


def test_table_is_large_and_its_ids_unique() -> None:
    names = [row[0] for row in ERRORS] + [row[0] for row in VALID]
    assert len(ERRORS) >= 25 and len(names) == len(set(names))
