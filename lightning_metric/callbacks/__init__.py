"""Lightning callbacks."""

from lightning_metric.callbacks.lost_rank import LostRankReport
from lightning_metric.callbacks.pictures import EmbeddingProjection, RetrievalGallery
from lightning_metric.callbacks.prediction_writer import EmbeddingIndexWriter
from lightning_metric.callbacks.recall import RecallAtK

__all__ = [
    "EmbeddingIndexWriter",
    "EmbeddingProjection",
    "LostRankReport",
    "RecallAtK",
    "RetrievalGallery",
]
