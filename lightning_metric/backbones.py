"""Backbones: a small built-in CNN and adapters for torchvision / timm models.

Every backbone here exposes `num_features` (the width of what it returns) so the
default neck can be sized without a dry run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_metric.checks import ArgumentTypeError, check_int


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A plain VGG-style CNN for 8x8 .. 64x64 images (glyphs, digits, thumbnails).

    Six 3x3 conv-BN-ReLU layers in three stages of widths (w, 2w, 4w), with 2x2 max
    pooling between stages; returns the final feature map (the neck pools it).
    Pooling uses ceil_mode so odd and tiny inputs (8x8 -> 4 -> 2) never collapse to 0.

    Args:
        in_channels: image channels (1 for glyphs / digits, 3 for RGB).
        width: channels of the first stage.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, minimum=1)
        w = width = check_int("width", width, minimum=1)
        self.features = nn.Sequential(
            _conv_block(in_channels, w),
            _conv_block(w, w),
            nn.MaxPool2d(2, ceil_mode=True),
            _conv_block(w, 2 * w),
            _conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2, ceil_mode=True),
            _conv_block(2 * w, 4 * w),
            _conv_block(4 * w, 4 * w),
        )
        self.in_channels = in_channels
        self.num_features = 4 * w
        # NHWC lets oneDNN (CPU) and cuDNN pick their fastest convolution kernels, which
        # work on channels-last data (NCHW input is reordered at every layer).
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SmallCNN(in_channels={self.in_channels}) expects images [B, "
                f"{self.in_channels}, H, W], got shape {tuple(x.shape)}"
            )
        return self.features(x.contiguous(memory_format=torch.channels_last))


class TorchvisionBackbone(nn.Module):
    """Any torchvision classification model with its classifier removed.

    Args:
        name: a model name known to `torchvision.models.get_model`, e.g. "resnet50".
        weights: torchvision weights name (e.g. "IMAGENET1K_V2") or None for random init.
            Weights are downloaded by torchvision only when you ask for them.
    """

    def __init__(self, name: str, weights: Optional[str] = None) -> None:
        super().__init__()
        _check_name("TorchvisionBackbone", name)
        try:
            import torchvision
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TorchvisionBackbone needs torchvision: pip install 'lightning-metric[vision]'"
            ) from err
        available = torchvision.models.list_models()
        if name not in available:
            raise ValueError(f"unknown torchvision model {name!r}; expected one of {available}")
        model = torchvision.models.get_model(name, weights=weights)
        self.num_features = _strip_classifier(model, name)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _check_name(owner: str, name: object) -> None:
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"{owner}(name=...) takes a model name string such as 'resnet50', got {name!r} of "
            f"type {type(name).__name__}"
        )


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the last classification layer with Identity; return its input width."""
    for attr in ("fc", "classifier", "heads", "head"):
        layer = getattr(model, attr, None)
        if layer is None:
            continue
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential):
            # Keep dropout / activation layers before the final Linear (e.g. VGG, MobileNet).
            idx = max(i for i, m in enumerate(layer) if isinstance(m, nn.Linear))
            linear = layer[idx]
            assert isinstance(linear, nn.Linear)
            layer[idx] = nn.Identity()
            return linear.in_features
    raise ValueError(f"cannot find the classifier of torchvision model {name!r} to remove")


class TimmBackbone(nn.Module):
    """Any timm model, created without its classifier (`num_classes=0`, pooled features).

    Args:
        name: a timm model name, e.g. "resnet50" or "vit_small_patch16_224".
        pretrained: load timm's pretrained weights (downloads them; off by default).
        in_chans: input channels.
    """

    def __init__(self, name: str, pretrained: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        _check_name("TimmBackbone", name)
        in_chans = check_int("in_chans", in_chans, minimum=1)
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TimmBackbone needs timm: pip install 'lightning-metric[vision]'"
            ) from err
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, in_chans=in_chans
        )
        self.num_features = int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
