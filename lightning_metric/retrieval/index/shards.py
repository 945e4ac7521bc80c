"""Sharded index directories: one shard per DDP rank plus one manifest, written without
gathering (``EmbeddingIndexWriter(shard=True)``), served as one index by
:meth:`~lightning_metric.retrieval.EmbeddingIndex.load`.

Layout::

    manifest.json                 the index's settings (factory, search parameters, dim,
                                  precision, rescore_multiplier, info) and "shards": each
                                  shard folder with its row count and its manifest's sha256
    shard-00000-of-00002/
        manifest.json             count, embedding size, metric, sha256 of every file below
        embeddings.npy ids.npy labels.npy [paths.txt]
        order.npy                 int64 [n]: each row's position in one-process order

Loading is a merge step: the shards are read (every file checked against its hash), their
rows put back in one-process order by ``order.npy``, and the FAISS index is built from them
as one process builds it (the same rows in the same order, so IVF / PQ training, HNSW
insertion and the int8 calibration see exactly what they would have seen). Search results
then equal an index built in one process for every factory, ties included. The cost is the
build at every load (for a Flat index, a copy); ``EmbeddingIndex.load(sharded).save(other)``
writes the merged index once, as a single-file directory that loads without rebuilding.
FAISS ``IndexShards`` would skip the build for Flat, but an approximate index trained per
shard would not equal the one-process index, and its merge breaks ties in its own order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lightning_metric.retrieval.index.files import (
    EMBEDDINGS_FILE,
    FORMAT,
    HASH,
    IDS_FILE,
    LABELS_FILE,
    MANIFEST,
    PATHS_FILE,
    VERSION,
    IndexFormatError,
    _file_hashes,
    _jsonable,
    _load_npy,
    _read_manifest,
)

__all__ = [
    "ORDER_FILE",
    "SHARDS",
    "Shard",
    "read_shards",
    "shard_name",
    "write_manifest",
    "write_shard",
]

ORDER_FILE = "order.npy"
# Top manifest key listing the shards; its presence makes a directory sharded.
SHARDS = "shards"
_SHARD_FILES = (EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE, ORDER_FILE)


def shard_name(rank: int, world: int) -> str:
    """``shard-00001-of-00004``."""
    return f"shard-{rank:05d}-of-{world:05d}"


class Shard:
    """The rows of one rank: embeddings, ids, labels, optional paths and each row's
    one-process position."""

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray,
        labels: np.ndarray,
        order: np.ndarray,
        paths: list[str] | None,
    ) -> None:
        self.embeddings, self.ids, self.labels, self.order = embeddings, ids, labels, order
        self.paths = paths


def write_shard(folder: Path, shard: Shard, metric: str) -> None:
    """This rank's folder, files hashed from disk into its manifest."""
    folder.mkdir(parents=True)
    np.save(folder / EMBEDDINGS_FILE, np.ascontiguousarray(shard.embeddings, dtype=np.float32))
    np.save(folder / IDS_FILE, shard.ids.astype(np.int64))
    np.save(folder / LABELS_FILE, shard.labels.astype(np.int64))
    np.save(folder / ORDER_FILE, shard.order.astype(np.int64))
    listed = list(_SHARD_FILES)
    if shard.paths is not None:
        (folder / PATHS_FILE).write_text("".join(f"{p}\n" for p in shard.paths), encoding="utf-8")
        listed.append(PATHS_FILE)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "embedding_dim": int(shard.embeddings.shape[1]),
        "metric": metric,
        "count": len(shard.ids),
        "files": {name: name for name in listed},
        HASH: _file_hashes([folder / name for name in listed]),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_manifest(root: Path, world: int, settings: dict[str, Any]) -> None:
    """The top manifest, once every shard folder is complete in ``root``."""
    shards = []
    count = dim = None
    for rank in range(world):
        folder = root / shard_name(rank, world)
        shard_manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        count = (count or 0) + shard_manifest["count"]
        dim = shard_manifest["embedding_dim"]
        digest = _file_hashes([folder / MANIFEST])[MANIFEST]
        shards.append({"folder": folder.name, "count": shard_manifest["count"], HASH: digest})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": count,
        "embedding_dim": dim,
        SHARDS: shards,
        **_jsonable(settings),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_shards(root: Path, manifest: dict[str, Any], verify: bool) -> Shard:
    """Every shard of the sharded directory ``root``, checked and merged into one-process
    order; :class:`IndexFormatError` names the shard or file that is missing or disagrees."""
    where = str(root / MANIFEST)
    listed = manifest.get(SHARDS)
    if not isinstance(listed, list) or not listed:
        raise IndexFormatError(f"{where!r}: {SHARDS!r} must list the shard folders")
    parts = []
    for entry in listed:
        if not isinstance(entry, dict) or not {"folder", "count", HASH} <= set(entry):
            raise IndexFormatError(
                f"{where!r}: each shard entry needs 'folder', 'count' and {HASH!r}, got {entry!r}"
            )
        parts.append(_read_shard(root, entry, manifest, verify))
    n = sum(len(p.ids) for p in parts)
    if n != manifest["count"]:
        raise IndexFormatError(
            f"{where!r}: count {manifest['count']}, but the shards hold {n} rows"
        )
    order = np.concatenate([p.order for p in parts])
    rows = np.argsort(order, kind="stable")
    if not np.array_equal(order[rows], np.arange(n)):
        raise IndexFormatError(
            f"the shards' {ORDER_FILE} files do not number the {n} rows 0..{n - 1} once each "
            f"(shards from different runs in {str(root)!r}?)"
        )
    with_paths = [p.paths is not None for p in parts]
    if any(with_paths) and not all(with_paths):
        raise IndexFormatError(f"some shards in {str(root)!r} have {PATHS_FILE} and others not")
    paths = None
    if all(with_paths):
        every = [path for p in parts for path in p.paths or []]
        paths = [every[i] for i in rows.tolist()]
    return Shard(
        np.concatenate([p.embeddings for p in parts])[rows],
        np.concatenate([p.ids for p in parts])[rows],
        np.concatenate([p.labels for p in parts])[rows],
        np.arange(n),
        paths,
    )


