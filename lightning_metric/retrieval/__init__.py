"""Functional retrieval core: exact kNN search, retrieval / verification metrics and
re-ranking (:mod:`lightning_metric.retrieval.rerank`)."""

from lightning_metric.retrieval.knn import Neighbors, knn
from lightning_metric.retrieval.metrics import (
    retrieval_metrics,
    retrieval_metrics_per_class,
    verification_metrics,
)
from lightning_metric.retrieval.rerank import (
    KReciprocal,
    QueryExpansion,
    Reranker,
    alpha_query_expansion,
    database_side_augmentation,
    k_reciprocal,
)

__all__ = [
    "KReciprocal",
    "Neighbors",
    "QueryExpansion",
    "Reranker",
    "alpha_query_expansion",
    "database_side_augmentation",
    "k_reciprocal",
    "knn",
    "retrieval_metrics",
    "retrieval_metrics_per_class",
    "verification_metrics",
]
