"""Compact EmbeddingIndex storage: a Matryoshka prefix, int8 scalar codes or binary codes.

The codes are those of :mod:`lightning_metric.retrieval.quantization`, held in FAISS:

- ``int8``: ``IndexScalarQuantizer(QT_8bit)`` (factory ``"SQ8"``, exact over the codes) or
  ``"IVF<n>,SQ8"`` (approximate, vectors coded as they are, not as residuals), whose ranges
  are set to the :class:`~.quantization.Calibration` of the indexed (reference) vectors:
  FAISS's codes are :func:`~.quantization.quantize_int8`'s plus 128 and decode alike.
- ``binary``: ``IndexBinaryFlat`` over :func:`~.quantization.binarize` codes, Hamming distance.

With ``rescore_multiplier`` (flat code indexes) the ``rescore_multiplier * k`` best candidates
by the codes are re-ranked by the float vectors (:func:`~.quantization.rescore`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lightning_metric.checks import ArgumentTypeError, check_choice, check_int
from lightning_metric.retrieval.index.backend import (
    DEFAULT_FACTORY,
    _new_faiss_index,
)
from lightning_metric.retrieval.index.files import IndexFormatError
from lightning_metric.retrieval.quantization import Calibration, binarize

INDEX_PRECISIONS: tuple[str, ...] = ("float32", "int8", "binary")
_INT8_FACTORY = re.compile(r"(IVF(\d+),)?SQ8")


def check_index_options(
    precision: Any,
    dim: Any,
    embedding_dim: int,
    rescore_multiplier: Any,
    factory: str,
) -> tuple[str, Optional[int], Optional[int], str]:
    """``(precision, dim, rescore_multiplier, factory)`` checked against each other; the
    default ``"Flat"`` factory becomes the flat index of the precision (``"SQ8"`` for int8)."""
    if precision == "binary_rescore":
        raise ValueError(
            "`precision` 'binary_rescore' is written precision='binary', rescore_multiplier=4 "
            f"(or another multiplier) for an index; precisions: {INDEX_PRECISIONS}"
        )
    check_choice("precision", precision, INDEX_PRECISIONS)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ArgumentTypeError(
                f"`dim` must be an integer prefix size in [1, {embedding_dim}] or None, got {dim!r}"
            )
        if not 1 <= dim <= embedding_dim:
            raise ValueError(
                f"`dim`={dim} must be a prefix size in [1, {embedding_dim}] (the embeddings "
                f"have {embedding_dim} dimensions), or None for all of them"
            )
    if precision == "int8":
        factory = "SQ8" if factory == DEFAULT_FACTORY else factory
        if not _INT8_FACTORY.fullmatch(factory):
            raise ValueError(
                f"`factory` {factory!r} does not fit precision 'int8': use 'SQ8' (exact over "
                "the codes, the default) or 'IVF<lists>,SQ8' (approximate), e.g. 'IVF64,SQ8'"
            )
    elif precision == "binary" and factory != DEFAULT_FACTORY:
        raise ValueError(
            f"`factory` {factory!r} does not fit precision 'binary': binary codes are searched "
            "exactly by Hamming distance with factory 'Flat' (FAISS IndexBinaryFlat)"
        )
    if rescore_multiplier is not None:
        if precision == "float32":
            raise ValueError(
                f"`rescore_multiplier`={rescore_multiplier} re-ranks int8 or binary candidates "
                "by the float vectors; a float32 index already ranks by them: leave it None or "
                "use precision='int8' / 'binary'"
            )
        if approximate(factory):
            raise ValueError(
                f"`rescore_multiplier`={rescore_multiplier} needs a flat code index, but "
                f"factory {factory!r} is approximate: use 'SQ8' or leave it None"
            )
        rescore_multiplier = check_int("rescore_multiplier", rescore_multiplier, minimum=1)
    return precision, dim, rescore_multiplier, factory


def approximate(factory: str) -> bool:
    return factory.startswith("IVF")


def new_code_index(precision: str, dim: int, metric: str, factory: str) -> Any:
    """An empty FAISS index for ``precision`` codes of ``dim``-d vectors."""
    import faiss

    if precision == "binary":
        # Whole bytes; binarize pads the last byte with zero bits on both sides.
        return faiss.IndexBinaryFlat(8 * -(-dim // 8))
    index = _new_faiss_index(dim, metric, factory)
    if precision == "int8" and approximate(factory):
        # The calibration holds the ranges of the vectors, not of their residuals.
        faiss.extract_index_ivf(index).by_residual = False
    return index


def _scalar_quantizer(index: Any) -> Any:
    import faiss

    if isinstance(index, faiss.IndexScalarQuantizer):
        return index.sq
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    return ivf.sq


def set_calibration(index: Any, calibration: Calibration) -> None:
    """Make ``index``'s int8 ranges the calibration's (FAISS stores ``low`` then
    ``high - low``, which decodes as :func:`~.quantization.dequantize_int8`)."""
    import faiss

    low = calibration.low.numpy()
    trained = np.concatenate([low, calibration.high.numpy() - low]).astype(np.float32)
    sq = _scalar_quantizer(index)
    sq.trained.resize(0)
    faiss.copy_array_to_vector(trained, sq.trained)
    if isinstance(index, faiss.IndexScalarQuantizer):
        index.is_trained = True


def stored_ranges(index: Any) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(_scalar_quantizer(index).trained)


def check_loaded(
    index: Any,
    precision: str,
    calibration: Optional[Calibration],
    codes_of: Any,
    count: int,
    path: Path,
) -> None:
    """The FAISS file agrees with the manifest's precision and calibration, and (binary) a
    few of its codes are those of the stored embeddings."""
    import faiss

    if precision == "int8":
        if calibration is None:
            raise IndexFormatError(f"{str(path.parent)!r}: an int8 index needs a 'calibration'")
        low = calibration.low.numpy()
        expected = np.concatenate([low, calibration.high.numpy() - low]).astype(np.float32)
        if not np.array_equal(stored_ranges(index), expected):
            raise IndexFormatError(
                f"{str(path)!r} holds other int8 ranges than the manifest's 'calibration' (the "
                "manifest was edited or the file comes from another index)"
            )
        return
    if not isinstance(index, faiss.IndexBinaryFlat):
        raise IndexFormatError(
            f"{str(path)!r} holds a {type(index).__name__}, but the manifest says precision "
            "'binary' (an IndexBinaryFlat)"
        )
    if count:
        rows = sorted({0, count // 2, count - 1})
        stored = np.stack([index.reconstruct(i) for i in rows])
        if not np.array_equal(stored, codes_of(rows)):
            raise IndexFormatError(
                f"{str(path)!r} holds other codes than the stored embeddings (compared rows "
                f"{rows}): the files come from different saves"
            )


def search_binary(index: Any, codes: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest codes of an ``IndexBinaryFlat`` by Hamming distance, equal
    distances by lower row, in one pass.

    FAISS's counting search (``use_heap=False``) gathers the rows of each distance in scan
    order, so it returns that order itself; its heap search (the default) keeps an arbitrary
    part of a tie group at the cut-off and would have to search again, deeper, to complete it
    (Hamming distances tie all the time). The tests hold it to a brute-force sort.
    """
    index.use_heap = False
    distances, rows = index.search(codes, k)
    return torch.from_numpy(distances), torch.from_numpy(rows)


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    return binarize(torch.from_numpy(vectors)).numpy()
