"""Fixed-margin heads: NormSoftmax, CosFace, ArcFace, CombinedMargin, sub-center ArcFace."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_metric.checks import check_int, check_range
from lightning_metric.heads import functional as HF
from lightning_metric.heads.base import MarginHead, ShardingError
from lightning_metric.heads.sampling import class_rows

__all__ = [
    "ArcFaceHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "NormSoftmaxHead",
    "SubCenterArcFaceHead",
    "SubCenterOutliers",
]

_HALF_PI = math.pi / 2
_OUTLIER_SLICE = 65536


def check_angle(name: str, value: Any) -> float:
    """An angular margin in [0, pi/2) radians.

    Past pi/2 the fallback's jump at theta_t goes *up*: the target logit stops being
    monotonic in the angle, which is the one property a margin must keep.
    """
    return check_range(name, value, 0.0, _HALF_PI, high_open=True, unit=" radians")


class NormSoftmaxHead(MarginHead):
    """NormFace / normalised softmax (Wang et al. 2017; Zhai & Wu 2019): ``s * cos``, no margin.

    Default ``scale=20`` is Zhai & Wu's temperature 0.05.

    Example (inference: no labels, no margin; inputs need not be unit vectors):

    >>> import torch
    >>> head = NormSoftmaxHead(embedding_dim=2, num_classes=2)
    >>> _ = head.weight.data.copy_(torch.eye(2))  # class centres
    >>> head(torch.tensor([[3.0, 4.0]])).tolist()  # 20 * cos to each centre
    [[12.0, 16.0]]
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 20.0, **kwargs: Any
    ) -> None:
        """
        Args:
            scale: ``s`` (Zhai & Wu's temperature 0.05). Other arguments: see ``MarginHead``.
        """
        super().__init__(embedding_dim, num_classes, scale=scale, **kwargs)


class CosFaceHead(MarginHead):
    """CosFace / AM-softmax (Wang et al. 2018): ``s * (cos(theta) - m)`` on the target.

    ``margin`` is in cosine units; defaults are the paper's ``s=64, m=0.35``.

    Example (the margin is subtracted from the target class's cosine only):

    >>> import torch
    >>> head = CosFaceHead(embedding_dim=2, num_classes=2, scale=10.0, margin=0.35)
    >>> _ = head.weight.data.copy_(torch.eye(2))  # class centres
    >>> logits = head(torch.tensor([[0.6, 0.8]]), labels=torch.tensor([1]))
    >>> [round(v, 4) for v in logits[0].tolist()]  # 10 * 0.6 and 10 * (0.8 - 0.35)
    [6.0, 4.5]
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.35,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            margin: ``m`` in cosine units, in [0, 1]. Other arguments: see ``MarginHead``.
        """
        margin = check_range("margin", margin, 0.0, 1.0, unit=" (cosine units)")
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = margin

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.cosface_margin(cos_target, self.margin)


class ArcFaceHead(MarginHead):
    """ArcFace (Deng et al. 2019): ``s * cos(theta + m)`` on the target.

    ``margin`` in radians (default 0.5, ``s=64``). Where ``theta + m > pi`` the target logit
    continues as ``cos(theta) - m sin(m)`` so it keeps decreasing with the angle;
    ``easy_margin=True`` applies the margin only where ``cos(theta) > 0``.

    Example (60 degrees from the target centre; the loss is the cross-entropy of the logits):

    >>> import math, torch
    >>> head = ArcFaceHead(embedding_dim=2, num_classes=2, margin=0.5)
    >>> _ = head.weight.data.copy_(torch.eye(2))  # class centres
    >>> x, y = torch.tensor([[0.5, math.sqrt(3) / 2]]), torch.tensor([0])
    >>> logits = head(x, labels=y)
    >>> round(logits[0, 0].item() / head.scale, 4), round(math.cos(math.pi / 3 + 0.5), 4)
    (0.0236, 0.0236)
    >>> torch.isclose(head.loss(x, y), torch.nn.functional.cross_entropy(logits, y))
    tensor(True)
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.5,
        easy_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            margin: ``m`` in radians, in [0, pi/2).
            easy_margin: apply the margin only where ``cos(theta) > 0``.
            **kwargs: ``scale``, ``sample_rate``, ... see ``MarginHead``.
        """
        margin = check_angle("margin", margin)
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = margin
        self.easy_margin = easy_margin

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.arcface_margin(cos_target, self.margin, self.easy_margin)


