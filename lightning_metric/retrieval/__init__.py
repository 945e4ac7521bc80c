"""Functional retrieval core: exact kNN search and retrieval / verification metrics."""

from lightning_metric.retrieval.knn import Neighbors, knn
from lightning_metric.retrieval.metrics import (
    retrieval_metrics,
    retrieval_metrics_per_class,
    verification_metrics,
)

__all__ = [
    "Neighbors",
    "knn",
    "retrieval_metrics",
    "retrieval_metrics_per_class",
    "verification_metrics",
]
