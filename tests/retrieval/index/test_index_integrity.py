"""Index files altered after saving are refused on load (issue 18): content hashes, the
FAISS structure against the manifest's factory, format versions, re-hashing on save."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

import lightning_metric.provenance as provenance
from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError

DIM = 16
FACTORIES = ["Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ4", "PQ4", "SQ8"]
LOSSY = ["IVF16,PQ4", "PQ4", "SQ8"]
PARAMS = {"HNSW32": {"ef_search": 32}, "IVF16,Flat": {"nprobe": 4}, "IVF16,PQ4": {"nprobe": 4}}


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).standard_normal((12, DIM)).astype(np.float32)
    return centres[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, DIM), np.float32)


BASE, QUERIES = clustered(600, 0), clustered(20, 1)


def build(factory: str = "Flat", seed: int = 0, paths: bool = False) -> EmbeddingIndex:
    base = BASE if seed == 0 else clustered(600, seed)
    return EmbeddingIndex(
        base,
        labels=np.arange(len(base)) % 5,
        factory=factory,
        paths=[f"img/{i}.png" for i in range(len(base))] if paths else None,
        **PARAMS.get(factory, {}),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory: Path, content: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(content))


def assert_changed_file_is_named(directory: Path, name: str) -> None:
    """Load refuses, naming the file, the hash the manifest recorded and the one found."""
    recorded = manifest(directory)["sha256"][name]
    with pytest.raises(IndexFormatError) as err:
        EmbeddingIndex.load(directory)
    message = str(err.value)
    assert re.search(rf"{re.escape(name)}' changed after it was saved", message), message
    assert f"sha256 is {sha256(directory / name)}, but manifest.json recorded {recorded}" in (
        message
    )


# ---------------------------------------------------------------- unaltered round trips


@pytest.mark.parametrize("factory", FACTORIES)
def test_round_trip_records_the_hashes_and_searches_as_before(factory: str, tmp_path: Path) -> None:
    index = build(factory, paths=True)
    before = index.search(QUERIES, k=8)
    directory = index.save(tmp_path / "index")
    recorded = manifest(directory)
    assert recorded["version"] == 2
    files = ["embeddings.npy", "ids.npy", "index.faiss", "labels.npy", "paths.txt"]
    assert recorded["sha256"] == {name: sha256(directory / name) for name in files}
    for verify in (True, False):
        loaded = EmbeddingIndex.load(directory, verify=verify)
        after = loaded.search(QUERIES, k=8)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
        assert loaded.paths == index.paths and loaded.search_params == index.search_params


def test_hash_reads_in_chunks_like_one_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(provenance, "_CHUNK", 1000)
    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).bytes(10_001))  # 10 full chunks and 1 byte
    assert provenance.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert provenance.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- altered files


def swap_faiss_rows(directory: Path) -> None:
    """Rows 1 and 2 of a Flat index.faiss swapped: rows the old spot check never read."""
    stored = faiss.read_index(str(directory / "index.faiss"))
    vectors = stored.reconstruct_n(0, stored.ntotal)
    vectors[[1, 2]] = vectors[[2, 1]]
    swapped = faiss.IndexFlatIP(DIM)
    swapped.add(vectors)
    faiss.write_index(swapped, str(directory / "index.faiss"))


def edit_npy(name: str, edit: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def alter(directory: Path) -> None:
        arr = np.load(directory / name)
        edit(arr)
        np.save(directory / name, arr)

    return alter


def nudge_row(arr: np.ndarray) -> None:
    arr[1] += 0.5


def swap_ids(arr: np.ndarray) -> None:
    arr[[3, 4]] = arr[[4, 3]]


def relabel(arr: np.ndarray) -> None:
    arr[5] = (arr[5] + 1) % 5


def edit_path(directory: Path) -> None:
    lines = (directory / "paths.txt").read_text().splitlines()
    lines[7] = "img/other.png"
    (directory / "paths.txt").write_text("".join(f"{line}\n" for line in lines))


def truncate(name: str) -> Callable[[Path], None]:
    def alter(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) - 64])

    return alter


ALTERATIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("faiss rows swapped", swap_faiss_rows, "index.faiss"),
    ("embedding row changed", edit_npy("embeddings.npy", nudge_row), "embeddings.npy"),
    ("ids swapped", edit_npy("ids.npy", swap_ids), "ids.npy"),
    ("label changed", edit_npy("labels.npy", relabel), "labels.npy"),
    ("path edited", edit_path, "paths.txt"),
    ("faiss truncated", truncate("index.faiss"), "index.faiss"),
    ("embeddings truncated", truncate("embeddings.npy"), "embeddings.npy"),
]


@pytest.mark.parametrize(
    ("alter", "name"), [a[1:] for a in ALTERATIONS], ids=[a[0] for a in ALTERATIONS]
)
def test_altered_file_is_refused(alter: Callable[[Path], None], name: str, tmp_path: Path) -> None:
    directory = build(paths=True).save(tmp_path / "index")
    alter(directory)
    assert_changed_file_is_named(directory, name)


def test_alterations_only_the_hashes_catch(tmp_path: Path) -> None:
    """Without the hashes these load and answer wrongly: what verification adds."""
    index = build(paths=True)
    own = np.arange(8)
    np.testing.assert_array_equal(index.search(BASE[:8], k=1).ids[:, 0], own)
    for alter in (swap_faiss_rows, edit_npy("ids.npy", swap_ids), edit_path):
        directory = index.save(tmp_path / "index")
        alter(directory)
        unverified = EmbeddingIndex.load(directory, verify=False)
        found = unverified.search(BASE[:8], k=1).ids[:, 0]
        assert unverified.paths != index.paths or not np.array_equal(found, own), alter
        with pytest.raises(IndexFormatError, match="changed after it was saved"):
            EmbeddingIndex.load(directory)


@pytest.mark.parametrize("factory", LOSSY)
@pytest.mark.parametrize("name", ["index.faiss", "embeddings.npy", "ids.npy", "labels.npy"])
def test_lossy_index_file_from_another_save_is_refused(
    factory: str, name: str, tmp_path: Path
) -> None:
    directory = build(factory).save(tmp_path / "index")
    other = EmbeddingIndex(
        clustered(600, 3),
        ids=np.arange(600)[::-1].copy(),
        labels=np.arange(600) % 3,
        factory=factory,
    ).save(tmp_path / "other")
    assert sha256(other / name) != sha256(directory / name)
    shutil.copyfile(other / name, directory / name)
    assert_changed_file_is_named(directory, name)


def test_unlisted_paths_file_and_missing_hash_are_refused(tmp_path: Path) -> None:
    directory = build().save(tmp_path / "index")
    (directory / "paths.txt").write_text("".join(f"x{i}\n" for i in range(600)))
    with pytest.raises(IndexFormatError, match=r"paths\.txt' has no sha256 in manifest\.json"):
        EmbeddingIndex.load(directory)
    (directory / "paths.txt").unlink()
    content = manifest(directory)
    del content["sha256"]["ids.npy"]
    write_manifest(directory, content)
    with pytest.raises(IndexFormatError, match=r"ids\.npy' has no sha256 in manifest\.json"):
        EmbeddingIndex.load(directory)
    content["sha256"] = "abc"
    write_manifest(directory, content)
    with pytest.raises(IndexFormatError, match=r"'sha256' must map each index file.*'abc'"):
        EmbeddingIndex.load(directory)


# ---------------------------------------------------------------- edited manifest

FACTORY_EDITS = [
    ("Flat", "HNSW32", r"index class is 'IndexFlat' in the file, 'IndexHNSWFlat'"),
    ("HNSW32", "HNSW16", r"index HNSW M is 32 in the file, 16 from the factory"),
    ("IVF16,Flat", "IVF32,Flat", r"index nlist is 16 in the file, 32 from the factory"),
    ("IVF16,Flat", "IVF16,SQ8", r"index class is 'IndexIVFFlat' in the file"),
    ("IVF16,PQ4", "IVF16,PQ8", r"index code_size is 4 in the file, 8 from the factory"),
    ("IVF16,PQ4", "IVF16,PQ4x6", r"index code_size is 4 in the file, 3 from the factory"),
    ("PQ4", "PQ2", r"index code_size is 4 in the file, 2"),
    ("SQ8", "SQ4", r"index code_size is 16 in the file, 8"),
    ("SQ8", "SQfp16", r"index code_size is 16 in the file, 32"),
]


@pytest.mark.parametrize(("saved", "edited", "message"), FACTORY_EDITS)
def test_edited_factory_is_refused(saved: str, edited: str, message: str, tmp_path: Path) -> None:
    directory = build(saved).save(tmp_path / "index")
    content = manifest(directory)
    content["factory"] = edited
    write_manifest(directory, content)
    for verify in (True, False):  # the manifest has no hash: the structure check catches it
        with pytest.raises(IndexFormatError, match=rf"index\.faiss' is not the index .*{message}"):
            EmbeddingIndex.load(directory, verify=verify)


def test_edited_faiss_type_and_unbuildable_factory_are_refused(tmp_path: Path) -> None:
    directory = build("IVF16,Flat").save(tmp_path / "index")
    content = manifest(directory)
    assert content["faiss_index"] == "IndexIVFFlat"
    write_manifest(directory, {**content, "faiss_index": "IndexIVFPQ"})
    with pytest.raises(IndexFormatError, match=r"'faiss_index' 'IndexIVFPQ', but .* IndexIVFFlat"):
        EmbeddingIndex.load(directory)
    write_manifest(directory, {**content, "factory": "NotAnIndex"})
    with pytest.raises(IndexFormatError, match=r"manifest\.json': factory 'NotAnIndex'"):
        EmbeddingIndex.load(directory)


# ---------------------------------------------------------------- versions and re-hashing


def test_add_and_save_rehash(tmp_path: Path) -> None:
    directory = build("IVF16,Flat").save(tmp_path / "index")
    old = manifest(directory)["sha256"]
    loaded = EmbeddingIndex.load(directory)
    extra = clustered(30, 5)
    new_ids = loaded.add(extra, labels=np.zeros(30, dtype=np.int64))
    loaded.save()
    recorded = manifest(directory)["sha256"]
    assert recorded == {name: sha256(directory / name) for name in old}
    assert all(recorded[name] != old[name] for name in old)  # every file grew
    again = EmbeddingIndex.load(directory)
    ids = again.search(extra, k=1, nprobe=16).ids[:, 0]  # all lists: exact
    np.testing.assert_array_equal(ids, new_ids)


def as_version_1(directory: Path) -> None:
    content = manifest(directory)
    content["version"] = 1
    del content["sha256"]
    write_manifest(directory, content)


def test_version_1_loads_with_a_warning_until_saved_again(tmp_path: Path) -> None:
    index = build("HNSW32")
    directory = index.save(tmp_path / "index")
    as_version_1(directory)
    with pytest.warns(UserWarning, match=r"format version 1, written before .*content hashes"):
        loaded = EmbeddingIndex.load(directory)
    np.testing.assert_array_equal(loaded.search(QUERIES, k=5).ids, index.search(QUERIES, k=5).ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EmbeddingIndex.load(directory, verify=False)  # accepted as it is: no warning
        loaded.save()
        assert manifest(directory)["version"] == 2
        EmbeddingIndex.load(directory)  # hashes recorded: verified, no warning
    edit_npy("labels.npy", relabel)(directory)
    assert_changed_file_is_named(directory, "labels.npy")


def test_other_versions_are_refused(tmp_path: Path) -> None:
    directory = build().save(tmp_path / "index")
    for version in (0, 3, "2"):
        write_manifest(directory, {**manifest(directory), "version": version})
        with pytest.raises(IndexFormatError, match=rf"has version {version!r}; this release"):
            EmbeddingIndex.load(directory)
