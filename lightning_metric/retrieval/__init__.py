"""Retrieval: exact kNN search (:mod:`~.knn`), one protocol deciding queries, references and
exclusions (:mod:`~.protocol`), relevance of single, multi- and hierarchical labels
(:mod:`~.relevance`), one function per ranking metric (:mod:`~.functional`), ranking,
verification and clustering metrics (:mod:`~.ranking`, :mod:`~.verification`,
:mod:`~.clustering`), re-ranking (:mod:`~.rerank`), Matryoshka prefixes, int8 / binary codes
and search on codes (:mod:`~.quantization`),
their torchmetrics shell :class:`RetrievalMetrics` (:mod:`~.torchmetric`, gathering through
:mod:`~.accumulator`) and the on-disk :class:`EmbeddingIndex` (:mod:`~.index`).

The stateful classes are imported on first use, so importing the functional core does not
pay for torchmetrics.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from lightning_metric.retrieval.clustering import clustering_metrics
from lightning_metric.retrieval.functional import (
    map_at_r,
    mrr,
    precision_at_k,
    r_precision,
    recall_at_k,
)
from lightning_metric.retrieval.knn import Neighbors, Similarity, knn
from lightning_metric.retrieval.quantization import (
    PRECISIONS,
    Calibration,
    Precision,
    binarize,
    bytes_per_vector,
    calibrate,
    dequantize_int8,
    hamming,
    prefix,
    quantize_int8,
    rescore,
    search_codes,
)
from lightning_metric.retrieval.ranking import (
    neighbour_list_metrics,
    retrieval_metrics,
    retrieval_metrics_per_class,
)
from lightning_metric.retrieval.relevance import LabelKind
from lightning_metric.retrieval.rerank import (
    KReciprocal,
    QueryExpansion,
    Reranker,
    alpha_query_expansion,
    database_side_augmentation,
    k_reciprocal,
)
from lightning_metric.retrieval.verification import verification_metrics

if TYPE_CHECKING:
    from lightning_metric.retrieval.accumulator import EmbeddingAccumulator
    from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError, SearchResult
    from lightning_metric.retrieval.torchmetric import RetrievalMetrics

_LAZY = {
    "EmbeddingAccumulator": "lightning_metric.retrieval.accumulator",
    "EmbeddingIndex": "lightning_metric.retrieval.index",
    "IndexFormatError": "lightning_metric.retrieval.index",
    "SearchResult": "lightning_metric.retrieval.index",
    "RetrievalMetrics": "lightning_metric.retrieval.torchmetric",
}

__all__ = [
    "PRECISIONS",
    "Calibration",
    "EmbeddingAccumulator",
    "EmbeddingIndex",
    "IndexFormatError",
    "KReciprocal",
    "LabelKind",
    "Neighbors",
    "Precision",
    "QueryExpansion",
    "Reranker",
    "RetrievalMetrics",
    "SearchResult",
    "Similarity",
    "alpha_query_expansion",
    "binarize",
    "bytes_per_vector",
    "calibrate",
    "clustering_metrics",
    "database_side_augmentation",
    "dequantize_int8",
    "hamming",
    "k_reciprocal",
    "knn",
    "map_at_r",
    "mrr",
    "neighbour_list_metrics",
    "precision_at_k",
    "prefix",
    "quantize_int8",
    "r_precision",
    "recall_at_k",
    "rescore",
    "retrieval_metrics",
    "retrieval_metrics_per_class",
    "search_codes",
    "verification_metrics",
]


def __getattr__(name: str) -> Any:
    if name == "Metric":
        # The similarity-name type was renamed: "Metric" read like torchmetrics' Metric class.
        warnings.warn(
            "lightning_metric.retrieval.Metric is deprecated; use "
            "lightning_metric.retrieval.Similarity",
            FutureWarning,
            stacklevel=2,
        )
        return Similarity
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_metric.retrieval' has no attribute {name!r}")
