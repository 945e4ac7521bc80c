"""Margin-softmax heads: ``forward(embeddings, labels=None) -> logits``, ``loss(embeddings, labels)``.

See :class:`MarginHead` for the shared contract (un-normalised inputs, float32 logits,
class-centre sampling, streaming loss) and ``heads.functional`` for the pure math.
"""

from lightning_metric.heads import functional
from lightning_metric.heads.adaptive import AdaFaceHead, CurricularFaceHead
from lightning_metric.heads.base import MarginHead, ShardingError
from lightning_metric.heads.margins import (
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    NormSoftmaxHead,
    SubCenterArcFaceHead,
    SubCenterOutliers,
)

__all__ = [
    "AdaFaceHead",
    "ArcFaceHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "CurricularFaceHead",
    "MarginHead",
    "NormSoftmaxHead",
    "ShardingError",
    "SubCenterArcFaceHead",
    "SubCenterOutliers",
    "functional",
]
