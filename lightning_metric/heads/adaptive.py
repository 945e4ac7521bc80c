"""Heads whose margin adapts to running statistics: CurricularFace and AdaFace.

Their statistics are buffers: they are saved in checkpoints, follow ``.to(device)``, and
are averaged over DDP ranks at every update (``MarginHead.batch_mean``) so every rank trains
with the same value. They update only in training mode and only when labels are given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_metric.checks import check_range
from lightning_metric.heads import functional as HF
from lightning_metric.heads.base import MarginHead
from lightning_metric.heads.margins import check_angle

__all__ = ["AdaFaceHead", "CurricularFaceHead"]


class CurricularFaceHead(MarginHead):
    """CurricularFace (Huang et al. 2020): ArcFace target + adaptive hard-negative weights.

    Non-target cosines above their row's margined target logit become ``cos * (t + cos)``;
    ``t`` (buffer) is the EMA (``momentum`` 0.01) of the batch's mean target cosine, so hard
    negatives are down-weighted early in training and emphasised later. Defaults
    ``s=64, m=0.5`` as in the paper.

    Example:
    >>> import math, torch
    >>> head = CurricularFaceHead(embedding_dim=2, num_classes=2, margin=0.5)
    >>> _ = head.weight.data.copy_(torch.eye(2))  # class centres
    >>> x = torch.tensor([[0.5, math.sqrt(3) / 2]])  # 60 degrees from class 0
    >>> logits = head(x, labels=torch.tensor([0]))  # float32 [1, num_classes]
    >>> round(head.t.item(), 4)  # training mode: t moved 1% of the way to the mean target cosine
    0.005
    >>> c = math.sqrt(3) / 2  # class 1 is a hard negative: its cosine exceeds the target logit
    >>> round(logits[0, 1].item() / head.scale, 4), round(c * (0.005 + c), 4)
    (0.7543, 0.7543)
    """

    t: Tensor
    max_negative_cos = 2.0  # cos * (t + cos) with t, cos <= 1

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.5,
        momentum: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            margin: ArcFace margin ``m`` in radians, in [0, pi/2).
            momentum: EMA momentum of ``t``, in (0, 1].
            **kwargs: ``scale``, ``sample_rate``, ... see ``MarginHead``.
        """
        margin = check_angle("margin", margin)
        momentum = check_range("momentum", momentum, 0.0, 1.0, low_open=True)
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = margin
        self.momentum = momentum
        self.register_buffer("t", torch.zeros(()))

    @torch.no_grad()
    def update_statistics(self, cos_target: Tensor, norms: Tensor) -> None:
        batch_t = self.batch_mean(cos_target)
        self.t.mul_(1.0 - self.momentum).add_(self.momentum * batch_t.to(self.t))

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.arcface_margin(cos_target, self.margin)

    def negative_logits(self, cos: Tensor, target: Tensor) -> Tensor:
        return HF.curricular_negatives(cos, target, self.t.float())


class AdaFaceHead(MarginHead):
    """AdaFace (Kim et al. 2022): the margin follows the feature norm (an image-quality proxy).

    Needs the **un-normalised** embedding: ``MetricLearningModule`` passes the neck output
    before L2 normalisation (see :class:`MarginHead`). With ``g`` the batch-standardised,
    ``h``-scaled, [-1, 1]-clipped norm, the target logit is
    ``s * (cos(theta - m g) - (m + m g))``: high-quality (large-norm) samples get an
    ArcFace-like angular margin, low-quality ones a CosFace-like additive one. Norm mean/std
    are EMA buffers (``momentum`` 0.01, start 20 / 100 as in the authors' code). Defaults
    ``s=64, m=0.4, h=0.333``.

    Example (evaluation mode: the running norm statistics stay at 20 / 100):
    >>> import math, torch
    >>> head = AdaFaceHead(embedding_dim=2, num_classes=2, margin=0.4, h=0.333).eval()
    >>> _ = head.weight.data.copy_(torch.eye(2))  # class centres
    >>> x = torch.tensor([[0.5, math.sqrt(3) / 2]])  # 60 degrees from class 0
    >>> logits = head(x, labels=torch.tensor([0]))  # float32 [1, num_classes]
    >>> g = max(-1.0, min(1.0, 0.333 * (1.0 - 20.0) / (100.0 + 1e-3)))  # |x| = 1: low quality
    >>> want = math.cos(math.pi / 3 - 0.4 * g) - (0.4 + 0.4 * g)
    >>> round(logits[0, 0].item() / head.scale, 4), round(want, 4)
    (0.1032, 0.1032)
    """

    norm_mean: Tensor
    norm_std: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            margin: ``m`` in radians, in [0, pi/2).
            h: how strongly the norm moves the margin (>= 0).
            momentum: EMA momentum of the norm statistics, in (0, 1].
            **kwargs: ``scale``, ``sample_rate``, ... see ``MarginHead``.
        """
        margin = check_angle("margin", margin)
        h = check_range("h", h, 0.0)
        momentum = check_range("momentum", momentum, 0.0, 1.0, low_open=True)
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = margin
        self.h = h
        self.momentum = momentum
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    @torch.no_grad()
    def update_statistics(self, cos_target: Tensor, norms: Tensor) -> None:
        safe = norms.float().clamp(0.001, 100.0)
        std = safe.std() if safe.numel() > 1 else torch.zeros_like(safe[0])
        stats = self.batch_mean(torch.stack([safe.mean(), std]).unsqueeze(0))
        self.norm_mean.mul_(1.0 - self.momentum).add_(self.momentum * stats[0].to(self.norm_mean))
        self.norm_std.mul_(1.0 - self.momentum).add_(self.momentum * stats[1].to(self.norm_std))

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return HF.adaface_margin(
            cos_target, norms, self.margin, self.h, self.norm_mean.float(), self.norm_std.float()
        )
