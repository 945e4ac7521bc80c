"""`lightning-metric export` / `search`: a digits model trained, predicted, exported, searched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import CONFIGS
from tiny_digits import tiny_index

from lightning_metric.cli.console import main
from lightning_metric.data.preprocess import load_images
from lightning_metric.retrieval.index import EmbeddingIndex

CONFIG = str(CONFIGS / "digits_arcface.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ship")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        ckpt, out = tiny_index(root, "factory=HNSW32", "ef_search=64")
    return {"root": root, "ckpt": ckpt, "index": out}


def test_predict_writes_the_factory_and_the_input_description(trained: dict[str, Path]) -> None:
    manifest = json.loads((trained["index"] / "manifest.json").read_text())
    assert manifest["factory"] == "HNSW32" and manifest["search_params"] == {"ef_search": 64}
    pre = manifest["info"]["input"]
    assert pre["shape"] == [1, 8, 8] and pre["preprocessing"]["scale"] == 1 / 16
    assert EmbeddingIndex.load(trained["index"]).factory == "HNSW32"


def test_search_images_from_the_manifest_model(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    index = EmbeddingIndex.load(trained["index"])
    folder = tmp_path / "queries"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((8, 8)) * 16).astype("uint8")).save(folder / f"{i}.png")
    out = tmp_path / "hits.json"
    main(["search", "--index", str(trained["index"]), "--query", str(folder), "--k", "4",
          "--output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["query"] for r in result["results"]] == [str(folder / f"{i}.png") for i in range(3)]
    # the same neighbours as embedding the preprocessed images with the checkpoint's model
    from lightning_metric import MetricLearningModule

    model = MetricLearningModule.load_from_checkpoint(trained["ckpt"], map_location="cpu").eval()
    x = load_images(sorted(folder.iterdir()), index.info["input"])
    assert torch.equal(
        x[0, 0], torch.from_numpy(np.asarray(Image.open(folder / "0.png")) / 16.0).float()
    )
    with torch.no_grad():
        expected = index.search(model(x), k=4)
    got = np.array([[n["id"] for n in r["neighbours"]] for r in result["results"]])
    np.testing.assert_array_equal(got, expected.ids)
    labels = dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True))
    assert all(n["label"] == labels[n["id"]] for r in result["results"] for n in r["neighbours"])
    csv_out = tmp_path / "hits.csv"
    main(["search", "--index", str(trained["index"]), "--query", str(folder / "1.png"),
          "--output", str(csv_out), "--k", "2", "--ef_search", "128"])  # fmt: skip
    rows = list(csv.DictReader(csv_out.open()))
    assert [r["rank"] for r in rows] == ["1", "2"] and rows[0]["id"] == str(got[1, 0])


def test_search_evaluate_scores_the_hnsw_index_as_it_searches(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from test_search_evaluate import brute_force

    out = tmp_path / "eval.json"
    result = main(
        ["search", "--index", str(trained["index"]), "--config", CONFIG, "--ckpt_path",
         str(trained["ckpt"]), "--evaluate", "--k", "3", "--trainer.precision=32-true",
         "--output", str(out)]
    )  # fmt: skip
    assert result is None
    printed = capsys.readouterr().out
    assert "searched index 'HNSW32' with ef_search=64 (manifest)" in printed
    got = json.loads(out.read_text())
    assert got["evaluation"]["search_params"] == {"ef_search": 64}
    # the metrics of the HNSW graph's own neighbour lists, not of the exact vectors
    expected = brute_force(EmbeddingIndex.load(trained["index"]), got["evaluation"]["depth"])
    for key, value in expected.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-12), key


def test_export_command_writes_a_checked_model(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    main(["export", "--config", CONFIG, "--ckpt_path", str(trained["ckpt"]), "--output", str(out),
          "--trainer.max_epochs=1"])  # fmt: skip
    side = json.loads((tmp_path / "model.pt.json").read_text())
    assert side["input"]["shape"] == [1, 8, 8] and side["embedding_dim"] == 32
    assert side["input"]["preprocessing"]["scale"] == 1 / 16
    assert side["checkpoint"] == str(trained["ckpt"].resolve())
    assert torch.jit.load(str(out))(torch.rand(5, 1, 8, 8)).shape == (5, 32)


def test_help_and_bad_invocations(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for command in ("export", "search"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert f"lightning-metric {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    text = capsys.readouterr().out
    assert "lightning-metric export" in text and "lightning-metric search" in text
    with pytest.raises(SystemExit, match="pass --query"):
        main(["search", "--index", str(_tiny_index(tmp_path))])
    with pytest.raises(SystemExit):
        main(["search", "--index", "x", "--bogus"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["search", "--index", str(tmp_path / "none"), "--query", "a.png"])


def _tiny_index(tmp_path: Path) -> Path:
    return EmbeddingIndex(np.eye(4, dtype=np.float32)).save(tmp_path / "tiny")


def test_queries_without_a_dataset_index_get_id_minus_one() -> None:
    """Ids of a loader whose batches carry no ``index`` are -1 for every query: a per-batch
    count would repeat ids across batches and pass queries off as indexed items."""
    from lightning_metric.retrieval.index import embed_loader as _embed_loader

    x, labels = torch.randn(10, 4), torch.arange(10) % 3
    dicts = [{"x": x[i : i + 4], "label": labels[i : i + 4]} for i in range(0, 10, 4)]
    as_tuples = [(x[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]
    indexed = [
        {"x": x[i : i + 4], "label": labels[i : i + 4], "index": torch.arange(i, min(i + 4, 10))}
        for i in range(0, 10, 4)
    ]
    model = torch.nn.Identity()
    for loader in (dicts, as_tuples):
        embeddings, got_labels, ids = _embed_loader(model, loader)
        torch.testing.assert_close(embeddings, x)
        torch.testing.assert_close(got_labels, labels)
        assert ids.tolist() == [-1] * 10
    assert _embed_loader(model, indexed)[2].tolist() == list(range(10))


def test_queries_from_the_indexed_split_do_not_list_themselves(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "hits.json"
    main(
        ["search", "--index", str(trained["index"]), "--config", CONFIG, "--ckpt_path",
         str(trained["ckpt"]), "--k", "3", "--output", str(out), "--trainer.precision=32-true"]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    index = EmbeddingIndex.load(trained["index"])
    own = np.array([int(r["query"].removeprefix("test[").rstrip("]")) for r in results])
    assert np.isin(own, index.ids).all()  # the queries are indexed items
    got = np.array([[n["id"] for n in r["neighbours"]] for r in results])
    assert got.shape == (len(own), 3) and not (got == own[:, None]).any()
    # The same lists as a plain search of the stored vectors, with each query's own id left out.
    rows = np.searchsorted(index.ids, own)  # ids are sorted: they are dataset indexes
    raw = index.search(index.embeddings[rows], k=4).ids
    want = np.array([[i for i in row if i != q][:3] for row, q in zip(raw, own, strict=True)])
    assert (got == want).all()
