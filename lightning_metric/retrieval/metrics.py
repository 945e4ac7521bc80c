"""Deprecated path of the retrieval metric functions: import them from
:mod:`lightning_metric.retrieval` (``retrieval_metrics``, ``retrieval_metrics_per_class`` and
``verification_metrics``) or :mod:`lightning_metric.checks` (``check_k``). Every name still
resolves, with a ``FutureWarning`` naming the new path."""

from lightning_metric.retrieval.deprecated import moved

__all__: list[str] = []

__getattr__ = moved(
    "lightning_metric.retrieval.metrics",
    {
        "check_k": "lightning_metric.checks",
        "retrieval_metrics": "lightning_metric.retrieval.ranking",
        "retrieval_metrics_per_class": "lightning_metric.retrieval.ranking",
        "verification_metrics": "lightning_metric.retrieval.verification",
    },
)
