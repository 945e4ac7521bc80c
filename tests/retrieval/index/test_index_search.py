"""predict (CLI) -> index directory -> EmbeddingIndex.load -> search, and bad index directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import CONFIGS

from lightning_metric.cli import main
from lightning_metric.retrieval import knn
from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError

CONFIG = str(CONFIGS / "digits_arcface.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step digits model trained and then predicted through the CLI."""
    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the config's checkpoint dirpath is relative to the working dir
        return _fit_and_predict(root)


def _fit_and_predict(root: Path) -> dict[str, Path]:
    main(
        args=[
            "fit",
            "--config",
            CONFIG,
            *QUIET,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    (ckpt,) = root.rglob("*.ckpt")
    out = root / "index"
    main(
        args=[
            "predict",
            "--config",
            CONFIG,
            *QUIET,
            f"--trainer.default_root_dir={root}",
            "--trainer.limit_predict_batches=3",
            # fp32 like the model the search tests embed queries with (the run-time default
            # would be bf16 on a CPU with native bf16, whose rounding reorders near-ties).
            "--trainer.precision=32-true",
            "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
            f"--trainer.callbacks.output_dir={out}",
            f"--ckpt_path={ckpt}",
            "--weights_only=true",
        ]
    )
    return {"root": root, "ckpt": ckpt, "index": out}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_predict_writes_manifest_and_arrays(predicted: dict[str, Path]) -> None:
    out = predicted["index"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 3 * 64
    assert manifest["embedding_dim"] == 32
    assert manifest["metric"] == "cosine"
    assert manifest["info"]["model"]["checkpoint"] == str(predicted["ckpt"])
    assert manifest["info"]["data"]["predict_split"] == "test"
    emb = np.load(out / "embeddings.npy", allow_pickle=False)
    assert emb.shape == (192, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # ids are the dataset positions of the first three eval batches, in order
    np.testing.assert_array_equal(np.load(out / "ids.npy"), np.arange(192))
    labels = np.load(out / "labels.npy")
    assert labels.min() >= 0 and labels.max() <= 4 and len(np.unique(labels)) == 5


def test_search_matches_retrieval_knn(predicted: dict[str, Path]) -> None:
    index = EmbeddingIndex.load(predicted["index"])
    emb = torch.from_numpy(index.embeddings)
    expected = knn(emb[:40], emb, k=6)
    ids, scores = index.search(emb[:40], k=6)
    np.testing.assert_array_equal(ids, index.ids[expected.indices.numpy()])
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-6)
    # leave-one-out view: the first hit is the query itself
    np.testing.assert_array_equal(ids[:, 0], index.ids[:40])


def test_search_inputs_with_checkpoint_model(predicted: dict[str, Path]) -> None:
    cli = main(args=["--config", CONFIG, *QUIET], run=False)
    assert cli is not None
    model = cli.model
    state = torch.load(predicted["ckpt"], map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    index = EmbeddingIndex.load(predicted["index"], model=model)
    datamodule = cli.datamodule
    test_set = datamodule.dataset("test")  # type: ignore[attr-defined]
    batch = test_set._batch(torch.arange(10))
    by_inputs = index.search(batch["x"], k=3)
    by_embeddings = index.search(index.embeddings[:10], k=3, inputs=False)
    np.testing.assert_array_equal(by_inputs.ids, by_embeddings.ids)
    np.testing.assert_allclose(by_inputs.scores, by_embeddings.scores, atol=1e-5)


def test_add_save_reload(predicted: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(predicted["index"], tmp_path / "index")
    index = EmbeddingIndex.load(directory)
    new = torch.nn.functional.normalize(
        torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    )
    new_ids = index.add(new, labels=[7, 7, 8])
    np.testing.assert_array_equal(new_ids, [192, 193, 194])
    index.save()
    again = EmbeddingIndex.load(directory)
    assert len(again) == 195
    assert json.loads((directory / "manifest.json").read_text())["count"] == 195
    ids, scores = again.search(new, k=1)
    np.testing.assert_array_equal(ids[:, 0], new_ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(again.labels[-3:], [7, 7, 8])
    with pytest.raises(ValueError, match=r"unique.*\[5\]"):
        again.add(new[:1], ids=[5])


def test_l2_and_ties_follow_knn() -> None:
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.cat([base, base])  # every row has an exact duplicate: ties everywhere
    index = EmbeddingIndex(emb, ids=np.arange(100, 112), metric="l2")
    # exclude=-1 everywhere: the plain search (knn(emb, emb) alone would drop self-matches).
    expected = knn(emb, emb, k=4, metric="l2", exclude=torch.full((12,), -1))
    ids, scores = index.search(emb, k=4)
    np.testing.assert_array_equal(ids, 100 + expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)


def test_writer_refuses_to_overwrite(predicted: dict[str, Path]) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        main(
            args=[
                "predict",
                "--config",
                CONFIG,
                *QUIET,
                "--trainer.limit_predict_batches=1",
                "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
                f"--trainer.callbacks.output_dir={predicted['index']}",
            ]
        )


# -- bad index directories --------------------------------------------------------------------


def test_missing_directory_and_manifest(predicted: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingIndex.load(tmp_path / "nope")
    directory = _copy(predicted["index"], tmp_path / "index")
    (directory / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match=r"missing .*manifest\.json"):
        EmbeddingIndex.load(directory)


def test_mismatched_dimension(predicted: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(predicted["index"], tmp_path / "index")
    np.save(directory / "embeddings.npy", np.zeros((192, 16), dtype=np.float32))
    with pytest.raises(IndexFormatError, match=r"embeddings\.npy.*\(192, 16\).*\(192, 32\)"):
        EmbeddingIndex.load(directory, verify=False)


def test_manifest_disagrees_with_faiss_file(predicted: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(predicted["index"], tmp_path / "index")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["metric"] = "l2"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=r"index\.faiss.*metric 'l2'"):
        EmbeddingIndex.load(directory)


def test_corrupt_faiss_file(predicted: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(predicted["index"], tmp_path / "index")
    (directory / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(IndexFormatError, match=r"cannot read FAISS index .*index\.faiss"):
        EmbeddingIndex.load(directory, verify=False)


def test_pickled_arrays_are_refused(predicted: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(predicted["index"], tmp_path / "index")
    np.save(directory / "ids.npy", np.array([object()] * 192), allow_pickle=True)
    with pytest.raises(IndexFormatError, match=r"ids\.npy"):
        EmbeddingIndex.load(directory)


def test_query_and_model_dimension_errors(predicted: dict[str, Path]) -> None:
    index = EmbeddingIndex.load(predicted["index"])
    with pytest.raises(ValueError, match="dimension 16, but the index holds 32-d"):
        index.search(np.zeros((2, 16), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="needs a model"):
        index.search(torch.zeros(2, 1, 8, 8), k=1)
    with pytest.raises(ValueError, match="k=1000 is larger than the number of indexed items"):
        index.search(index.embeddings[:1], k=1000)
    model = torch.nn.Linear(3, 3)
    model.embedding_dim = 64  # type: ignore[assignment]
    with pytest.raises(ValueError, match="64-d embeddings but the index holds 32-d"):
        index.attach_model(model)
