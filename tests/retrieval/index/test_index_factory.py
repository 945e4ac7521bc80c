"""EmbeddingIndex with FAISS index-factory strings: training, parameters, round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from lightning_metric.callbacks import EmbeddingIndexWriter
from lightning_metric.retrieval.index import EmbeddingIndex

DIM = 32
FACTORIES = ["Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ16"]
PARAMS = {
    "HNSW32": {"ef_search": 48},
    "IVF1024,Flat": {"nprobe": 64},
    "IVF1024,PQ16": {"nprobe": 64},
}
# Fraction of the exact top 10 found (1,500 clustered vectors; PQ16 codes are lossy).
LEAST_OVERLAP = {"Flat": 1.0, "HNSW32": 0.99, "IVF1024,Flat": 0.9, "IVF1024,PQ16": 0.5}


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((20, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32)
    return x


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(1500, 0), clustered(25, 1)


@pytest.mark.parametrize("factory", FACTORIES)
def test_factory_round_trips_with_the_same_neighbours(
    factory: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    base, queries = data
    labels = np.arange(len(base)) % 7
    index = EmbeddingIndex(base, labels=labels, factory=factory, **PARAMS.get(factory, {}))
    before = index.search(queries, k=10)
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["factory"] == factory
    assert manifest["search_params"] == PARAMS.get(factory, {})
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.factory == factory and loaded.search_params == PARAMS.get(factory, {})
    after = loaded.search(queries, k=10)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(loaded.labels, labels)
    # close to exact search on clustered data
    exact = EmbeddingIndex(base).search(queries, k=10).ids
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(after.ids, exact, strict=True)])
    assert overlap >= LEAST_OVERLAP[factory], overlap
    if factory == "Flat":
        np.testing.assert_array_equal(after.ids, exact)


def test_metric_chooses_the_faiss_metric(data: tuple[np.ndarray, np.ndarray]) -> None:
    base, _ = data
    for metric, expected in (("cosine", faiss.METRIC_INNER_PRODUCT), ("l2", faiss.METRIC_L2)):
        index = EmbeddingIndex(base, metric=metric, factory="IVF64,Flat")  # type: ignore[arg-type]
        assert index._index.metric_type == expected
    l2 = EmbeddingIndex(base, metric="l2", factory="HNSW32", ef_search=64)
    ids, scores = l2.search(base[:5], k=3)
    assert (ids[:, 0] == np.arange(5)).all() and np.all(np.diff(scores, axis=1) >= 0)


def test_manifest_without_factory_loads_as_flat(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    base, queries = data
    index = EmbeddingIndex(base[:200])
    index.save(tmp_path / "old")
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["factory"], manifest["search_params"]
    path.write_text(json.dumps(manifest))
    loaded = EmbeddingIndex.load(tmp_path / "old")
    assert loaded.factory == "Flat" and loaded.search_params == {}
    np.testing.assert_array_equal(loaded.search(queries, k=5).ids, index.search(queries, k=5).ids)


def test_per_call_parameters_do_not_change_the_stored_ones(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    base, queries = data
    index = EmbeddingIndex(base, factory="IVF64,Flat", nprobe=2)
    few = index.search(queries, k=10)
    every_list = index.search(queries, k=10, nprobe=64)
    exact = EmbeddingIndex(base).search(queries, k=10)
    np.testing.assert_array_equal(every_list.ids, exact.ids)  # all lists visited: exact
    assert index.search_params == {"nprobe": 2}
    np.testing.assert_array_equal(index.search(queries, k=10).ids, few.ids)
    hnsw = EmbeddingIndex(base, factory="HNSW32")
    hnsw.search(queries, k=5, ef_search=200)
    assert hnsw.search_params == {}


def test_missing_results_are_minus_one() -> None:
    base = clustered(300, 2)
    index = EmbeddingIndex(base, factory="IVF256,Flat")  # ~1 vector per list, nprobe 1
    ids, scores = index.search(base[:5], k=50)
    assert (ids == -1).any() and np.isneginf(scores[ids == -1]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factory": "NotAnIndex"}, r"'NotAnIndex' is not a FAISS index-factory string.*'HNSW32'"),
        ({"factory": "IVF4096,Flat"}, r"at least 4096 vectors.*1500 embeddings.*IVF38"),
        ({"factory": "IVF16,PQ7"}, r"PQ7 .*dimension 32 is not divisible by 7.*PQ8"),
        ({"factory": "PQ8", "nprobe": 4}, r"`nprobe`=4 applies to IVF indexes.*'PQ8'"),
        ({"factory": "IVF16,Flat", "ef_search": 4}, r"`ef_search`=4 applies to HNSW"),
        ({"factory": ""}, r"`factory` must be a FAISS index-factory string"),
        ({"factory": "HNSW32", "ef_search": 0}, r"`ef_search` must be"),
    ],
)
def test_bad_factory_arguments(
    kwargs: dict, message: str, data: tuple[np.ndarray, np.ndarray]
) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex(data[0], **kwargs)


def test_wrong_query_dimension_and_pq_training_size(data: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = data
    index = EmbeddingIndex(base, factory="HNSW32")
    with pytest.raises(ValueError, match=r"dimension 16, but the index holds 32-d"):
        index.search(queries[:, :16], k=3)
    with pytest.raises(ValueError, match=r"at least 256 vectors"):
        EmbeddingIndex(base[:100], factory="PQ8")


def test_writer_accepts_a_factory(tmp_path: Path) -> None:
    writer = EmbeddingIndexWriter(str(tmp_path), factory="IVF64,Flat", nprobe=4)
    assert (writer.factory, writer.nprobe) == ("IVF64,Flat", 4)
    with pytest.raises(ValueError, match="factory"):
        EmbeddingIndexWriter(str(tmp_path), factory="")
