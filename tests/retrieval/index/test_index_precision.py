"""EmbeddingIndex with a Matryoshka prefix, int8 and binary codes: results equal the pure
functions of lightning_metric.retrieval.quantization (which are tested against NumPy), and
save / load / add keep them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError
from lightning_metric.retrieval.knn import prepare
from lightning_metric.retrieval.quantization import (
    binarize,
    calibrate,
    prefix,
    quantize_int8,
    rescore,
    search_codes,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((400, 32)).astype(np.float32)
Q = RNG.standard_normal((25, 32)).astype(np.float32)


def reference(x: np.ndarray, dim: int | None, metric: str = "cosine") -> torch.Tensor:
    """What the index holds before coding: the prefix (if any), prepared for the metric."""
    t = torch.from_numpy(x)
    return prepare(prefix(t, dim) if dim else t, metric)  # type: ignore[arg-type]


@pytest.mark.parametrize(("metric", "dim"), [("cosine", 16), ("l2", None), ("ip", 24)])
def test_int8_equals_search_codes(metric: str, dim: int | None) -> None:
    index = EmbeddingIndex(X, metric=metric, dim=dim, precision="int8")  # type: ignore[arg-type]
    ref, q = reference(X, dim, metric), reference(Q, dim, metric)
    calibration = calibrate(ref)
    assert torch.equal(index.calibration.low, calibration.low)  # type: ignore[union-attr]
    assert torch.equal(index.calibration.high, calibration.high)  # type: ignore[union-attr]
    # FAISS holds quantize_int8's codes (plus 128).
    stored = faiss.vector_to_array(index._index.codes).reshape(len(X), -1)
    codes = quantize_int8(ref, calibration)
    assert np.array_equal(stored, (codes.numpy().astype(np.int16) + 128).astype(np.uint8))
    space = "l2" if metric == "l2" else "ip"
    expected = search_codes(q, codes, 7, "int8", calibration=calibration, metric=space)
    found = index.search(Q, k=7)
    assert np.array_equal(found.ids, expected.indices.numpy())
    np.testing.assert_allclose(found.scores, expected.values.numpy(), rtol=1e-5, atol=1e-5)


def test_binary_equals_search_codes_with_hamming_ties_to_lower_row() -> None:
    # 12 bits over 400 items: many equal Hamming distances, ordered by row as search_codes.
    index = EmbeddingIndex(X, dim=12, precision="binary")
    ref, q = reference(X, 12), reference(Q, 12)
    expected = search_codes(q, binarize(ref), 9, "binary")
    found = index.search(Q, k=9)
    assert np.array_equal(found.ids, expected.indices.numpy())
    assert np.array_equal(found.scores, expected.values.numpy().astype(np.float32))


@pytest.mark.parametrize(("dim", "k"), [(8, 1), (8, 150), (20, 37), (32, 399)])
def test_binary_search_is_a_brute_force_sort_by_hamming_then_row(
    dim: int, k: int, tmp_path: Path
) -> None:
    """Tie groups of hundreds of rows (8 bits over 400 items) cross every cut-off: the
    result is the stable sort of the brute-force Hamming distances, before and after save /
    load, searched alone or in a batch."""
    bits = np.unpackbits(
        binarize(reference(Q, dim)).numpy()[:, None, :]
        ^ binarize(reference(X, dim)).numpy()[None, :, :],
        axis=2,
    ).sum(2)
    order = np.argsort(bits, axis=1, kind="stable")[:, :k]
    index = EmbeddingIndex(X, dim=dim, precision="binary")
    loaded = EmbeddingIndex.load(index.save(tmp_path / "index"))
    for searched in (index, loaded):
        found = searched.search(Q, k=k)
        assert np.array_equal(found.ids, order)
        assert np.array_equal(found.scores, np.take_along_axis(bits, order, 1).astype(np.float32))
        assert np.array_equal(searched.search(Q[3:4], k=k).ids, order[3:4])


@pytest.mark.parametrize(("precision", "metric"), [("binary", "cosine"), ("int8", "l2")])
def test_rescore_equals_codes_then_float(precision: str, metric: str) -> None:
    k, m = 5, 4
    index = EmbeddingIndex(
        X,
        metric=metric,  # type: ignore[arg-type]
        dim=16,
        precision=precision,  # type: ignore[arg-type]
        rescore_multiplier=m,
    )
    ref, q = reference(X, 16, metric), reference(Q, 16, metric)
    space = "l2" if metric == "l2" else "ip"
    if precision == "binary":
        candidates = search_codes(q, binarize(ref), m * k, "binary").indices
    else:
        c = calibrate(ref)
        codes = quantize_int8(ref, c)
        candidates = search_codes(q, codes, m * k, "int8", calibration=c, metric=space).indices
    expected = rescore(q, ref, candidates, k, space)  # type: ignore[arg-type]
    found = index.search(Q, k=k)
    assert np.array_equal(found.ids, expected.indices.numpy())
    np.testing.assert_allclose(found.scores, expected.values.numpy(), rtol=1e-5, atol=1e-6)


def test_full_rescore_depth_is_exact_float_search() -> None:
    """With every item a candidate, binary + rescore is the float search of the prefix."""
    index = EmbeddingIndex(X[:40], dim=8, precision="binary", rescore_multiplier=8)
    exact = EmbeddingIndex(prefix(torch.from_numpy(X[:40]), 8).numpy())
    assert np.array_equal(index.search(Q, k=5).ids, exact.search(Q[:, :8], k=5).ids)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dim": 16},
        {"precision": "int8"},
        {"precision": "int8", "dim": 8, "rescore_multiplier": 2},
        {"precision": "int8", "factory": "IVF4,SQ8", "nprobe": 2},
        {"precision": "binary"},
        {"precision": "binary", "dim": 20, "rescore_multiplier": 3},
    ],
)
def test_save_load_round_trip(tmp_path: Path, options: dict[str, Any]) -> None:
    index = EmbeddingIndex(X, ids=np.arange(len(X)) + 1000, **options)
    before = index.search(Q, k=6)
    loaded = EmbeddingIndex.load(index.save(tmp_path / "index"))
    after = loaded.search(Q, k=6)
    assert np.array_equal(before.ids, after.ids)
    assert np.array_equal(before.scores, after.scores)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["precision"] == options.get("precision", "float32")
    assert manifest["dim"] == options.get("dim")
    assert manifest["rescore_multiplier"] == options.get("rescore_multiplier")
    assert (manifest["calibration"] is None) == (index.calibration is None)
    for name in ("precision", "prefix_dim", "rescore_multiplier", "factory"):
        assert getattr(loaded, name) == getattr(index, name)
    if index.calibration is not None:
        assert torch.equal(loaded.calibration.low, index.calibration.low)  # type: ignore[union-attr]
        assert torch.equal(loaded.calibration.high, index.calibration.high)  # type: ignore[union-attr]
    # The binary index keeps its float rows on disk, read only for the re-scored candidates.
    assert isinstance(loaded.embeddings, np.memmap) == (options.get("precision") == "binary")


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_hashes_cover_the_code_index(tmp_path: Path, precision: str) -> None:
    directory = EmbeddingIndex(X, precision=precision).save(tmp_path / "index")  # type: ignore[arg-type]
    data = bytearray((directory / "index.faiss").read_bytes())
    data[-1] ^= 0xFF
    (directory / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="index.faiss"):
        EmbeddingIndex.load(directory)


def test_edited_calibration_is_caught_without_hashes(tmp_path: Path) -> None:
    directory = EmbeddingIndex(X, precision="int8").save(tmp_path / "index")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["calibration"]["high"][0] += 0.5
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="other int8 ranges"):
        EmbeddingIndex.load(directory, verify=False)


def test_old_manifest_loads_as_float32_full_dim(tmp_path: Path) -> None:
    directory = EmbeddingIndex(X).save(tmp_path / "index")
    manifest = json.loads((directory / "manifest.json").read_text())
    for key in ("precision", "dim", "calibration", "rescore_multiplier"):
        del manifest[key]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    loaded = EmbeddingIndex.load(directory)
    assert (loaded.precision, loaded.prefix_dim, loaded.index_dim) == ("float32", None, 32)
    assert loaded.calibration is None and loaded.rescore_multiplier is None


def test_calibration_never_depends_on_queries() -> None:
    index = EmbeddingIndex(X, precision="int8", dim=16)
    low, high = index.calibration.low.clone(), index.calibration.high.clone()  # type: ignore[union-attr]
    # Queries far outside the reference ranges: one at a time equals the batch.
    wild = Q * 50.0
    batch = index.search(wild, k=4)
    for i in range(len(wild)):
        one = index.search(wild[i : i + 1], k=4)
        assert np.array_equal(one.ids[0], batch.ids[i])
        np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-6)
    assert torch.equal(index.calibration.low, low) and torch.equal(index.calibration.high, high)  # type: ignore[union-attr]


def test_add_codes_with_the_stored_calibration() -> None:
    index = EmbeddingIndex(X[:300], precision="int8", dim=16)
    calibration = index.calibration
    # An item inside the ranges (the built index gets the same calibration): coded as
    # building with it would ...
    inside = X[:2].sum(0, keepdims=True)
    index.add(inside)
    built = EmbeddingIndex(np.concatenate([X[:300], inside]), precision="int8", dim=16)
    assert torch.equal(built.calibration.low, calibration.low)  # type: ignore[union-attr]
    assert torch.equal(built.calibration.high, calibration.high)  # type: ignore[union-attr]
    added = faiss.vector_to_array(index._index.codes).reshape(301, 16)
    codes_built = faiss.vector_to_array(built._index.codes).reshape(301, 16)
    assert np.array_equal(added, codes_built)
    # ... and one that reaches past them is coded with the stored ranges, left unchanged.
    outside = np.zeros((1, 32), dtype=np.float32)
    outside[0, 0] = 1.0
    index.add(outside)
    assert index.calibration is calibration
    last = faiss.vector_to_array(index._index.codes).reshape(302, 16)[-1]
    expected = quantize_int8(reference(outside, 16), calibration).numpy().astype(np.int16) + 128  # type: ignore[arg-type]
    assert np.array_equal(last, expected[0].astype(np.uint8))


def test_add_binary_equals_building_with_it() -> None:
    index = EmbeddingIndex(X[:200], precision="binary", dim=24)
    index.add(X[200:])
    built = EmbeddingIndex(X, precision="binary", dim=24)
    assert np.array_equal(index.search(Q, k=8).ids, built.search(Q, k=8).ids)


def test_queries_of_full_or_prefix_dim_agree() -> None:
    index = EmbeddingIndex(X, precision="int8", dim=12)
    assert np.array_equal(index.search(Q, k=5).ids, index.search(Q[:, :12], k=5).ids)


def test_ivf_probing_every_list_equals_flat_codes() -> None:
    flat = EmbeddingIndex(X, precision="int8", dim=16)
    ivf = EmbeddingIndex(X, precision="int8", dim=16, factory="IVF4,SQ8", nprobe=4)
    assert ivf.calibration is not None and flat.calibration is not None
    assert torch.equal(ivf.calibration.low, flat.calibration.low)
    assert np.array_equal(ivf.search(Q, k=5).ids, flat.search(Q, k=5).ids)
