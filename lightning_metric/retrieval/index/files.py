"""The index directory's files: names, the manifest (read and checked), content hashes,
arrays read without pickle, and the renames that swap a finished save in."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_metric.checks import METRICS
from lightning_metric.provenance import file_sha256

FORMAT = "lightning-metric-index"
# 2: the manifest records a SHA-256 per file. 1 (no hashes) still loads, with a warning.
VERSION = 2
_UNHASHED_VERSION = 1
# Manifest key of the file hashes. SHA-256: with the SHA extensions of current x86 and ARM
# CPUs hashlib (OpenSSL) hashes ~1.3 GB/s per core, 3x blake2b (which wins only on CPUs
# without them), and ``sha256sum`` checks a file by hand.
HASH = "sha256"
# Bytes read per hash update: large enough to amortise the call, small enough to stay in cache.
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
PATHS_FILE = "paths.txt"
_INDEX_FILES = {MANIFEST, INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE, PATHS_FILE}
# Name part of the folder the previous index is moved to while a save swaps the new one in.
_PREVIOUS = ".previous-"


class IndexFormatError(ValueError):
    """The index directory is missing a file, or its files disagree with each other."""


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise IndexFormatError(
            f"missing {str(path)!r}: not an index directory written by EmbeddingIndex.save / "
            "EmbeddingIndexWriter"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{str(path)!r} is not a {FORMAT} manifest")
    if manifest.get("version") not in (VERSION, _UNHASHED_VERSION):
        raise IndexFormatError(
            f"{str(path)!r} has version {manifest.get('version')!r}; this release reads "
            f"versions {_UNHASHED_VERSION} and {VERSION}"
        )
    for key, kind in (("count", int), ("embedding_dim", int), ("metric", str)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise IndexFormatError(f"{str(path)!r}: {key!r} missing or not {kind.__name__}")
    for key, least in (("count", 0), ("embedding_dim", 1)):
        if manifest[key] < least:
            raise IndexFormatError(f"{str(path)!r}: {key!r} is {manifest[key]}, must be >= {least}")
    if not isinstance(manifest.get("files", {}), dict):
        raise IndexFormatError(f"{str(path)!r}: 'files' must be a mapping")
    if manifest["metric"] not in METRICS:
        raise IndexFormatError(
            f"{str(path)!r}: metric {manifest['metric']!r} is not one of {METRICS}"
        )
    return manifest


def _file_hashes(paths: Sequence[Path]) -> dict[str, str]:
    """``{file name: hex digest}``; hashlib releases the GIL while hashing, so the large
    files (index, embeddings) are read and hashed in parallel."""
    workers = max(1, min(len(paths), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_sha256, paths), strict=True))


def _verify_hashes(root: Path, manifest: dict[str, Any]) -> None:
    """Every index file must hash to what the manifest recorded when it was saved."""
    path = root / MANIFEST
    if manifest["version"] == _UNHASHED_VERSION:
        # Loaded, not refused: refusing would strand every index the previous release
        # wrote (rebuilding means predicting over the data again), and its files cannot be
        # verified whether it is refused or not; a save adds the hashes.
        warnings.warn(
            f"{str(path)!r} is format version {_UNHASHED_VERSION}, written before indexes "
            "recorded content hashes: a file changed since it was saved cannot be detected "
            "(only shapes and a few rows are compared). Save it again to record them: "
            "EmbeddingIndex.load(directory).save(); load(..., verify=False) skips this check "
            "and this warning",
            UserWarning,
            stacklevel=3,
        )
        return
    recorded = manifest.get(HASH)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise IndexFormatError(
            f"{str(path)!r}: {HASH!r} must map each index file to its hex digest, got {recorded!r}"
        )
    expected = {INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE}
    if PATHS_FILE in manifest.get("files", {}).values() or (root / PATHS_FILE).exists():
        expected.add(PATHS_FILE)
    for name in sorted(expected | set(recorded)):
        if name not in expected | {PATHS_FILE}:
            raise IndexFormatError(
                f"{str(path)!r} records a {HASH} for {name!r}, which is not an index file "
                f"(expected {sorted(expected)})"
            )
        if not (root / name).is_file():
            raise IndexFormatError(f"missing {str(root / name)!r} (listed in {MANIFEST})")
        if name not in recorded:
            raise IndexFormatError(
                f"{str(root / name)!r} has no {HASH} in {MANIFEST} (it records "
                f"{sorted(recorded)}): the file was not written by the save that wrote the "
                "manifest"
            )
    found = _file_hashes([root / name for name in sorted(recorded)])
    for name, digest in found.items():
        if digest != recorded[name]:
            raise IndexFormatError(
                f"{str(root / name)!r} changed after it was saved (edited, truncated or copied "
                f"from another save): its {HASH} is {digest}, but {MANIFEST} recorded "
                f"{recorded[name]}. If the change was intended, load(..., verify=False) and "
                "save() to record the new hash"
            )


def _load_npy(path: Path, dtype: Any, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"missing {str(path)!r}")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:
        raise IndexFormatError(f"cannot read {str(path)!r} as a NumPy array: {err}") from err
    if arr.shape != shape or arr.dtype != dtype:
        raise IndexFormatError(
            f"{str(path)!r} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape} "
            f"(from {MANIFEST})"
        )
    return arr


def _swap_in(staging: Path, root: Path) -> None:
    """Replace ``root`` by the complete ``staging`` folder; other files in ``root`` move over."""
    if not root.exists():
        os.rename(staging, root)
        return
    # Two renames: between them ``root`` is missing and the old index sits complete in
    # ``previous`` (load points there if a crash leaves it so).
    previous = root.parent / f".{root.name}{_PREVIOUS}{uuid.uuid4().hex[:8]}"
    os.rename(root, previous)
    try:
        os.rename(staging, root)
    except BaseException:
        os.rename(previous, root)
        raise
    for entry in previous.iterdir():
        if entry.name not in _INDEX_FILES:
            os.rename(entry, root / entry.name)
    shutil.rmtree(previous)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)