class CombinedMarginHead(MarginHead):
    """insightface's combined margin: ``s * (cos(m1 * theta + m2) - m3)`` on the target.

    ``(1, m, 0)`` is ArcFace, ``(1, 0, m)`` CosFace; the default ``(1.0, 0.3, 0.2)`` is
    insightface's published combination. Requires ``m1 > 0``, ``m2, m3 >= 0`` and
    ``m1 * pi/2 + m2 <= pi`` (keeps the target logit monotonic, see
    :func:`~lightning_metric.heads.functional.angular_margin`).

    Example (``(1, m, 0)`` is ArcFace):

    >>> import torch
    >>> from lightning_metric.heads import ArcFaceHead
    >>> combined = CombinedMarginHead(embedding_dim=4, num_classes=3, m1=1.0, m2=0.5, m3=0.0)
    >>> arcface = ArcFaceHead(embedding_dim=4, num_classes=3, margin=0.5)
    >>> _ = arcface.weight.data.copy_(combined.weight)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> torch.allclose(combined(x, y), arcface(x, y), atol=1e-5)
    True
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            m1: multiplicative angular margin (> 0).
            m2: additive angular margin in radians (>= 0).
            m3: additive cosine margin in [0, 1].
            **kwargs: ``scale``, ``sample_rate``, ... see ``MarginHead``.
        """
        m1 = check_range("m1", m1, 0.0, low_open=True)
        m2 = check_range("m2", m2, 0.0, unit=" radians")
        m3 = check_range("m3", m3, 0.0, 1.0, unit=" (cosine units)")
        if m1 * _HALF_PI + m2 > math.pi:
            raise ValueError(
                f"`(m1, m2)` must satisfy m1 * pi/2 + m2 <= pi (else the target logit is not "
                f"monotonic), got {(m1, m2)!r}"
            )
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.m1, self.m2, self.m3 = m1, m2, m3

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.angular_margin(cos_target, self.m1, self.m2, self.m3)


class SubCenterOutliers(NamedTuple):
    """Result of :meth:`SubCenterArcFaceHead.find_outliers`."""

    outlier_indices: Tensor  # int64 positions (into the given embeddings) of outliers
    dominant_index: Tensor  # [num_classes] int64 sub-centre most samples of a class pick
    dominant_centers: Tensor  # [num_classes, embedding_dim] that sub-centre's weight row


class SubCenterArcFaceHead(MarginHead):
    """Sub-center ArcFace (Deng et al. 2020): ``K`` centres per class, cosine = max over them.

    ``weight`` is ``[num_classes * sub_centers, embedding_dim]``, row ``c * K + k`` is
    sub-centre ``k`` of class ``c`` (PML's column order). Noisy samples gather on
    non-dominant sub-centres; :meth:`find_outliers` finds them for dataset cleaning, after
    which the paper continues training with the dominant centres only
    (``ArcFaceHead`` initialised from ``dominant_centers``).

    Example (finding the samples that sit on a non-dominant sub-centre):

    >>> import torch
    >>> head = SubCenterArcFaceHead(embedding_dim=2, num_classes=2, sub_centers=2)
    >>> centres = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]  # rows c * K + k
    >>> _ = head.weight.data.copy_(torch.tensor(centres))
    >>> x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0], [0.1, 1.0]])  # all of class 0
    >>> found = head.find_outliers(x, torch.tensor([0, 0, 0, 0]))
    >>> found.outlier_indices.tolist(), found.dominant_index.tolist()
    ([3], [0, 0])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.5,
        sub_centers: int = 3,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            margin: ``m`` in radians, in [0, pi/2).
            sub_centers: ``K``, centres per class.
            **kwargs: ``scale``, ``sample_rate``, ... see ``MarginHead``.
        """
        margin = check_angle("margin", margin)
        sub_centers = check_int("sub_centers", sub_centers, minimum=1)
        self.sub_centers = sub_centers  # read by MarginHead.__init__ to size the weight
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = margin

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.arcface_margin(cos_target, self.margin)

    @torch.no_grad()
    def find_outliers(
        self, embeddings: Tensor, labels: Tensor, threshold_degrees: float = 75.0
    ) -> SubCenterOutliers:
        """Dominant sub-centre per class and samples farther than ``threshold_degrees`` from it.

        The dominant sub-centre of a class is the one most of its samples are closest to
        (classes absent from ``labels`` get sub-centre 0). Works on any number of samples
        (e.g. the whole training set's embeddings), vectorised, in float32.
        """
        if self.class_shard is not None:
            raise ShardingError(
                "find_outliers needs every class's sub-centres, but this rank holds only "
                f"classes [{self.class_shard.start}, {self.class_shard.stop}); run it on a "
                "checkpoint loaded in one process"
            )
        x, _, _ = self._prepare(embeddings, labels)
        labels = labels.long()
        k = self.sub_centers
        # [N, K] cosines to the own class's sub-centres, in slices so a whole dataset fits.
        parts = [x.new_zeros(0, k)]
        for a in range(0, len(labels), _OUTLIER_SLICE):
            rows = self.weight[class_rows(labels[a : a + _OUTLIER_SLICE], k)]
            parts.append(self._sub_center_cosines(x[a : a + _OUTLIER_SLICE], rows))
        cos = torch.cat(parts)
        nearest = cos.argmax(dim=1)
        votes = torch.bincount(labels * k + nearest, minlength=self.num_classes * k)
        dominant = votes.view(self.num_classes, k).argmax(dim=1)
        dominant_cos = cos.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
        outliers = torch.nonzero(dominant_cos < math.cos(math.radians(threshold_degrees)))
        best = torch.arange(self.num_classes, device=dominant.device) * k + dominant
        return SubCenterOutliers(outliers.flatten(), dominant, self.weight[best].detach().clone())
