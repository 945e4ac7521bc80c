"""The compact path users chain, end to end through the `lightning-metric` command, on a folder
of image files: fit with ``matryoshka_dims`` -> predict into a binary index of the 8-d prefix
(re-scored) and an approximate int8 one (IVF, SQ8) -> search with the raw files -> export the
8-d prefix (ONNX) -> onnxruntime on the raw files -> resume with a changed flag.

Each answer is checked against an independent one: the index stores the model's full
embedding of each file and searches its L2-normalised 8-d prefix; the raw files find their own
items; the exported model's output equals that prefix; the resumed run equals the run that was
never interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_composed_paths import _config

from lightning_metric.cli.console import main
from lightning_metric.data.preprocess import load_images
from lightning_metric.retrieval.index import EmbeddingIndex
from lightning_metric.retrieval.quantization import calibrate, dequantize_int8, quantize_int8

pytestmark = pytest.mark.slow

DIM = 8
MATRYOSHKA = "--model.init_args.matryoshka_dims=[8, 16]"


def _with_last(config: str, root: Path) -> str:
    """``config`` writing into ``root``, keeping last.ckpt as well (resumes start from it)."""
    data = yaml.safe_load(Path(config).read_text())
    data["trainer"]["callbacks"][1]["init_args"]["save_last"] = True
    data["trainer"]["default_root_dir"] = str(root)
    data["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(root / "checkpoints")
    root.mkdir(parents=True, exist_ok=True)
    path = root / "compact.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compact")
    config = _with_last(_config("folder", root), root)
    cli = main(["fit", "--config", config, MATRYOSHKA])
    assert cli is not None and cli.model.matryoshka.dims == (8, 16)
    ckpt = root / "checkpoints" / "best.ckpt"
    writer = "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter"
    for name, options in (
        ("binary", ["--trainer.callbacks.precision=binary",
                    "--trainer.callbacks.rescore_multiplier=4"]),
        ("ivf-int8", ["--trainer.callbacks.precision=int8",
                      "--trainer.callbacks.factory=IVF4,SQ8",
                      "--trainer.callbacks.nprobe=4"]),
    ):  # fmt: skip
        main(["predict", "--config", config, MATRYOSHKA, f"--ckpt_path={ckpt}", writer,
              f"--trainer.callbacks.output_dir={root / name}",
              f"--trainer.callbacks.dim={DIM}", *options])  # fmt: skip
    onnx = root / "model-d8.onnx"
    main(["export", "--config", config, MATRYOSHKA, "--ckpt_path", str(ckpt),
          "--output", str(onnx), "--dim", str(DIM)])  # fmt: skip
    return {"root": root, "config": config, "ckpt": ckpt, "onnx": onnx}


def _prefix(embeddings: np.ndarray) -> np.ndarray:
    prefix = torch.from_numpy(np.array(embeddings[:, :DIM]))
    return torch.nn.functional.normalize(prefix, dim=1).numpy()


def test_indexes_hold_the_models_embeddings_of_the_files(shipped: dict[str, Any]) -> None:
    """What predict stored is the model's full embedding of each file (the prefix is taken at
    search), and each index records the dim and precision it was asked for."""
    from lightning_metric import MetricLearningModule

    model = MetricLearningModule.load_from_checkpoint(shipped["ckpt"], map_location="cpu").eval()
    for name, precision in (("binary", "binary"), ("ivf-int8", "int8")):
        index = EmbeddingIndex.load(shipped["root"] / name)
        assert (index.dim, index.index_dim, index.precision) == (16, DIM, precision)
        assert index.paths is not None
        sidecar = json.loads(Path(f"{shipped['onnx']}.json").read_text())
        x = load_images([Path(p) for p in index.paths], sidecar["input"])
        with torch.no_grad():
            full = model(x).numpy()
        np.testing.assert_allclose(index.embeddings, full, atol=1e-5)


@pytest.mark.parametrize("name", ["binary", "ivf-int8"])
def test_raw_files_find_themselves(shipped: dict[str, Any], name: str, tmp_path: Path) -> None:
    index = EmbeddingIndex.load(shipped["root"] / name)
    files = [Path(p) for p in index.paths]
    # An item and its exact duplicates (same-class images may coincide at 8 dims).
    prefix = _prefix(index.embeddings)
    equivalent = prefix @ prefix.T >= 1 - 1e-6
    row_of = {int(i): r for r, i in enumerate(index.ids.tolist())}
    out = tmp_path / f"{name}.json"
    main(["search", "--index", str(shipped["root"] / name), "--query", *map(str, files),
          "--k", "3", "--output", str(out)])  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [r["query"] for r in results] == [str(f) for f in files]
    if name == "binary":
        # Re-scored in float: the exact cosine of the prefixes, so each file finds its item.
        for row, result in enumerate(results):
            top = result["neighbours"][0]
            assert equivalent[row, row_of[top["id"]]], (name, result["query"], top)
            assert top["score"] == pytest.approx(1.0, abs=1e-4)
        return
    # int8: the float prefix of each file against the decoded codes of the stored prefixes,
    # with ranges from the stored items (never from the queries); IVF with nprobe = nlist
    # visits every list, so the lists are those of the brute force over the codes (a
    # same-class item may beat the file's own item by quantization: cosines here reach 0.99998).
    calibration = calibrate(torch.from_numpy(prefix))
    assert index.calibration is not None
    torch.testing.assert_close(index.calibration.low, calibration.low)
    torch.testing.assert_close(index.calibration.high, calibration.high)
    decoded = dequantize_int8(quantize_int8(torch.from_numpy(prefix), calibration), calibration)
    expected = torch.from_numpy(prefix) @ decoded.T
    for row, result in enumerate(results):
        got = [n["score"] for n in result["neighbours"]]
        want = expected[row].topk(3).values.numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        for n in result["neighbours"]:
            assert float(expected[row, row_of[n["id"]]]) == pytest.approx(n["score"], abs=1e-5)


def test_exported_prefix_equals_the_indexed_prefix(shipped: dict[str, Any]) -> None:
    import onnxruntime as ort

    index = EmbeddingIndex.load(shipped["root"] / "binary")
    sidecar = json.loads(Path(f"{shipped['onnx']}.json").read_text())
    assert sidecar["dim"] == DIM
    x = load_images([Path(p) for p in index.paths], sidecar["input"]).numpy()
    session = ort.InferenceSession(str(shipped["onnx"]), providers=["CPUExecutionProvider"])
    exported = np.asarray(session.run(None, {"input": x})[0])
    assert exported.shape == (len(index), DIM)
    np.testing.assert_allclose(exported, _prefix(index.embeddings), atol=1e-4)


def test_resume_with_more_epochs_equals_the_uninterrupted_run(
    shipped: dict[str, Any], tmp_path: Path
) -> None:
    """The 3-epoch Matryoshka run resumed with --trainer.max_epochs=4 ends with the weights of
    a 4-epoch run from scratch."""
    last = shipped["root"] / "checkpoints" / "last.ckpt"
    resumed = main(["fit", "--config", _with_last(shipped["config"], tmp_path / "resumed"),
                    MATRYOSHKA, "--trainer.max_epochs=4", "--ckpt_path", str(last)])  # fmt: skip
    whole = main(["fit", "--config", _with_last(shipped["config"], tmp_path / "whole"),
                  MATRYOSHKA, "--trainer.max_epochs=4"])  # fmt: skip
    assert resumed is not None and whole is not None
    assert resumed.trainer.current_epoch == whole.trainer.current_epoch == 4
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
