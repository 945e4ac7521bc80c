"""Embedding necks: map backbone features to the embedding space."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from lightning_metric.checks import check_choice, check_int, check_real

Pooling = Literal["avg", "flatten"]


class EmbeddingNeck(nn.Module):
    """Global pooling (or flattening) -> Linear -> BatchNorm1d.

    Returns the embedding *before* L2 normalisation: `MetricLearningModule.forward`
    normalises it, and margin heads normalise it themselves. Keeping the norm available
    lets norm-aware heads (AdaFace) use it, while retrieval always sees unit vectors.

    Args:
        in_features: width of the backbone's features. `None` infers it on the first
            batch (a lazy layer); pass it explicitly for DDP, which refuses uninitialised
            parameters.
        embedding_dim: size of the embedding.
        dropout: dropout on the pooled features before the projection.
        pooling: ``"avg"`` averages a feature map over its positions; ``"flatten"`` keeps
            every position (``in_features`` is then ``C * H * W``). Where a class is a shape
            at a fixed place, as a glyph is, the position of a stroke tells classes apart
            that an average cannot: flattening the main job's 8x8 map raises MAP@R on unseen
            glyph classes (README's recipe table) for a projection that costs far less than
            the convolutions.
    """

    def __init__(
        self,
        in_features: Optional[int] = None,
        embedding_dim: int = 128,
        dropout: float = 0.0,
        pooling: Pooling = "avg",
    ) -> None:
        super().__init__()
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        if in_features is not None:
            in_features = check_int("in_features", in_features, minimum=1)
        dropout = check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        self.pooling = check_choice("pooling", pooling, ("avg", "flatten"))
        self.in_features = in_features
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
        if features.ndim == 4 and self.pooling == "flatten":
            flat = features.flatten(1)
            if self.in_features is not None and flat.shape[1] != self.in_features:
                channels, height, width = features.shape[1:]
                raise ValueError(
                    f"EmbeddingNeck(pooling='flatten', in_features={self.in_features}) got "
                    f"feature maps [B, {channels}, {height}, {width}], which flatten to "
                    f"{flat.shape[1]} features; set in_features to {flat.shape[1]}"
                )
            features = flat
        elif features.ndim == 4:  # [B, C, H, W] feature map
            features = features.mean(dim=(2, 3))
        elif features.ndim == 3:  # [B, tokens, C] from transformers without pooling
            features = features.mean(dim=1)
        elif features.ndim != 2:
            raise ValueError(
                f"EmbeddingNeck expects backbone features of shape [B, C], [B, T, C] or "
                f"[B, C, H, W], got shape {tuple(features.shape)}"
            )
        return self.bn(self.linear(self.dropout(features)))
