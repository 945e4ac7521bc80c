"""export(..., dim=d): the exported graph returns the Matryoshka prefix of the embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import _model, _run

from lightning_metric.export import export, sidecar_path
from lightning_metric.retrieval.quantization import prefix


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_exported_prefix_equals_prefix_of_the_model(suffix: str, tmp_path: Path) -> None:
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    model = _model()
    example = torch.rand(2, 1, 16, 16)
    with pytest.warns(UserWarning, match="records no preprocessing"):
        path = export(model, tmp_path / f"model{suffix}", example, dim=8)
    x = torch.rand(9, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = prefix(model(x), 8).numpy()
    got = _run(path, x)
    assert got.shape == (9, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    side = json.loads(sidecar_path(path).read_text())
    assert (side["dim"], side["embedding_dim"], side["full_embedding_dim"]) == (8, 8, 16)


def test_full_export_records_no_prefix(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="records no preprocessing"):
        path = export(_model(), tmp_path / "model.pt", torch.rand(2, 1, 16, 16))
    side = json.loads(sidecar_path(path).read_text())
    assert (side["dim"], side["embedding_dim"], side["full_embedding_dim"]) == (None, 16, 16)


@pytest.mark.parametrize(
    ("dim", "error", "match"),
    [
        (17, ValueError, r"`dim`=17 is larger than the model's 16-d embeddings.*\[1, 16\]"),
        (0, ValueError, r"dim.*0"),
        (2.5, TypeError, r"dim.*2\.5"),
    ],
)
def test_bad_dim_is_refused_before_writing(
    dim: object, error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        export(_model(), tmp_path / "out" / "model.pt", torch.rand(2, 1, 16, 16), dim=dim)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
