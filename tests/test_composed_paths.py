"""The paths users chain, end to end through the `lightning-metric` command, per data module.

fit -> test -> predict (a Flat and an IVF index) -> search (the stored items, and raw image
files) -> export (ONNX) -> onnxruntime on raw files. At every step the number is compared
with an independent one: ``search --evaluate`` with ``test``, the searched neighbours with a
brute-force ranking of the stored embeddings, raw files with the item they were written from,
the exported model with the in-process embeddings the index holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_metric.cli.console import main
from lightning_metric.data.preprocess import load_images
from lightning_metric.retrieval.index import EmbeddingIndex

pytestmark = pytest.mark.slow

CASES = ("digits", "glyphs", "folder")
METRIC_KEYS = ("recall@1", "recall@2", "map@r", "r_precision")


def _write_folder(root: Path, classes: int = 12, per_class: int = 6) -> Path:
    """Class folders of RGB images of different sizes: a class pattern plus noise per image."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        pattern = rng.integers(0, 256, (5, 5, 3))
        for i in range(per_class):
            h, w = 20 + (i % 3) * 3, 24 - (i % 2) * 4
            big = np.kron(pattern, np.ones((5, 5, 1)))[:h, :w]
            noisy = np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
            (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(root / f"class_{c:02d}" / f"{i}.png")
    return root


def _data(case: str, tmp: Path) -> tuple[dict[str, Any], int]:
    if case == "digits":
        return {"class_path": "lightning_metric.data.DigitsDataModule",
                "init_args": {"batch_size": 64, "seed": 0}}, 1  # fmt: skip
    if case == "glyphs":
        args = {"batch_size": 64, "image_size": 16, "max_classes": 40, "seed": 0,
                "cache_dir": str(tmp / "glyph_cache"), "num_workers": 0}  # fmt: skip
        return {"class_path": "lightning_metric.data.GlyphsDataModule", "init_args": args}, 1
    folder = _write_folder(tmp / "images")
    args = {"root": str(folder), "batch_size": 16, "num_workers": 0, "image_size": 16,
            "resize_size": 18, "seed": 0, "transforms": "resize", "val_fraction": 0.25, "test_fraction": 0.25}  # fmt: skip
    return {"class_path": "lightning_metric.data.ImageFolderDataModule", "init_args": args}, 3


def _config(case: str, root: Path) -> str:
    data, channels = _data(case, root)
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "default_root_dir": str(root),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning_metric.callbacks.RecallAtK",
                    "init_args": {"k": [1, 2, 4]},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "filename": "best",
                        "monitor": "val/recall@1",
                        "mode": "max",
                    },
                },
            ],  # fmt: skip
        },
        "model": {
            "class_path": "lightning_metric.MetricLearningModule",
            "init_args": {
                "backbone": {
                    "class_path": "lightning_metric.backbones.SmallCNN",
                    "init_args": {"in_channels": channels, "width": 8},
                },  # fmt: skip
                "embedding_dim": 16,
                "head": {
                    "class_path": "lightning_metric.heads.ArcFaceHead",
                    "init_args": {"scale": 16.0, "margin": 0.3},
                },  # fmt: skip
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.03}},
            },
        },
        "data": data,
    }
    path = root / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def _item_files(datamodule: Any, index: EmbeddingIndex, folder: Path) -> list[Path]:
    """One image file per indexed item: the item's own file, or a PNG of its stored pixels."""
    if index.paths is not None:
        return [Path(p) for p in index.paths]
    folder.mkdir()
    images = datamodule.dataset(datamodule.predict_split).images
    files = []
    for i in index.ids.tolist():
        pixels = images[i].numpy().astype(np.uint8)
        files.append(folder / f"{i}.png")
        Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(
            files[-1]
        )
    return files


@pytest.fixture(scope="module", params=CASES)
def shipped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    case = request.param
    root = tmp_path_factory.mktemp(case)
    config = _config(case, root)
    main(["fit", "--config", config])
    ckpt = root / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    cli = main(["test", "--config", config, f"--ckpt_path={ckpt}"])
    assert cli is not None
    tested = {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items()}
    # A trained model, so that ranking checks below compare meaningful lists (chance: <= 0.2).
    assert tested["recall@1"] >= 0.6, tested
    writer = "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter"
    for name, factory, extra in (
        ("flat", "Flat", []),
        ("ivf", "IVF4,Flat", ["--trainer.callbacks.nprobe=4"]),  # nprobe = nlist: exact
    ):
        main(["predict", "--config", config, f"--ckpt_path={ckpt}", writer,
              f"--trainer.callbacks.output_dir={root / name}",
              f"--trainer.callbacks.factory={factory}", *extra])  # fmt: skip
    model_out = root / "model.onnx"
    main(["export", "--config", config, "--ckpt_path", str(ckpt), "--output", str(model_out)])
    return {"case": case, "root": root, "config": config, "ckpt": ckpt, "tested": tested,
            "datamodule": cli.datamodule, "onnx": model_out}  # fmt: skip


