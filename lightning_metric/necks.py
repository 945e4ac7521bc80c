"""Embedding necks: map backbone features to the embedding space."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_metric.checks import check_int, check_real


class EmbeddingNeck(nn.Module):
    """Global pooling -> Linear -> BatchNorm1d.

    Returns the embedding *before* L2 normalisation: `MetricLearningModule.forward`
    normalises it, and margin heads normalise it themselves. Keeping the norm available
    lets norm-aware heads (AdaFace) use it, while retrieval always sees unit vectors.

    Args:
        in_features: width of the backbone's features. `None` infers it on the first
            batch (a lazy layer); pass it explicitly for DDP, which refuses uninitialised
            parameters.
        embedding_dim: size of the embedding.
        dropout: dropout on the pooled features before the projection.
    """

    def __init__(
        self, in_features: Optional[int] = None, embedding_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        if in_features is not None:
            in_features = check_int("in_features", in_features, minimum=1)
        dropout = check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        self.embedding_dim = embedding_dim
        self.dropout = nn.Dropout(dropout)
        # No bias: the BatchNorm that follows has its own shift.
        self.linear: nn.Module = (
            nn.Linear(in_features, embedding_dim, bias=False)
            if in_features is not None
            else nn.LazyLinear(embedding_dim, bias=False)
        )
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 4:  # [B, C, H, W] feature map
            features = features.mean(dim=(2, 3))
        elif features.ndim == 3:  # [B, tokens, C] from transformers without pooling
            features = features.mean(dim=1)
        elif features.ndim != 2:
            raise ValueError(
                f"EmbeddingNeck expects backbone features of shape [B, C], [B, T, C] or "
                f"[B, C, H, W], got shape {tuple(features.shape)}"
            )
        return self.bn(self.linear(self.dropout(features)))
