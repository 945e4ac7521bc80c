"""The FAISS side of EmbeddingIndex: building an index from a factory string, training,
search parameters, and the checks that ``index.faiss`` is what the manifest describes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lightning_metric.checks import check_training_size
from lightning_metric.retrieval.index.files import EMBEDDINGS_FILE, MANIFEST, IndexFormatError
from lightning_metric.retrieval.knn import prepare

DEFAULT_FACTORY = "Flat"
# Manifest key of each search parameter and the FAISS ParameterSpace name it sets.
_SEARCH_PARAMS = {"nprobe": "nprobe", "ef_search": "efSearch"}
# Rows added to FAISS per call: bounds the temporary float32 copy and gives progress steps.
_ADD_CHUNK = 65536


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
    structure = _structure(index)
    if structure["index class"].startswith("IndexIDMap"):
        raise ValueError(
            f"`factory` {factory!r}: EmbeddingIndex keeps the ids itself (ids.npy) and adds "
            "vectors without ids, which an IDMap refuses; drop the 'IDMap' part"
        )
    for key, value in structure.items():
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


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    # The very normalisation retrieval.knn applies, so both find the same neighbours.
    return prepare(torch.from_numpy(x), metric).numpy()  # type: ignore[arg-type]


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
    index: Any,
    factory: str,
    dim: int,
    metric: str,
    recorded_type: Any,
    path: Path,
    build: Callable[[int, str, str], Any] = _new_faiss_index,
) -> None:
    """``index.faiss`` must be what the manifest's factory string builds: the manifest has
    no hash of its own, so an edited factory (or ``faiss_index``) is caught here."""
    manifest = path.parent / MANIFEST
    try:
        # Kept in a name: the wrapper _structure downcasts to does not own the index.
        built = build(dim, metric, factory)
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
