"""EmbeddingIndex: a searchable directory of embeddings written by ``EmbeddingIndexWriter``.

The directory holds only FAISS and NumPy files plus JSON, all read without pickle:

    manifest.json    format, version, embedding size, metric, count, FAISS factory string and
                     search parameters (nprobe, efSearch), model / data description
    index.faiss      FAISS index built by ``faiss.index_factory(factory)`` ("Flat" = exact;
                     "HNSW32", "IVF1024,Flat", "IVF1024,PQ16", ... approximate), inner
                     product for cosine/ip, L2 for l2
    embeddings.npy   float32 [N, D], as the model produced them
                     (index.faiss holds them L2-normalised for the cosine metric)
    ids.npy          int64 [N], the item ids search returns (dataset index by default)
    labels.npy       int64 [N], class labels (-1 where unknown)
    paths.txt        optional, one source file per item (image-folder data sets)

The manifest records the SHA-256 of every other file (``"sha256"``: file name -> hex digest;
``sha256sum index.faiss`` prints the same), and :meth:`EmbeddingIndex.load` checks them all
before answering, so a file changed, truncated or copied from another save after it was
written raises :class:`IndexFormatError` naming it. The manifest cannot hash itself: its
``factory`` and ``faiss_index`` are checked against the structure of ``index.faiss``, and its
count, dimension and metric against every file. ``load(directory, verify=False)`` skips only
the hashes (reading every byte once more: about as long again as loading, see
``benchmarks/index.py``), for large indexes whose storage is trusted. Indexes saved before
hashes existed (format version 1) still load, with a warning, until saved again.

Example::

    index = EmbeddingIndex.load("outputs/digits_arcface/index")
    ids, scores = index.search(query_embeddings, k=5)
    approx = EmbeddingIndex(embeddings, factory="IVF1024,Flat", nprobe=16)  # trained on them
    index.add(new_embeddings, ids=new_ids)
    index.save()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.checks import (
    METRICS,
    check_factory_string,
    check_finite_rows,
    check_int,
    check_metric,
    check_top_k,
    check_training_size,
)
from lightning_metric.retrieval.knn import Metric, prepare, search_complete

__all__ = ["FORMAT", "VERSION", "EmbeddingIndex", "IndexFormatError", "SearchResult", "embed"]

FORMAT = "lightning-metric-index"
# 2: the manifest records a SHA-256 per file. 1 (no hashes) still loads, with a warning.
VERSION = 2
_UNHASHED_VERSION = 1
# Manifest key of the file hashes. SHA-256: with the SHA extensions of current x86 and ARM
# CPUs hashlib (OpenSSL) hashes ~1.3 GB/s per core, 3x blake2b (which wins only on CPUs
# without them), and ``sha256sum`` checks a file by hand.
HASH = "sha256"
# Bytes read per hash update: large enough to amortise the call, small enough to stay in cache.
_HASH_CHUNK = 1 << 22
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
PATHS_FILE = "paths.txt"
_INDEX_FILES = {MANIFEST, INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE, PATHS_FILE}
# Name part of the folder the previous index is moved to while a save swaps the new one in.
_PREVIOUS = ".previous-"
DEFAULT_FACTORY = "Flat"
# Manifest key of each search parameter and the FAISS ParameterSpace name it sets.
_SEARCH_PARAMS = {"nprobe": "nprobe", "ef_search": "efSearch"}
# Rows added to FAISS per call: bounds the temporary float32 copy and gives progress steps.
_ADD_CHUNK = 65536

ArrayLike = Union[Tensor, np.ndarray]


class IndexFormatError(ValueError):
    """The index directory is missing a file, or its files disagree with each other."""


class SearchResult(NamedTuple):
    """``ids [Q, k]`` of the neighbours (the stored ids, not row numbers) and their ``scores``:
    similarities for ``cosine``/``ip`` (descending), squared distances for ``l2`` (ascending)."""

    ids: np.ndarray
    scores: np.ndarray


class EmbeddingIndex:
    """Search over stored embeddings with a FAISS index (exact ``"Flat"`` by default, or
    any approximate index-factory string); items can be added.

    Build one from arrays with :meth:`from_embeddings`, or load what ``lightning-metric
    predict`` wrote with :meth:`load`. :meth:`search` takes embeddings ``[Q, D]``, or raw
    inputs when a ``model`` is attached (they are embedded with ``model(x)`` in eval mode).

    Args:
        embeddings: ``[N, D]`` floats.
        ids: ``[N]`` integer ids returned by search (default ``0..N-1``); must be unique.
        labels: ``[N]`` integer labels (default ``-1``).
        metric: ``"cosine"`` (rows are L2-normalised), ``"ip"`` or ``"l2"``.
        paths: optional source file per item.
        info: extra JSON-serialisable description stored in the manifest (model, data).
        model: optional module mapping inputs to ``[B, D]`` embeddings, for searching inputs.
        factory: a FAISS ``index_factory`` string: ``"Flat"`` (exact, the default),
            ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF1024,PQ16"``, ... Indexes that need
            training (IVF, PQ) are trained on ``embeddings`` (at least as many vectors as
            IVF lists, and 2**nbits = 256 for PQ). Approximate indexes may miss true
            neighbours; :meth:`search` returns id ``-1`` where fewer than ``k`` were found.
        nprobe: IVF lists visited per query (FAISS default 1); stored in the manifest.
        ef_search: HNSW search depth ``efSearch`` (FAISS default 16); stored in the manifest.
        train_size: train on a random sample (seed 0) of this many embeddings instead of all
            of them (FAISS itself samples at most 256 per IVF list / PQ centroid).

    Example: three stored items with ids 10, 11, 12; a query close to the first one finds
    it first, and a saved and loaded index finds the same:

    >>> import tempfile
    >>> import numpy as np
    >>> stored = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    >>> index = EmbeddingIndex(stored, ids=np.array([10, 11, 12]), labels=np.array([0, 1, 0]))
    >>> query = np.array([[0.9, 0.2]], dtype=np.float32)
    >>> index.search(query, k=2).ids.tolist()
    [[10, 11]]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = EmbeddingIndex.load(index.save(f"{tmp}/index"))
    >>> loaded
    EmbeddingIndex(count=3, dim=2, metric='cosine')
    >>> loaded.search(query, k=2).ids.tolist(), loaded.labels.tolist()
    ([[10, 11]], [0, 1, 0])
    """

    def __init__(
        self,
        embeddings: ArrayLike,
        ids: Optional[ArrayLike] = None,
        labels: Optional[ArrayLike] = None,
        metric: Metric = "cosine",
        paths: Optional[Sequence[str]] = None,
        info: Optional[Mapping[str, Any]] = None,
        model: Optional[nn.Module] = None,
        show_progress: bool = False,
        factory: str = DEFAULT_FACTORY,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        train_size: Optional[int] = None,
    ) -> None:
        check_metric(metric)
        self.metric: Metric = metric
        emb = _as_embeddings(embeddings, "embeddings", metric)
        self.dim = emb.shape[1]
        self.factory = check_factory_string(factory, self.dim)
        self.embeddings = np.empty((0, self.dim), dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.labels = np.empty(0, dtype=np.int64)
        self.paths: Optional[list[str]] = [] if paths is not None else None
        self.info: dict[str, Any] = dict(info or {})
        self.model = model
        self.directory: Optional[Path] = None
        self._index = _new_faiss_index(self.dim, metric, self.factory)
        self.search_params: dict[str, int] = {}
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)
        if not self._index.is_trained:
            if train_size is not None:
                train_size = check_int("train_size", train_size, minimum=1)
            _train(self._index, _prepared(emb, metric), self.factory, show_progress, train_size)
        self.add(emb, ids=ids, labels=labels, paths=paths, show_progress=show_progress)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_embeddings(
        cls,
        embeddings: ArrayLike,
        ids: Optional[ArrayLike] = None,
        labels: Optional[ArrayLike] = None,
        metric: Metric = "cosine",
        **kwargs: Any,
    ) -> EmbeddingIndex:
        return cls(embeddings, ids=ids, labels=labels, metric=metric, **kwargs)

    @classmethod
    def load(
        cls,
        directory: Union[str, os.PathLike[str]],
        model: Optional[nn.Module] = None,
        *,
        verify: bool = True,
    ) -> EmbeddingIndex:
        """Read an index directory, checking that its files agree with the manifest.

        Every file's SHA-256 must be the one the manifest recorded when it was saved
        (``verify=False`` skips only this, for large indexes on trusted storage: it reads
        every byte once more). Whatever ``verify``, the FAISS index must have the structure
        the manifest's ``factory`` builds and the count, dimension and metric it states.
        Raises :class:`IndexFormatError` naming the file that disagrees.
        """
        import faiss

        root = Path(directory)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(
                f"{str(root)!r} is a file; an index is the directory EmbeddingIndex.save wrote"
            )
        if not root.is_dir():
            left = sorted(root.parent.glob(f".{root.name}{_PREVIOUS}*/{MANIFEST}"))
            hint = (
                f"; an interrupted save left the previous index in {str(left[-1].parent)!r}: "
                "rename it to restore it"
                if left
                else ""
            )
            raise FileNotFoundError(f"index directory {str(root)!r} does not exist{hint}")
        manifest = _read_manifest(root / MANIFEST)
        if verify:
            _verify_hashes(root, manifest)
        n, dim, metric = manifest["count"], manifest["embedding_dim"], manifest["metric"]
        embeddings = _load_npy(root / EMBEDDINGS_FILE, np.float32, (n, dim))
        bad = ~np.isfinite(embeddings).all(axis=1)
        if bad.any():
            raise IndexFormatError(
                f"{str(root / EMBEDDINGS_FILE)!r} has {int(bad.sum())} of {n} rows with NaN or "
                f"Inf (first rows: {np.flatnonzero(bad)[:5].tolist()})"
            )
        ids = _load_npy(root / IDS_FILE, np.int64, (n,))
        labels = _load_npy(root / LABELS_FILE, np.int64, (n,))
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            raise IndexFormatError(f"missing FAISS index file {str(index_path)!r}")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            raise IndexFormatError(
                f"cannot read FAISS index {str(index_path)!r} (corrupt or not a FAISS file): {err}"
            ) from err
        factory = manifest.get("factory", DEFAULT_FACTORY)  # older indexes: flat
        params = manifest.get("search_params", {})
        if (
            not isinstance(factory, str)
            or not isinstance(params, dict)
            or not set(params) <= set(_SEARCH_PARAMS)
        ):
            raise IndexFormatError(
                f"{str(root / MANIFEST)!r}: 'factory' must be a string and 'search_params' a "
                f"mapping with keys among {sorted(_SEARCH_PARAMS)}, got {factory!r} and {params!r}"
            )
        expected_type = _faiss_metric(metric)
        if index.d != dim or index.ntotal != n or index.metric_type != expected_type:
            raise IndexFormatError(
                f"{str(index_path)!r} holds {index.ntotal} vectors of dimension {index.d} "
                f"(FAISS metric type {index.metric_type}), but {MANIFEST} says {n} vectors of "
                f"dimension {dim} with metric {metric!r} (FAISS metric type {expected_type})"
            )
        _check_structure(index, factory, dim, metric, manifest.get("faiss_index"), index_path)
        if _lossless(factory):
            _check_same_vectors(index, embeddings, metric, index_path)
        paths = None
        if PATHS_FILE in manifest.get("files", {}).values() and not (root / PATHS_FILE).is_file():
            raise IndexFormatError(f"missing {str(root / PATHS_FILE)!r} (listed in {MANIFEST})")
        if (root / PATHS_FILE).is_file():
            paths = (root / PATHS_FILE).read_text(encoding="utf-8").splitlines()
            if len(paths) != n:
                raise IndexFormatError(
                    f"{str(root / PATHS_FILE)!r} has {len(paths)} lines, expected {n} (count in "
                    f"{MANIFEST})"
                )
        self = cls.__new__(cls)
        self.metric = metric
        self.dim = dim
        self.embeddings = embeddings
        self.ids = ids
        self.labels = labels
        self.paths = paths
        self.info = dict(manifest.get("info", {}))
        self.model = None
        self.directory = root
        self._index = index
        self.factory = factory
        self.search_params = {}
        self.set_search_params(**params)
        self._check_unique_ids(ids)
        if model is not None:
            self.attach_model(model)
        return self

    def attach_model(self, model: nn.Module) -> None:
        """Use ``model`` to embed raw inputs passed to :meth:`search`."""
        declared = getattr(model, "embedding_dim", None)
        if declared is not None and int(declared) != self.dim:
            raise ValueError(
                f"the model produces {declared}-d embeddings but the index holds {self.dim}-d "
                "embeddings; load the checkpoint the index was built with"
            )
        self.model = model

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        inputs: Optional[bool] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> SearchResult:
        """The ``k`` nearest stored items of each query.

        ``queries`` are embeddings ``[Q, D]``, or inputs for the attached model. With a model
        attached, anything not shaped ``[Q, D]`` is treated as inputs; pass ``inputs=True``
        to force embedding (e.g. 2-D tabular inputs of width ``D``) or ``inputs=False`` to
        forbid it.

        ``nprobe`` (IVF) and ``ef_search`` (HNSW) override the stored search parameters for
        this call. An approximate index returns id ``-1`` (score ``-inf``, ``+inf`` for
        ``l2``) where it found fewer than ``k`` items (raise ``nprobe``).
        """
        k = check_top_k(k, len(self), "indexed items")
        q = _prepared(self._query_embeddings(queries, inputs), self.metric)
        if self.factory == DEFAULT_FACTORY and nprobe is None and ef_search is None:
            scores, rows = search_complete(
                self._index.search, q, len(self), int(k), descending=self.metric != "l2"
            )
            return SearchResult(self.ids[rows.numpy()], scores.numpy())
        stored = dict(self.search_params)
        try:
            self.set_search_params(nprobe=nprobe, ef_search=ef_search)
            raw_scores, raw_rows = self._index.search(q, int(k))
        finally:
            self.search_params = {}
            _reset_search_params(self._index, set(stored) | _given(nprobe, ef_search))
            self.set_search_params(**stored)
        missing = raw_rows < 0
        ids = np.where(missing, -1, self.ids[np.where(missing, 0, raw_rows)])
        worst = np.inf if self.metric == "l2" else -np.inf
        return SearchResult(ids, np.where(missing, worst, raw_scores).astype(np.float32))

    def set_search_params(
        self, nprobe: Optional[int] = None, ef_search: Optional[int] = None
    ) -> None:
        """Set the search parameters kept with the index (and written to its manifest):
        ``nprobe`` for IVF indexes, ``ef_search`` (FAISS ``efSearch``) for HNSW."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is None:
                continue
            value = check_int(name, value, minimum=1)
            _set_faiss_param(self._index, name, value, self.factory)
            self.search_params[name] = value

    def _query_embeddings(self, queries: Any, inputs: Optional[bool]) -> np.ndarray:
        looks_like_embeddings = (
            isinstance(queries, Tensor | np.ndarray)
            and queries.ndim == 2
            and queries.shape[1] == self.dim
        )
        if inputs is None:
            inputs = self.model is not None and not looks_like_embeddings
            shape = tuple(getattr(queries, "shape", ()))
            if self.model is None and len(shape) != 2:
                raise ValueError(
                    f"queries must be embeddings [count, {self.dim}], got "
                    f"{type(queries).__name__} of shape {shape}; searching raw inputs needs a "
                    "model: EmbeddingIndex.load(dir, model=...) or index.attach_model(model)"
                )
        if inputs:
            if self.model is None:
                raise ValueError(
                    "searching raw inputs needs a model: EmbeddingIndex.load(dir, model=...) "
                    "or index.attach_model(model)"
                )
            queries = embed(self.model, queries)
        return _as_embeddings(queries, "queries", self.metric, dim=self.dim)

    # ------------------------------------------------------------------ updates

    def add(
        self,
        embeddings: ArrayLike,
        ids: Optional[ArrayLike] = None,
        labels: Optional[ArrayLike] = None,
        paths: Optional[Sequence[str]] = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Append items; returns their ids (default: continuing after the largest id)."""
        emb = _as_embeddings(embeddings, "embeddings", self.metric, dim=self.dim)
        n = emb.shape[0]
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self.ids) else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = _as_int_vector(ids, "ids", n)
            if (new_ids == -1).any():
                raise ValueError(
                    f"ids must not be -1 (row {int(np.flatnonzero(new_ids == -1)[0])}): search "
                    "returns -1 where an approximate index found fewer than k items"
                )
        new_labels = (
            np.full(n, -1, dtype=np.int64)
            if labels is None
            else _as_int_vector(labels, "labels", n)
        )
        self._check_unique_ids(np.concatenate([self.ids, new_ids]))
        if (self.paths is None) != (paths is None) and len(self.ids):
            raise ValueError(
                "this index "
                + ("stores" if self.paths is not None else "does not store")
                + " a path per item; pass paths for all additions or for none"
            )
        if paths is not None:
            if len(paths) != n:
                raise ValueError(f"paths must have one entry per embedding ({n}), got {len(paths)}")
            bad = [p for p in paths if "\n" in p or "\r" in p]
            if bad:
                raise ValueError(f"paths must not contain line breaks, got {bad[0]!r}")
        _add_in_chunks(self._index, _prepared(emb, self.metric), show_progress)
        self.embeddings = np.concatenate([self.embeddings, emb])
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, new_labels])
        if paths is not None:
            self.paths = [*(self.paths or []), *paths]
        return new_ids

    def save(self, directory: Union[str, os.PathLike[str], None] = None) -> Path:
        """Write the directory (default: where it was loaded from).

        The files are written to a temporary folder beside ``directory`` and swapped in by
        renames once complete, so an interrupted save leaves the previous index loadable
        (and no half-written one). Other files already in ``directory`` are kept.
        """
        if directory is None:
            if self.directory is None:
                raise ValueError("this index was not loaded from a directory; pass save(directory)")
            directory = self.directory
        root = Path(directory)
        if root.is_symlink():
            root = root.resolve()  # swap the folder it points to, keep the link
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{str(root)!r} exists and is not a directory")
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.saving-"))
        try:
            self._write_files(staging)
            _swap_in(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.directory = root
        return root

    def _write_files(self, root: Path) -> None:
        import faiss

        np.save(root / EMBEDDINGS_FILE, self.embeddings)
        np.save(root / IDS_FILE, self.ids)
        np.save(root / LABELS_FILE, self.labels)
        faiss.write_index(self._index, str(root / INDEX_FILE))
        if self.paths is not None:
            text = "".join(f"{p}\n" for p in self.paths)
            (root / PATHS_FILE).write_text(text, encoding="utf-8")
        listed = [INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE]
        listed += [PATHS_FILE] if self.paths is not None else []
        # Hashed from disk, so the manifest vouches for the bytes actually written.
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "embedding_dim": self.dim,
            "metric": self.metric,
            "count": len(self),
            "faiss_index": type(self._index).__name__,
            "factory": self.factory,
            "search_params": dict(self.search_params),
            "files": {
                "index": INDEX_FILE,
                "embeddings": EMBEDDINGS_FILE,
                "ids": IDS_FILE,
                "labels": LABELS_FILE,
                **({"paths": PATHS_FILE} if self.paths is not None else {}),
            },
            HASH: _file_hashes([root / name for name in listed]),
            "info": _jsonable(self.info),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (root / MANIFEST).write_text(text, encoding="utf-8")

    def _check_unique_ids(self, ids: np.ndarray) -> None:
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dupes = uniq[counts > 1][:5].tolist()
            raise ValueError(f"ids must be unique; these occur more than once: {dupes}")

    def __repr__(self) -> str:
        extra = "" if self.factory == DEFAULT_FACTORY else f", factory={self.factory!r}"
        return f"EmbeddingIndex(count={len(self)}, dim={self.dim}, metric={self.metric!r}{extra})"


# ---------------------------------------------------------------------- helpers


@torch.no_grad()
def embed(model: nn.Module, x: Any, batch_size: Optional[int] = None) -> Tensor:
    """``model(x)`` in eval mode as float32 on CPU, ``batch_size`` rows per call (all at once
    by default); ``x`` is moved to the model's device and the model's mode is restored."""
    x = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    param = next(model.parameters(), None)
    if isinstance(x, Tensor) and param is not None:
        x = x.to(param.device)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=1)
    chunks = (
        [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        if isinstance(x, Tensor) and batch_size is not None
        else [x]
    )
    was_training = model.training
    model.eval()
    try:
        outputs = [model(chunk) for chunk in chunks]
    finally:
        model.train(was_training)
    for out in outputs:
        if not isinstance(out, Tensor):
            raise ValueError(
                f"the model must return an embeddings tensor [batch, dim], got {type(out).__name__}"
            )
    return torch.cat([out.detach().float().cpu() for out in outputs])


def _new_faiss_index(dim: int, metric: str, factory: str = DEFAULT_FACTORY) -> Any:
    import faiss

    if factory == DEFAULT_FACTORY:
        return faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    try:
        index = faiss.index_factory(dim, factory, _faiss_metric(metric))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].split(": ")[-1]
        raise ValueError(
            f"`factory` {factory!r} is not a FAISS index-factory string FAISS can build for "
            f"{dim}-d vectors ({reason}); use e.g. 'Flat', 'HNSW32', 'IVF1024,Flat' or "
            "'IVF1024,PQ16'"
        ) from err
    _check_usable(index, factory)
    return index


# Sizes FAISS accepts in a factory string but cannot work with: IVF0 fails in search, HNSW0
# and HNSW1 abort the process while adding, SQ0 / PQ8x0 store nothing and answer nonsense.
_LEAST = {
    "nlist": (1, "IVF lists"),
    "HNSW M": (2, "HNSW links per vector (M)"),
    "code_size": (1, "bytes per stored vector"),
}


def _check_usable(index: Any, factory: str) -> None:
    for key, value in _structure(index).items():
        for size, (least, what) in _LEAST.items():
            if key.endswith(f" {size}") and value < least:
                raise ValueError(
                    f"`factory` {factory!r} gives {value} {what}, FAISS needs at least "
                    f"{least}; use e.g. 'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ16', 'SQ8'"
                )


def _training_size(index: Any) -> int:
    """Fewest training vectors ``index`` accepts: IVF lists, PQ / SQ codebook sizes."""
    import faiss

    need = 1
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        need = max(need, int(ivf.nlist))
    for part in (index, ivf):
        pq = getattr(faiss.downcast_index(part), "pq", None) if part is not None else None
        if pq is not None:
            need = max(need, int(pq.ksub))
    return need


def _skip_polysemous_training(index: Any) -> None:
    """The factory turns on polysemous training for PQ (minutes: annealing over the codebook
    order). It only serves Hamming-threshold filtering (``polysemous_ht``), which search
    leaves off, so the neighbours are the same without it."""
    import faiss

    parts = [index]
    with contextlib.suppress(RuntimeError):
        parts.append(faiss.extract_index_ivf(index))
    for part in parts:
        part = faiss.downcast_index(part)
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def _train(
    index: Any, emb: np.ndarray, factory: str, show_progress: bool, size: Optional[int] = None
) -> None:
    if size is not None and size < emb.shape[0]:
        rows = np.random.default_rng(0).choice(emb.shape[0], size, replace=False)
        emb = emb[np.sort(rows)]
    check_training_size(factory, emb.shape[0], _training_size(index))
    _skip_polysemous_training(index)
    if show_progress and emb.shape[0] > _ADD_CHUNK:
        from rich.console import Console

        with Console(stderr=True).status(f"training FAISS index {factory!r} on {len(emb)} vectors"):
            index.train(emb)
    else:
        index.train(emb)


# FAISS's own values, put back after a search that overrode them.
_FAISS_DEFAULTS = {"nprobe": 1, "ef_search": 16}


def _set_faiss_param(index: Any, name: str, value: int, factory: str) -> None:
    import faiss

    try:
        faiss.ParameterSpace().set_index_parameter(index, _SEARCH_PARAMS[name], value)
    except RuntimeError as err:
        kind = "IVF indexes (e.g. 'IVF1024,Flat')" if name == "nprobe" else "HNSW indexes"
        raise ValueError(
            f"`{name}`={value} applies to {kind}; this index is {factory!r}, which has no "
            f"{name}: leave it unset"
        ) from err


def _reset_search_params(index: Any, names: set[str]) -> None:
    import faiss

    for name in names:
        # A parameter this index does not have (a refused override) is left alone.
        with contextlib.suppress(RuntimeError):
            faiss.ParameterSpace().set_index_parameter(
                index, _SEARCH_PARAMS[name], _FAISS_DEFAULTS[name]
            )


def _given(nprobe: Optional[int], ef_search: Optional[int]) -> set[str]:
    return {n for n, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}


_LOSSLESS_PART = re.compile(r"(IVF\d+(_HNSW\d+)?|HNSW\d+|Flat|IDMap2?)")


def _lossless(factory: str) -> bool:
    """Whether the index stores the vectors unchanged (so they can be compared on load)."""
    return all(_LOSSLESS_PART.fullmatch(p.strip()) for p in factory.split(","))


def _faiss_metric(metric: str) -> int:
    import faiss

    return int(faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


def _add_in_chunks(index: Any, emb: np.ndarray, show_progress: bool) -> None:
    starts = range(0, emb.shape[0], _ADD_CHUNK)
    steps: Iterable[int] = starts
    if show_progress and emb.shape[0] > _ADD_CHUNK:
        from rich.progress import track

        steps = track(starts, description="building FAISS index", total=len(starts))
    for start in steps:
        index.add(emb[start : start + _ADD_CHUNK])


def _as_embeddings(x: Any, name: str, metric: str, dim: Optional[int] = None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [count, dim], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {x.shape[1]}, but the index holds {dim}-d embeddings"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite_rows(name, torch.from_numpy(x))
    return x


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    # The very normalisation retrieval.knn applies, so both find the same neighbours.
    return prepare(torch.from_numpy(x), metric).numpy()  # type: ignore[arg-type]


def _as_int_vector(x: ArrayLike, name: str, n: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one per embedding), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


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


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


def _file_hashes(paths: Sequence[Path]) -> dict[str, str]:
    """``{file name: hex digest}``; hashlib releases the GIL while hashing, so the large
    files (index, embeddings) are read and hashed in parallel."""
    workers = max(1, min(len(paths), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((p.name for p in paths), pool.map(_file_hash, paths), strict=True))


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


# Children an index keeps its vectors or coarse assignment in, by FAISS attribute name.
_PARTS = ("quantizer", "storage", "index", "base_index", "refine_index")


# Classes FAISS writes as (or reads back as) another: IndexFlatIP / IndexFlatL2 are IndexFlat
# with a metric (compared apart), a Refine(Flat) reads back as an IndexRefineFlat, a trained
# OPQ rotation as a LinearTransform.
_SAME_CLASS = {
    "IndexFlatIP": "IndexFlat",
    "IndexFlatL2": "IndexFlat",
    "IndexRefineFlat": "IndexRefine",
    "OPQMatrix": "LinearTransform",
}


def _kind(name: str) -> str:
    return _SAME_CLASS.get(name, name)


def _structure(index: Any, where: str = "index") -> dict[str, Any]:
    """What a factory string decides about ``index``, part by part: classes, dimension,
    metric, IVF lists, PQ / SQ / HNSW sizes, transforms, bytes per code."""
    import faiss

    index = faiss.downcast_index(index)
    out: dict[str, Any] = {
        f"{where} class": _kind(type(index).__name__),
        f"{where} d": int(index.d),
        f"{where} metric": int(index.metric_type),
    }
    for attr in ("nlist", "code_size", "by_residual"):
        value = getattr(index, attr, None)
        if isinstance(value, bool | int):
            out[f"{where} {attr}"] = value
    pq = getattr(index, "pq", None)
    if pq is not None:
        out[f"{where} PQ M"], out[f"{where} PQ nbits"] = int(pq.M), int(pq.nbits)
    sq = getattr(index, "sq", None)
    if sq is not None:
        out[f"{where} SQ qtype"] = int(sq.qtype)
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        # M: links per vector above level 0; FAISS sets no upper levels for M < 2.
        levels = hnsw.cum_nneighbor_per_level.size()
        out[f"{where} HNSW M"] = int(hnsw.nb_neighbors(1)) if levels > 2 else 0
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain  # a SWIG std::vector, whatever the stubs say
        for i in range(chain.size()):
            step = faiss.downcast_VectorTransform(chain.at(i))
            out[f"{where} transform {i}"] = (_kind(type(step).__name__), step.d_in, step.d_out)
    for part in _PARTS:
        child = getattr(index, part, None)
        if child is not None and hasattr(child, "ntotal"):
            out.update(_structure(child, f"{where}.{part}"))
    return out


def _check_structure(
    index: Any, factory: str, dim: int, metric: str, recorded_type: Any, path: Path
) -> None:
    """``index.faiss`` must be what the manifest's factory string builds: the manifest has
    no hash of its own, so an edited factory (or ``faiss_index``) is caught here."""
    manifest = path.parent / MANIFEST
    try:
        # Kept in a name: the wrapper _structure downcasts to does not own the index.
        built = _new_faiss_index(dim, metric, factory)
        expected = _structure(built)
    except ValueError as err:
        raise IndexFormatError(f"{str(manifest)!r}: factory {factory!r}: {err}") from err
    found = _structure(index)
    for key in dict.fromkeys([*expected, *found]):
        if expected.get(key) != found.get(key):
            raise IndexFormatError(
                f"{str(path)!r} is not the index the factory {factory!r} in {MANIFEST} builds: "
                f"{key} is {found.get(key)!r} in the file, {expected.get(key)!r} from the "
                "factory (the manifest was edited or the file comes from another index)"
            )
    if recorded_type is not None and (
        not isinstance(recorded_type, str) or _kind(recorded_type) != found["index class"]
    ):
        raise IndexFormatError(
            f"{str(manifest)!r} says 'faiss_index' {recorded_type!r}, but {str(path)!r} holds "
            f"a {type(index).__name__}"
        )


def _load_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"missing {str(path)!r}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise IndexFormatError(f"cannot read {str(path)!r} as a NumPy array: {err}") from err
    if arr.shape != shape or arr.dtype != dtype:
        raise IndexFormatError(
            f"{str(path)!r} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape} "
            f"(from {MANIFEST})"
        )
    return arr


def _check_same_vectors(index: Any, embeddings: np.ndarray, metric: str, path: Path) -> None:
    """A few rows of the FAISS file must be the stored embeddings (catches files from
    different saves mixed together)."""
    n = embeddings.shape[0]
    if n == 0:
        return
    rows = sorted({0, n // 2, n - 1})
    try:
        stored = np.stack([index.reconstruct(i) for i in rows])
    except RuntimeError:  # index types that cannot reconstruct vectors: nothing to compare
        return
    expected = _prepared(np.ascontiguousarray(embeddings[rows]), metric)
    if not np.allclose(stored, expected, rtol=1e-5, atol=1e-6):
        raise IndexFormatError(
            f"{str(path)!r} holds other vectors than {EMBEDDINGS_FILE} (compared rows {rows}): "
            "the files come from different saves"
        )


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
