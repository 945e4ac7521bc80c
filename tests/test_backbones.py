"""Backbones: the built-in CNN across image sizes, and torchvision / timm adapters."""

import math

import pytest
import torch

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.heads import CosFaceHead


@pytest.mark.parametrize("size", [8, 13, 32, 64])
def test_small_cnn_handles_8_to_64_pixel_images(size):
    net = SmallCNN(in_channels=3, width=4)
    out = net(torch.randn(2, 3, size, size))
    # Two ceil-mode poolings: 8 -> 4 -> 2, 13 -> 7 -> 4, never down to zero.
    side = math.ceil(math.ceil(size / 2) / 2)
    assert out.shape == (2, net.num_features, side, side)


def test_small_cnn_names_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"in_channels=1.*\(2, 3, 8, 8\)"):
        SmallCNN(in_channels=1)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=0)


def _check_adapter(backbone: torch.nn.Module) -> None:
    features = backbone(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, backbone.num_features)
    module = MetricLearningModule(
        backbone=backbone, embedding_dim=8, head=CosFaceHead, num_classes=3
    )
    assert module.neck.linear.in_features == backbone.num_features
    module.train()
    x, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    loss = module.compute_loss(module.embed(x), labels)
    loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.vision
def test_torchvision_backbone_drops_its_classifier():
    pytest.importorskip("torchvision")
    from lightning_metric.backbones import TorchvisionBackbone

    backbone = TorchvisionBackbone("resnet18")
    assert backbone.num_features == 512
    _check_adapter(backbone)
    mobilenet = TorchvisionBackbone("mobilenet_v3_small")  # Sequential classifier
    assert mobilenet(torch.randn(2, 3, 64, 64)).shape == (2, mobilenet.num_features)
    with pytest.raises(ValueError, match="not_a_model"):
        TorchvisionBackbone("not_a_model")


@pytest.mark.vision
def test_timm_backbone_returns_pooled_features():
    pytest.importorskip("timm")
    from lightning_metric.backbones import TimmBackbone

    backbone = TimmBackbone("resnet18")
    assert backbone.num_features == 512
    _check_adapter(backbone)
    with pytest.raises(ValueError, match="not_a_model"):
        TimmBackbone("not_a_model")


@pytest.mark.vision
def test_timm_backbone_from_yaml(tmp_path):
    pytest.importorskip("timm")
    from lightning_metric.cli import main

    config = tmp_path / "timm.yaml"
    config.write_text(
        """
model:
  class_path: lightning_metric.MetricLearningModule
  init_args:
    backbone:
      class_path: lightning_metric.backbones.TimmBackbone
      init_args: {name: resnet18}
    embedding_dim: 16
    head:
      class_path: lightning_metric.heads.ArcFaceHead
data:
  class_path: lightning_metric.data.DigitsDataModule
"""
    )
    cli = main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert cli.model.neck.linear.in_features == 512
    assert cli.model.head.weight.shape == (5, 16)
