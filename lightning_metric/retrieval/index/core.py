"""EmbeddingIndex: search over stored embeddings; :mod:`.files` is the directory format,
:mod:`.backend` the FAISS index."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.checks import (
    check_factory_string,
    check_finite_rows,
    check_int,
    check_metric,
    check_top_k,
)
from lightning_metric.retrieval.index.backend import (
    _SEARCH_PARAMS,
    DEFAULT_FACTORY,
    _add_in_chunks,
    _check_same_vectors,
    _check_structure,
    _faiss_metric,
    _given,
    _lossless,
    _prepared,
    _reset_search_params,
    _set_faiss_param,
    _train,
)
from lightning_metric.retrieval.index.compact import (
    binary_codes,
    check_index_options,
    check_loaded,
    new_code_index,
    search_binary,
    set_calibration,
)
from lightning_metric.retrieval.index.embedding import embed
from lightning_metric.retrieval.index.files import (
    _PREVIOUS,
    EMBEDDINGS_FILE,
    FORMAT,
    HASH,
    IDS_FILE,
    INDEX_FILE,
    LABELS_FILE,
    MANIFEST,
    PATHS_FILE,
    VERSION,
    IndexFormatError,
    _file_hashes,
    _jsonable,
    _load_npy,
    _read_manifest,
    _swap_in,
    _verify_hashes,
)
from lightning_metric.retrieval.index.shards import SHARDS, read_shards
from lightning_metric.retrieval.knn import (
    Similarity,
    faiss_threads_for,
    search_complete,
    single_threaded_bookkeeping,
)
from lightning_metric.retrieval.quantization import Calibration, calibrate, prefix, rescore

__all__ = ["EmbeddingIndex", "SearchResult"]

ArrayLike = Union[Tensor, np.ndarray]
IndexPrecision = Literal["float32", "int8", "binary"]


class SearchResult(NamedTuple):
    """``ids [Q, k]`` of the neighbours (the stored ids, not row numbers) and their ``scores``:
    similarities for ``cosine``/``ip`` (descending), squared distances for ``l2`` (ascending);
    Hamming distances (ascending) for a binary index without re-scoring."""

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
        dim: index the Matryoshka prefix of this size (:func:`~lightning_metric.retrieval.
            quantization.prefix`: the first ``dim`` coordinates, L2-normalised) instead of the
            whole vector; queries are cut the same way (they may have the full dimension or
            ``dim``). ``embeddings.npy`` keeps the full vectors.
        precision: ``"float32"``; ``"int8"``: FAISS ``IndexScalarQuantizer`` codes (factory
            ``"SQ8"``, the default for int8, or ``"IVF<n>,SQ8"``) with ranges set to the
            calibration of the indexed vectors (:func:`~lightning_metric.retrieval.
            quantization.calibrate`), stored in the manifest and used for every later
            :meth:`add`, never taken from queries; ``"binary"``: sign bits in an
            ``IndexBinaryFlat``, ranked by Hamming distance.
        rescore_multiplier: int8 / binary flat indexes: the ``rescore_multiplier * k`` best
            items by the codes are re-ranked by the float vectors, read from
            ``embeddings.npy`` (memory-mapped when a binary index is loaded, so only the
            candidates' rows are read). Refused for float32 (nothing to re-rank).

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
        metric: Similarity = "cosine",
        paths: Optional[Sequence[str]] = None,
        info: Optional[Mapping[str, Any]] = None,
        model: Optional[nn.Module] = None,
        show_progress: bool = False,
        factory: str = DEFAULT_FACTORY,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        train_size: Optional[int] = None,
        dim: Optional[int] = None,
        precision: IndexPrecision = "float32",
        rescore_multiplier: Optional[int] = None,
    ) -> None:
        check_metric(metric)
        self.metric: Similarity = metric
        emb = _as_embeddings(embeddings, "embeddings", metric)
        self.dim = emb.shape[1]
        self.precision, self.prefix_dim, self.rescore_multiplier, factory = check_index_options(
            precision, dim, self.dim, rescore_multiplier, check_factory_string(factory)
        )
        self.factory = check_factory_string(factory, self.index_dim)
        self.calibration: Optional[Calibration] = None
        if self.precision == "int8":
            if emb.shape[0] == 0:
                raise ValueError(
                    "precision='int8' takes its ranges from the indexed embeddings, but none "
                    "were given: build the index from at least one embedding (the calibration "
                    "set), or use precision='float32' / 'binary'"
                )
            self.calibration = calibrate(torch.from_numpy(self._indexed(emb)))
        self.embeddings = np.empty((0, self.dim), dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.labels = np.empty(0, dtype=np.int64)
        self.paths: Optional[list[str]] = [] if paths is not None else None
        self.info: dict[str, Any] = dict(info or {})
        self.model = model
        self.directory: Optional[Path] = None
        self._index = new_code_index(self.precision, self.index_dim, metric, self.factory)
        self.search_params: dict[str, int] = {}
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)
        if self.calibration is not None and self.factory == "SQ8":
            set_calibration(self._index, self.calibration)
        if not self._index.is_trained:
            if train_size is not None:
                train_size = check_int("train_size", train_size, minimum=1)
            _train(self._index, self._indexed(emb), self.factory, show_progress, train_size)
            if self.calibration is not None:  # IVF: FAISS trained the lists; ranges are ours
                set_calibration(self._index, self.calibration)
        self.add(emb, ids=ids, labels=labels, paths=paths, show_progress=show_progress)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_embeddings(
        cls,
        embeddings: ArrayLike,
        ids: Optional[ArrayLike] = None,
        labels: Optional[ArrayLike] = None,
        metric: Similarity = "cosine",
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
        if SHARDS in manifest:
            return cls._from_shards(root, manifest, model, verify)
        if verify:
            _verify_hashes(root, manifest)
        n, dim, metric = manifest["count"], manifest["embedding_dim"], manifest["metric"]
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
        # Older indexes have none of these keys: float32, the full dimension.
        try:
            precision, prefix_dim, multiplier, factory = check_index_options(
                manifest.get("precision", "float32"),
                manifest.get("dim"),
                dim,
                manifest.get("rescore_multiplier"),
                check_factory_string(factory),
            )
            raw_calibration = manifest.get("calibration")
            calibration = (
                None if raw_calibration is None else Calibration.from_dict(raw_calibration)
            )
        except (TypeError, ValueError) as err:
            raise IndexFormatError(f"{str(root / MANIFEST)!r}: {err}") from err
        indexed_dim = prefix_dim or dim
        if calibration is not None and (precision != "int8" or calibration.dim != indexed_dim):
            raise IndexFormatError(
                f"{str(root / MANIFEST)!r}: a calibration of {calibration.dim} dimensions does "
                f"not fit a {precision} index of {indexed_dim}-d vectors"
            )
        # A binary index searches its codes in memory; the float rows are read only for the
        # candidates it re-scores, so they stay on disk (memory-mapped).
        embeddings = _load_npy(
            root / EMBEDDINGS_FILE, np.float32, (n, dim), mmap=precision == "binary"
        )
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
            read = faiss.read_index_binary if precision == "binary" else faiss.read_index
            index: Any = read(str(index_path))
        except RuntimeError as err:
            raise IndexFormatError(
                f"cannot read FAISS index {str(index_path)!r} (corrupt or not a FAISS file): {err}"
            ) from err
        expected_type = _faiss_metric(metric)
        expected_d = 8 * -(-indexed_dim // 8) if precision == "binary" else indexed_dim
        found_type = expected_type if precision == "binary" else index.metric_type
        if index.d != expected_d or index.ntotal != n or found_type != expected_type:
            raise IndexFormatError(
                f"{str(index_path)!r} holds {index.ntotal} vectors of dimension {index.d} "
                f"(FAISS metric type {found_type}), but {MANIFEST} says {n} vectors of "
                f"dimension {expected_d} ({precision}) with metric {metric!r} (FAISS metric type "
                f"{expected_type})"
            )
        self = cls.__new__(cls)
        self.metric = metric
        self.dim = dim
        self.prefix_dim = prefix_dim
        self.precision = precision
        self.rescore_multiplier = multiplier
        self.calibration = calibration
        self.embeddings = embeddings
        if precision != "binary":

            def build(d: int, m: str, f: str) -> Any:
                return new_code_index(precision, d, m, f)

            recorded = manifest.get("faiss_index")
            _check_structure(index, factory, indexed_dim, metric, recorded, index_path, build)
        if precision == "float32" and _lossless(factory):
            full = embeddings if prefix_dim is None else self._indexed_rows(slice(None))
            _check_same_vectors(index, full, metric, index_path)
        if precision != "float32":
            check_loaded(
                index,
                precision,
                calibration,
                lambda rows: binary_codes(self._indexed_rows(rows)),
                n,
                index_path,
            )
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

    @classmethod
    def _from_shards(
        cls, root: Path, manifest: dict[str, Any], model: Optional[nn.Module], verify: bool
    ) -> EmbeddingIndex:
        """A sharded directory (:mod:`~.shards`): the rows merged into one-process order and
        the FAISS index built from them as one process builds it."""
        rows = read_shards(root, manifest, verify)
        params = manifest.get("search_params", {})
        if not isinstance(params, dict) or not set(params) <= set(_SEARCH_PARAMS):
            raise IndexFormatError(
                f"{str(root / MANIFEST)!r}: 'search_params' must be a mapping with keys among "
                f"{sorted(_SEARCH_PARAMS)}, got {params!r}"
            )
        try:
            self = cls(
                rows.embeddings,
                ids=rows.ids,
                labels=rows.labels,
                metric=manifest["metric"],
                paths=rows.paths,
                info=manifest.get("info", {}),
                factory=manifest.get("factory", DEFAULT_FACTORY),
                dim=manifest.get("dim"),
                precision=manifest.get("precision", "float32"),
                rescore_multiplier=manifest.get("rescore_multiplier"),
                **params,
            )
        except (TypeError, ValueError) as err:
            raise IndexFormatError(f"{str(root / MANIFEST)!r}: {err}") from err
        self.directory = root
        if model is not None:
            self.attach_model(model)
        return self

    @property
    def index_dim(self) -> int:
        """The dimension searched: the prefix ``dim`` if one was given, else the full one."""
        return self.prefix_dim or self.dim

    @property
    def descending(self) -> bool:
        """Whether better neighbours have higher scores (similarities), not lower ones
        (``l2`` distances; Hamming distances of a binary index without re-scoring)."""
        hamming = self.precision == "binary" and self.rescore_multiplier is None
        return self.metric != "l2" and not hamming

    def set_rescore_multiplier(self, value: Optional[int]) -> None:
        """Re-rank ``value * k`` code candidates by the float vectors (``None``: rank by the
        codes alone); kept in the manifest on :meth:`save`."""
        self.rescore_multiplier = check_index_options(
            self.precision, self.prefix_dim, self.dim, value, self.factory
        )[2]

    def _indexed(self, emb: np.ndarray) -> np.ndarray:
        """What the FAISS index holds of ``emb`` rows (before coding): the prefix if any,
        prepared for the metric as :mod:`~lightning_metric.retrieval.knn` does."""
        if self.prefix_dim is not None and emb.shape[0]:
            emb = prefix(torch.from_numpy(np.ascontiguousarray(emb)), self.prefix_dim).numpy()
        elif self.prefix_dim is not None:
            emb = np.empty((0, self.prefix_dim), dtype=np.float32)
        return _prepared(np.ascontiguousarray(emb, dtype=np.float32), self.metric)

    def _indexed_rows(self, rows: Any) -> np.ndarray:
        return self._indexed(np.asarray(self.embeddings[rows], dtype=np.float32))

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
        q = self._query_embeddings(queries, inputs)
        # Small tensor work on one torch thread, FAISS on one thread per query at most: a
        # parallel region that wakes idle threads costs more than a few queries' search.
        with single_threaded_bookkeeping(), faiss_threads_for(len(q)):
            return self._search(self._indexed(q), int(k), nprobe, ef_search)

    def _search(
        self, q: np.ndarray, k: int, nprobe: Optional[int], ef_search: Optional[int]
    ) -> SearchResult:
        binary = self.precision == "binary"
        if self.factory in (DEFAULT_FACTORY, "SQ8") and nprobe is None and ef_search is None:
            m = self.rescore_multiplier
            depth = k if m is None else min(len(self), m * k)
            if binary:
                scores, rows = search_binary(self._index, binary_codes(q), depth)
            else:
                scores, rows = search_complete(
                    self._index.search, q, len(self), depth, descending=self.metric != "l2"
                )
            if m is not None:
                return self._rescored(q, rows.numpy(), k)
            return SearchResult(self.ids[rows.numpy()], scores.numpy().astype(np.float32))
        stored = dict(self.search_params)
        try:
            self.set_search_params(nprobe=nprobe, ef_search=ef_search)
            raw_scores, raw_rows = self._index.search(q, k)
        finally:
            self.search_params = {}
            _reset_search_params(self._index, set(stored) | _given(nprobe, ef_search))
            self.set_search_params(**stored)
        missing = raw_rows < 0
        ids = np.where(missing, -1, self.ids[np.where(missing, 0, raw_rows)])
        worst = np.inf if self.metric == "l2" else -np.inf
        return SearchResult(ids, np.where(missing, worst, raw_scores).astype(np.float32))

    def _rescored(self, q: np.ndarray, rows: np.ndarray, k: int) -> SearchResult:
        """The ``k`` best of each query's candidate ``rows`` by the float vectors, which are
        computed for the candidates only."""
        unique, inverse = np.unique(rows, return_inverse=True)
        reference = torch.from_numpy(self._indexed_rows(unique))
        candidates = torch.from_numpy(inverse.reshape(rows.shape).astype(np.int64))
        metric: Literal["ip", "l2"] = "l2" if self.metric == "l2" else "ip"
        # unique is sorted, so rescore's tie rule (lower row first) holds for stored rows too.
        best = rescore(torch.from_numpy(q), reference, candidates, k, metric)
        return SearchResult(self.ids[unique[best.indices.numpy()]], best.values.numpy())

    def set_search_params(
        self, nprobe: Optional[int] = None, ef_search: Optional[int] = None
    ) -> None:
        """Set the search parameters kept with the index (and written to its manifest):
        ``nprobe`` for IVF indexes, ``ef_search`` (FAISS ``efSearch``) for HNSW."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is None:
                continue
            value = check_int(name, value, minimum=1)
            if self.precision == "binary":
                raise ValueError(
                    f"`{name}`={value} applies to approximate indexes; this binary index is "
                    "searched exactly (IndexBinaryFlat): leave it unset"
                )
            _set_faiss_param(self._index, name, value, self.factory)
            self.search_params[name] = value

    def _query_embeddings(self, queries: Any, inputs: Optional[bool]) -> np.ndarray:
        looks_like_embeddings = (
            isinstance(queries, Tensor | np.ndarray)
            and queries.ndim == 2
            and queries.shape[1] in (self.dim, self.index_dim)
        )
        integer = (
            isinstance(queries, np.ndarray) and not np.issubdtype(queries.dtype, np.floating)
        ) or (isinstance(queries, Tensor) and not queries.is_floating_point())
        if integer and self.precision != "float32" and (self.model is None or inputs is False):
            dtype = queries.dtype
            raise ValueError(
                f"queries must be float embeddings [count, {self.dim}] (or [count, "
                f"{self.index_dim}]), got {dtype} codes: this {self.precision} index codes "
                "queries itself with its stored calibration; pass the float embeddings"
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
        q = _as_embeddings(queries, "queries", self.metric)
        if q.shape[1] not in (self.dim, self.index_dim):
            also = f" or {self.index_dim}-d (its prefix dim)" if self.prefix_dim else ""
            raise ValueError(
                f"queries have dimension {q.shape[1]}, but the index holds {self.dim}-d "
                f"embeddings: pass {self.dim}-d queries{also}"
            )
        return q

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
        # Codes come from the stored calibration (int8) or the signs (binary): adding an item
        # codes it as building with it would, without touching the ranges.
        indexed = self._indexed(emb)
        codes = binary_codes(indexed) if self.precision == "binary" and n else indexed
        _add_in_chunks(self._index, codes, show_progress)
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
        write = faiss.write_index_binary if self.precision == "binary" else faiss.write_index
        write(self._index, str(root / INDEX_FILE))
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
            "precision": self.precision,
            "dim": self.prefix_dim,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "rescore_multiplier": self.rescore_multiplier,
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
        if self.prefix_dim is not None:
            extra += f", prefix_dim={self.prefix_dim}"
        if self.precision != "float32":
            extra += f", precision={self.precision!r}"
        if self.rescore_multiplier is not None:
            extra += f", rescore_multiplier={self.rescore_multiplier}"
        return f"EmbeddingIndex(count={len(self)}, dim={self.dim}, metric={self.metric!r}{extra})"


@torch.no_grad()
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


def _as_int_vector(x: ArrayLike, name: str, n: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one per embedding), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)
