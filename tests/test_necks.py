"""EmbeddingNeck: average pooling and flattening against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.necks import EmbeddingNeck


def _by_hand(neck: EmbeddingNeck, features: torch.Tensor) -> torch.Tensor:
    """Linear then BatchNorm in eval mode, on the given feature vectors."""
    bn = neck.bn
    projected = features @ neck.linear.weight.T
    return (projected - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _randomised(neck: EmbeddingNeck) -> EmbeddingNeck:
    torch.manual_seed(1)
    with torch.no_grad():
        for buffer in (neck.bn.running_mean, neck.bn.weight, neck.bn.bias):
            buffer.normal_()
        neck.bn.running_var.uniform_(0.5, 2.0)
    return neck.eval()


def test_avg_pooling_projects_the_mean_over_positions():
    neck = _randomised(EmbeddingNeck(6, 4))
    maps = torch.randn(3, 6, 5, 7)
    expected = _by_hand(neck, maps.mean(dim=(2, 3)))
    torch.testing.assert_close(neck(maps), expected)


def test_flatten_keeps_every_position_in_channel_major_order():
    neck = _randomised(EmbeddingNeck(6 * 5 * 7, 4, pooling="flatten"))
    maps = torch.randn(3, 6, 5, 7)
    expected = _by_hand(neck, maps.reshape(3, -1))
    torch.testing.assert_close(neck(maps), expected)
    # Moving one activation to another position changes the flattened embedding, not the
    # average-pooled one: what lets it tell apart glyphs made of the same strokes elsewhere.
    moved = maps.clone()
    moved[0, :, 0, 0], moved[0, :, 4, 6] = maps[0, :, 4, 6], maps[0, :, 0, 0]
    assert not torch.allclose(neck(moved)[0], neck(maps)[0])
    avg = _randomised(EmbeddingNeck(6, 4))
    torch.testing.assert_close(avg(moved), avg(maps))


def test_flatten_with_the_wrong_in_features_names_the_size_that_works():
    neck = EmbeddingNeck(100, 4, pooling="flatten")
    with pytest.raises(
        ValueError, match=r"in_features=100.*\[B, 6, 5, 7\].*set in_features to 210"
    ):
        neck(torch.randn(2, 6, 5, 7))


def test_unknown_pooling_is_refused_at_construction():
    with pytest.raises(
        ValueError, match=r"`pooling` must be one of \('avg', 'flatten'\), got 'max'"
    ):
        EmbeddingNeck(6, 4, pooling="max")  # type: ignore[arg-type]


def test_flatten_neck_trains_inside_the_module():
    backbone = SmallCNN(in_channels=1, width=4)  # 16x16 input -> [B, 16, 4, 4]
    module = MetricLearningModule(
        backbone=backbone,
        neck=EmbeddingNeck(16 * 4 * 4, 8, pooling="flatten"),
        embedding_dim=8,
        head=lambda dim, n: torch.nn.Linear(dim, n),
        num_classes=3,
    )
    x = torch.randn(5, 1, 16, 16)
    out = module(x)
    assert out.shape == (5, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