def _read_shard(root: Path, entry: dict[str, Any], top: dict[str, Any], verify: bool) -> Shard:
    folder = root / str(entry["folder"])
    if not (folder / MANIFEST).is_file():
        raise IndexFormatError(
            f"missing shard {str(folder)!r} (listed in {str(root / MANIFEST)!r} with "
            f"{entry['count']} rows): copy the whole index directory, every shard folder with it"
        )
    if verify:
        digest = _file_hashes([folder / MANIFEST])[MANIFEST]
        if digest != entry[HASH]:
            raise IndexFormatError(
                f"{str(folder / MANIFEST)!r} changed after the index was saved (or comes from "
                f"another save): its {HASH} is {digest}, {str(root / MANIFEST)!r} recorded "
                f"{entry[HASH]}"
            )
    manifest = _read_manifest(folder / MANIFEST)
    n, dim = manifest["count"], manifest["embedding_dim"]
    if n != entry["count"] or dim != top["embedding_dim"] or manifest["metric"] != top["metric"]:
        raise IndexFormatError(
            f"{str(folder / MANIFEST)!r} says {n} rows of dimension {dim} ({manifest['metric']}), "
            f"but {str(root / MANIFEST)!r} expects {entry['count']} rows of dimension "
            f"{top['embedding_dim']} ({top['metric']})"
        )
    recorded = manifest.get(HASH, {})
    names = list(_SHARD_FILES) + ([PATHS_FILE] if PATHS_FILE in recorded else [])
    for name in names:
        if not (folder / name).is_file():
            raise IndexFormatError(f"missing {str(folder / name)!r} (listed in {MANIFEST})")
    if verify:
        found = _file_hashes([folder / name for name in names])
        for name in names:
            if found[name] != recorded.get(name):
                raise IndexFormatError(
                    f"{str(folder / name)!r} changed after it was saved (edited, truncated or "
                    f"copied from another save): its {HASH} is {found[name]}, but "
                    f"{str(folder / MANIFEST)!r} recorded {recorded.get(name)}"
                )
    paths = None
    if PATHS_FILE in names:
        paths = (folder / PATHS_FILE).read_text(encoding="utf-8").splitlines()
        if len(paths) != n:
            raise IndexFormatError(
                f"{str(folder / PATHS_FILE)!r} has {len(paths)} lines, expected {n}"
            )
    return Shard(
        _load_npy(folder / EMBEDDINGS_FILE, np.float32, (n, dim)),
        _load_npy(folder / IDS_FILE, np.int64, (n,)),
        _load_npy(folder / LABELS_FILE, np.int64, (n,)),
        _load_npy(folder / ORDER_FILE, np.int64, (n,)),
        paths,
    )
