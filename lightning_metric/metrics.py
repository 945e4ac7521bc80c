"""Deprecated path of :class:`RetrievalMetrics`: import it from ``lightning_metric`` or
:mod:`lightning_metric.retrieval` (it lives in :mod:`lightning_metric.retrieval.torchmetric`).
Every name still resolves, with a ``FutureWarning`` naming the new path."""

from lightning_metric.retrieval.deprecated import moved

__all__: list[str] = []

__getattr__ = moved(
    "lightning_metric.metrics", {"RetrievalMetrics": "lightning_metric.retrieval.torchmetric"}
)
