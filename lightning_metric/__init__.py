"""lightning-metric: PyTorch Lightning modules for deep metric learning."""

from lightning_metric import heads
from lightning_metric.backbones import SmallCNN, TimmBackbone, TorchvisionBackbone
from lightning_metric.module import MetricLearningModule
from lightning_metric.necks import EmbeddingNeck

__version__ = "0.1.0"

__all__ = [
    "EmbeddingNeck",
    "MetricLearningModule",
    "SmallCNN",
    "TimmBackbone",
    "TorchvisionBackbone",
    "heads",
]
