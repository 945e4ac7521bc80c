"""ONNX / TorchScript export: parity with the PyTorch module, dynamic batch, sidecar, errors."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.export import ExportError, export, sidecar_path
from lightning_metric.heads import ArcFaceHead


def _model(backbone: nn.Module | None = None) -> MetricLearningModule:
    torch.manual_seed(0)
    model = MetricLearningModule(
        backbone=backbone or SmallCNN(in_channels=1, width=8),
        embedding_dim=16,
        head=partial(ArcFaceHead),
        num_classes=5,
    )
    # BatchNorm statistics that are not the identity, so eval mode matters.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"input": x.numpy()})[0])
    return torch.jit.load(str(path))(x).detach().numpy()


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_model_equals_the_module(suffix: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _model()
    example = torch.rand(2, 1, 16, 16)
    with pytest.warns(UserWarning, match="records no preprocessing.*no data module"):
        path = model.export(tmp_path / f"model{suffix}", example)
    assert path == tmp_path / f"model{suffix}" and path.is_file()
    for batch in (64, 7):  # 7: a batch size not seen at export
        x = torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        got = _run(path, x)
        assert got.shape == (batch, 16)
        cos = (
            (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        )
        assert cos.min() >= 0.9999
        assert np.abs(got - expected).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    side = json.loads(sidecar_path(path).read_text())
    assert side["input"]["shape"] == [1, 16, 16] and side["input"]["dtype"] == "float32"
    assert side["input"]["dynamic_batch"] is True
    # no data module: no record (a guessed one could be silently wrong), and the reason
    assert side["input"]["preprocessing"] is None
    assert "no data module" in side["input"]["preprocessing_unknown"]
    assert side["embedding_dim"] == 16 and side["metric"] == "cosine"
    assert side["export_format"] == {".onnx": "onnx", ".pt": "torchscript"}[suffix]
    assert model.training is False


class EighBackbone(nn.Module):
    """An operator ONNX has no kernel for (a symmetric eigendecomposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.flatten(2)).transpose(1, 2)  # [B, 4, C*H]
        gram = h @ h.transpose(1, 2)
        return torch.linalg.eigh(gram).eigenvalues[..., None, None]


class FrozenBackbone(nn.Module):
    """Goes through Python values: the trace freezes the example input into constants."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.flatten(1)[:, :8].tolist())[..., None, None]


def test_unexportable_backbone_names_the_module_and_the_other_format(tmp_path: Path) -> None:
    model = _model(EighBackbone())
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ExportError, match=r"backbone \(EighBackbone\).*\.pt \(TorchScript\)"):
        export(model, tmp_path / "m.onnx", x)


def test_a_trace_that_froze_the_input_is_refused(tmp_path: Path) -> None:
    model = _model(FrozenBackbone())
    with pytest.raises(ExportError, match="does not reproduce the model|cannot be run"):
        export(model, tmp_path / "m.pt", torch.rand(2, 1, 4, 4))


def test_bad_suffix_and_example(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"\.onnx or \.pt"):
        export(model, tmp_path / "m.bin", torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="example_input must be a batch"):
        export(model, tmp_path / "m.pt", torch.rand(16))
