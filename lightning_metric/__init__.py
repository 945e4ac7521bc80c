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
    "SmallCNN": "lightning_metric.backbones",
    "TimmBackbone": "lightning_metric.backbones",
    "TorchvisionBackbone": "lightning_metric.backbones",
}
_SUBPACKAGES = ("backbones", "callbacks", "data", "heads", "metrics", "retrieval", "search")

__all__ = [
    "EmbeddingNeck",
    "MetricLearningModule",
    "SmallCNN",
    "TimmBackbone",
    "TorchvisionBackbone",
    "backbones",
    "callbacks",
    "data",
    "heads",
    "metrics",
    "retrieval",
    "search",
]

if TYPE_CHECKING:
    from lightning_metric.backbones import SmallCNN, TimmBackbone, TorchvisionBackbone
    from lightning_metric.module import MetricLearningModule
    from lightning_metric.necks import EmbeddingNeck


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lightning_metric.{name}")
    raise AttributeError(f"module 'lightning_metric' has no attribute {name!r}")
