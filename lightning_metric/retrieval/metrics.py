"""Old path of the retrieval metric functions, kept so existing imports work.

They moved to modules named for what they hold: :mod:`lightning_metric.retrieval.ranking`
(``retrieval_metrics``, ``retrieval_metrics_per_class``),
:mod:`lightning_metric.retrieval.verification` (``verification_metrics``) and
:mod:`lightning_metric.retrieval.clustering` (``clustering_metrics``).
"""

from lightning_metric.checks import check_k
from lightning_metric.retrieval.ranking import retrieval_metrics, retrieval_metrics_per_class
from lightning_metric.retrieval.verification import verification_metrics

__all__ = ["check_k", "retrieval_metrics", "retrieval_metrics_per_class", "verification_metrics"]