@pytest.mark.parametrize("name", ["flat", "ivf"])
def test_evaluate_equals_test(shipped: dict[str, Any], name: str, tmp_path: Path) -> None:
    out = tmp_path / "evaluate.json"
    main(["search", "--index", str(shipped["root"] / name), "--config", shipped["config"],
          "--ckpt_path", str(shipped["ckpt"]), "--split", "test", "--evaluate",
          "--output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["factory"] == {"flat": "Flat", "ivf": "IVF4,Flat"}[name]
    metrics = result["metrics"]
    if name == "flat":
        for key in METRIC_KEYS:
            assert metrics[key] == pytest.approx(shipped["tested"][key], abs=1e-6), key
        return
    # IVF with every list probed scores each list with its own kernel: the score at every rank
    # equals Flat's, so the lists can differ only in the order of equal scores (duplicate
    # items), which moves the metrics by at most a few such swaps.
    assert result["search_params"] == {"nprobe": 4}
    flat = EmbeddingIndex.load(shipped["root"] / "flat")
    ivf = EmbeddingIndex.load(shipped["root"] / name)
    depth = min(len(flat), 32)
    a, b = flat.search(flat.embeddings, k=depth), ivf.search(flat.embeddings, k=depth)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(shipped["tested"][key], abs=2e-3), key


def test_stored_items_search_as_brute_force(shipped: dict[str, Any], tmp_path: Path) -> None:
    """The test split's items searched against the index of the same split: each item's list
    is the brute-force ranking of the other stored embeddings (its own entry left out)."""
    index = EmbeddingIndex.load(shipped["root"] / "flat")
    out = tmp_path / "stored.json"
    k = 4
    main(["search", "--index", str(index.directory), "--config", shipped["config"],
          "--ckpt_path", str(shipped["ckpt"]), "--split", "test", "--k", str(k),
          "--output", str(out)])  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(index)
    emb = torch.nn.functional.normalize(torch.from_numpy(index.embeddings), dim=1)
    sims = emb @ emb.T
    sims.fill_diagonal_(-float("inf"))
    expected = sims.topk(k, dim=1).values.numpy()
    row_of = {int(i): r for r, i in enumerate(index.ids.tolist())}
    for result in results:
        query_id = int(result["query"].split("[")[1].rstrip("]"))
        got = [n["score"] for n in result["neighbours"]]
        assert query_id not in [n["id"] for n in result["neighbours"]]
        np.testing.assert_allclose(got, expected[row_of[query_id]], atol=1e-5)


def test_raw_files_find_themselves_and_export_agrees(
    shipped: dict[str, Any], tmp_path: Path
) -> None:
    index = EmbeddingIndex.load(shipped["root"] / "flat")
    # Same-class neighbours sit within cosine 1e-3 or closer, so "finds itself" means the
    # item itself (or an exact duplicate of it) ranks first, not just a score near 1.
    gram = index.embeddings @ index.embeddings.T
    equivalent = gram >= 1 - 1e-6  # an item and its exact duplicates
    files = _item_files(shipped["datamodule"], index, tmp_path / "items")
    row_of = {int(i): r for r, i in enumerate(index.ids.tolist())}
    for name in ("flat", "ivf"):  # the exact index and the approximate one (nprobe = nlist)
        out = tmp_path / f"raw-{name}.json"
        main(["search", "--index", str(shipped["root"] / name), "--query", *map(str, files),
              "--k", "3", "--output", str(out)])  # fmt: skip
        results = json.loads(out.read_text())["results"]
        assert [r["query"] for r in results] == [str(f) for f in files]
        for row, result in enumerate(results):
            top = result["neighbours"][0]
            assert equivalent[row, row_of[top["id"]]], (name, result["query"], top)
            assert top["score"] == pytest.approx(1.0, abs=1e-4)
    # The exported model reads the same files, preprocessed from its own sidecar.
    import onnxruntime as ort

    sidecar = json.loads(Path(f"{shipped['onnx']}.json").read_text())
    x = load_images(files, sidecar["input"]).numpy()
    session = ort.InferenceSession(str(shipped["onnx"]), providers=["CPUExecutionProvider"])
    exported = np.asarray(session.run(None, {"input": x})[0])
    np.testing.assert_allclose(exported, index.embeddings, atol=1e-4)
