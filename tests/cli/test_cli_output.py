"""What a user sees from the real console script: a quiet start, one closing summary, and
`predict` leaving a searchable index under the run's root dir without extra flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from repo_paths import ROOT

from lightning_metric.cli import INDEX_DIR
from lightning_metric.retrieval.index import EmbeddingIndex

DIGITS = str(ROOT / "examples" / "configs" / "digits_arcface.yaml")
EXE = str(Path(sys.executable).parent / "lightning-metric")
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
# Lines a user must not have to read: wandb's deprecation/git noise, Lightning's product tips.
NOISE = ("anonymous setting", "git root", "Tip:", "LeafSpec", "model summary", "Run history")


def lightning_metric(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env["WANDB_MODE"] = "offline"
    result = subprocess.run(
        [EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_fit_is_quiet_and_ends_with_one_summary_then_predict_writes_the_index(tmp_path):
    out = lightning_metric("fit", "--config", DIGITS, *SHORT, cwd=tmp_path)
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the output:\n{out}"
    assert sum(line.startswith("precision: ") for line in out.splitlines()) == 1
    lines = [line for line in out.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if "lightning-metric fit finished" in line)
    summary = "\n".join(lines[start:])  # the summary is the last thing printed
    assert "final validation metrics: " in summary and "val/recall@1=" in summary
    ckpt = tmp_path / "outputs" / "digits_arcface" / "checkpoints" / "best.ckpt"
    assert f"best checkpoint: {ckpt}" in summary and ckpt.is_file()
    assert "logs (WandbLogger): outputs/digits_arcface/wandb/offline-run-" in summary

    out = lightning_metric("predict", "--config", DIGITS, f"--ckpt_path={ckpt}", cwd=tmp_path)
    index_dir = tmp_path / "outputs" / "digits_arcface" / INDEX_DIR
    assert f"to {Path('outputs') / 'digits_arcface' / INDEX_DIR}" in out
    names = {p.name for p in index_dir.iterdir()}
    assert {"embeddings.npy", "ids.npy", "labels.npy", "index.faiss", "manifest.json"} <= names
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["info"]["model"]["checkpoint"] == str(ckpt)
    # The index holds the predict split (digits: the unseen test classes) and searches.
    index = EmbeddingIndex.load(index_dir)
    embeddings = np.load(index_dir / "embeddings.npy")
    assert len(index) == len(embeddings) > 0
    ids, _ = index.search(embeddings[:5], k=1)
    np.testing.assert_array_equal(ids[:, 0], np.load(index_dir / "ids.npy")[:5])
    # Running predict again replaces the run's own index rather than failing.
    lightning_metric("predict", "--config", DIGITS, f"--ckpt_path={ckpt}", cwd=tmp_path)
    assert len(EmbeddingIndex.load(index_dir)) == len(embeddings)


def test_help_starts_with_what_the_command_does(tmp_path):
    result = subprocess.run([EXE, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    description = result.stdout.split("\n\n")[1]
    assert description.startswith("Train and evaluate deep metric learning models")
    assert "predict" in description and "index" in description
