"""lightning-metric: PyTorch Lightning modules for deep metric learning.

Public names are imported on first use, so ``import lightning_metric.retrieval`` (or heads)
does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MetricLearningModule": "lightning_metric.module",
    "EmbeddingNeck": "lightning_metric.necks",
    "EmbeddingIndex": "lightning_metric.retrieval.index",
    "IndexFormatError": "lightning_metric.retrieval.index",
    "SearchResult": "lightning_metric.retrieval.index",
    "RetrievalMetrics": "lightning_metric.retrieval.torchmetric",
    "SmallCNN": "lightning_metric.backbones",
    "TimmBackbone": "lightning_metric.backbones",
    "TorchvisionBackbone": "lightning_metric.backbones",
}
# The old paths lightning_metric.metrics and lightning_metric.search still import (with a
# FutureWarning naming the new one) but are no longer advertised here.
_SUBPACKAGES = ("backbones", "callbacks", "data", "heads", "retrieval")

__all__ = [
    "EmbeddingIndex",
    "EmbeddingNeck",
    "IndexFormatError",
    "MetricLearningModule",
    "RetrievalMetrics",
    "SearchResult",
    "SmallCNN",
    "TimmBackbone",
    "TorchvisionBackbone",
    "backbones",
    "callbacks",
    "data",
    "heads",
    "retrieval",
]

if TYPE_CHECKING:
    from lightning_metric.backbones import SmallCNN, TimmBackbone, TorchvisionBackbone
    from lightning_metric.module import MetricLearningModule
    from lightning_metric.necks import EmbeddingNeck
    from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError, SearchResult
    from lightning_metric.retrieval.torchmetric import RetrievalMetrics


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lightning_metric.{name}")
    raise AttributeError(f"module 'lightning_metric' has no attribute {name!r}")
