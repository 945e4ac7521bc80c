"""Old path of :class:`RetrievalMetrics`, kept so existing imports work.

It moved beside its functional core, to :mod:`lightning_metric.retrieval.torchmetric`.
"""

from lightning_metric.retrieval.torchmetric import RetrievalMetrics

__all__ = ["RetrievalMetrics"]
