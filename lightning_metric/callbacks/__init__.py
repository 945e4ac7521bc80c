"""Lightning callbacks."""

from lightning_metric.callbacks.recall import RecallAtK

__all__ = ["RecallAtK"]

from lightning_metric.callbacks.prediction_writer import EmbeddingIndexWriter  # noqa: E402

__all__ += ["EmbeddingIndexWriter"]

from lightning_metric.callbacks.pictures import EmbeddingProjection, RetrievalGallery  # noqa: E402

__all__ += ["EmbeddingProjection", "RetrievalGallery"]
