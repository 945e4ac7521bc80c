"""The predict writer and `lightning-metric search` with a prefix dim, int8 / binary codes and
re-scoring: what they write and score equals the index searched by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import CONFIGS
from test_search_evaluate import brute_force
from tiny_digits import tiny_index

from lightning_metric.callbacks import EmbeddingIndexWriter
from lightning_metric.cli.console import main
from lightning_metric.cli.search_evaluate import evaluate
from lightning_metric.retrieval.index import EmbeddingIndex

CONFIG = str(CONFIGS / "digits_arcface.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        ckpt, out = tiny_index(root, "dim=16", "precision=binary", "rescore_multiplier=2")
    return {"ckpt": ckpt, "index": out}


def _evaluate(built: dict[str, Path], tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "eval.json"
    main(["search", "--index", str(built["index"]), "--config", CONFIG, "--ckpt_path",
          str(built["ckpt"]), "--evaluate", "--k", "3", "--trainer.precision=32-true",
          "--output", str(out), *extra])  # fmt: skip
    return json.loads(out.read_text())


def test_writer_records_the_options_and_search_scores_the_codes(
    built: dict[str, Path], tmp_path: Path
) -> None:
    manifest = json.loads((built["index"] / "manifest.json").read_text())
    assert (manifest["precision"], manifest["dim"], manifest["rescore_multiplier"]) == (
        "binary", 16, 2,
    )  # fmt: skip
    got = _evaluate(built, tmp_path)
    assert (got["precision"], got["dim"], got["rescore_multiplier"]) == ("binary", 16, 2)
    expected = brute_force(EmbeddingIndex.load(built["index"]), got["evaluation"]["depth"])
    for key, value in expected.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-12), key
    # --rescore_multiplier overrides the manifest for this search only.
    deeper = _evaluate(built, tmp_path, "--rescore_multiplier", "7")
    assert deeper["rescore_multiplier"] == 7
    index = EmbeddingIndex.load(built["index"])
    index.set_rescore_multiplier(7)
    expected = brute_force(index, deeper["evaluation"]["depth"])
    for key, value in expected.items():
        assert deeper["metrics"][key] == pytest.approx(value, abs=1e-12), key
    assert EmbeddingIndex.load(built["index"]).rescore_multiplier == 2


def test_evaluate_ranks_hamming_distances_ascending() -> None:
    """Without re-scoring a binary index's scores are distances: fewer differing bits first."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 16)).astype(np.float32)
    labels = np.repeat(np.arange(6), 10)
    index = EmbeddingIndex(x, labels=labels, precision="binary")
    metrics, _ = evaluate(index, torch.from_numpy(x), torch.from_numpy(labels), np.arange(60))
    bits = x > 0
    cost = (bits[:, None, :] != bits[None]).sum(-1).astype(float)
    np.fill_diagonal(cost, np.inf)  # a query never retrieves itself
    first = np.argsort(cost, axis=1, kind="stable")[:, 0]
    assert metrics["recall@1"] == pytest.approx(float((labels[first] == labels).mean()))


def test_writer_refuses_bad_options_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"precision.*'int4'"):
        EmbeddingIndexWriter(str(tmp_path), precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`rescore_multiplier`=2 .*float32"):
        EmbeddingIndexWriter(str(tmp_path), rescore_multiplier=2)
    with pytest.raises(ValueError, match=r"dim.*0"):
        EmbeddingIndexWriter(str(tmp_path), dim=0)
    with pytest.raises(ValueError, match=r"'HNSW32' does not fit precision 'int8'"):
        EmbeddingIndexWriter(str(tmp_path), precision="int8", factory="HNSW32")
