"""Deprecated path of :class:`EmbeddingIndex`: import it from ``lightning_metric`` or
:mod:`lightning_metric.retrieval.index`. Every name still resolves, with a ``FutureWarning``
naming the new path."""

from lightning_metric.retrieval.deprecated import moved

__all__: list[str] = []

__getattr__ = moved(
    "lightning_metric.search",
    {
        name: "lightning_metric.retrieval.index"
        for name in (
            "FORMAT",
            "MANIFEST",
            "VERSION",
            "EmbeddingIndex",
            "IndexFormatError",
            "SearchResult",
        )
    },
)
