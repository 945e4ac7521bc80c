"""Old path of :class:`EmbeddingIndex`, kept so existing imports work.

It moved to :mod:`lightning_metric.retrieval.index`.
"""

from lightning_metric.retrieval.index import (
    FORMAT,
    MANIFEST,
    VERSION,
    EmbeddingIndex,
    IndexFormatError,
    SearchResult,
)

__all__ = ["FORMAT", "MANIFEST", "VERSION", "EmbeddingIndex", "IndexFormatError", "SearchResult"]
