"""`search --evaluate` scores the index it names; every index records where it came from.

A digits model is trained for two steps, and its test split is indexed twice (Flat and
IVF4,Flat, 4 lists): Flat must score as `lightning-metric test` does, IVF with every list
probed as Flat, and IVF with one list as a brute-force count over its own search output.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from repo_paths import CONFIGS

from lightning_metric.cli.console import main
from lightning_metric.retrieval import neighbour_list_metrics, retrieval_metrics
from lightning_metric.retrieval.index import EmbeddingIndex

CONFIG = str(CONFIGS / "digits_arcface.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
FP32 = "--trainer.precision=32-true"


def _predict(root: Path, ckpt: Path, out: Path, *extra: str) -> Path:
    main(["predict", "--config", CONFIG, *QUIET, f"--trainer.default_root_dir={root}", FP32,
          "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
          f"--trainer.callbacks.output_dir={out}", *extra, f"--ckpt_path={ckpt}"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        # One epoch (14 steps): two steps leave all embeddings within cosine 1e-5 of each
        # other, where float rounding alone reorders neighbours between FAISS kernels.
        # fp32 everywhere: the CLI picks bf16 on CPUs that run it natively, and the model
        # (hence which neighbours each IVF list holds) would depend on the machine.
        main(["fit", "--config", CONFIG, *QUIET, f"--trainer.default_root_dir={root}",
              "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", FP32])  # fmt: skip
        (ckpt,) = root.rglob("*.ckpt")
        flat = _predict(root, ckpt, root / "flat")
        ivf = _predict(root, ckpt, root / "ivf", "--trainer.callbacks.factory=IVF4,Flat")
    # Another model: the same architecture with other weights (a retrained best.ckpt).
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for name, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][name] = value + 0.05 * torch.randn_like(value)
    other = root / "other.ckpt"
    torch.save(state, other)
    return {"root": root, "ckpt": ckpt, "flat": flat, "ivf": ivf, "other": other}


def _search(index: Path, ckpt: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}.json"
    main(["search", "--index", str(index), "--config", CONFIG, "--ckpt_path", str(ckpt),
          "--evaluate", "--output", str(out), FP32, *extra])  # fmt: skip
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _close(a: dict[str, float], b: dict[str, float], keys: list[str], tol: float = 1e-12) -> None:
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=tol), key


def test_flat_evaluate_equals_the_test_command_and_retrieval_metrics(
    built: dict[str, Path], tmp_path: Path
) -> None:
    got = _search(built["flat"], built["ckpt"], tmp_path)
    index = EmbeddingIndex.load(built["flat"])
    assert got["evaluation"]["queries_in_index"] == len(index) == got["evaluation"]["queries"]
    # every test item queries all the others: leave-one-out over the stored embeddings
    expected = retrieval_metrics(
        torch.from_numpy(index.embeddings), torch.from_numpy(index.labels), k=(1, 2, 4, 8)
    )
    keys = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "mrr"]
    _close(got["metrics"], expected, keys)
    assert got["metrics"]["recall@1"] < 1.0  # no query found itself
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(built["root"])
        cli = main(["test", "--config", CONFIG, *QUIET, FP32, f"--ckpt_path={built['ckpt']}",
                    f"--trainer.default_root_dir={built['root']}"])  # fmt: skip
    assert cli is not None
    logged = {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items()}
    _close(got["metrics"], logged, ["recall@1", "recall@4", "map@r"], tol=1e-6)


def test_ivf_probing_every_list_equals_flat(built: dict[str, Path], tmp_path: Path) -> None:
    flat = _search(built["flat"], built["ckpt"], tmp_path)
    full = _search(built["ivf"], built["ckpt"], tmp_path, "--nprobe", "4")
    assert full["factory"] == "IVF4,Flat" and full["evaluation"]["search_params"] == {"nprobe": 4}
    assert full["search_params_from"] == {"nprobe": "--nprobe"}
    # IVF sums each inner product in another order than Flat (and the order depends on the
    # thread count): equal scores may differ in the last bit, so near-ties can swap places.
    _close(full["metrics"], flat["metrics"], list(flat["metrics"]), tol=1e-4)


def brute_force(index: EmbeddingIndex, depth: int, **params: int) -> dict[str, float]:
    """recall@k and MAP@R counted by hand from ``index.search`` of its own items."""
    found = index.search(index.embeddings, k=depth, **params)
    assert (index.ids == np.arange(len(index))).all()  # ids are rows: ties go to the lower
    label_of = dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True))
    recall: dict[int, list[bool]] = {k: [] for k in (1, 2, 4, 8)}
    aps = []
    for own, ids, scores in zip(index.ids.tolist(), found.ids, found.scores, strict=True):
        row = [i for _, i in sorted(zip((-scores).tolist(), ids.tolist(), strict=True))]
        label = label_of[own]
        hits = [i != -1 and label_of[i] == label for i in row if i != own][: depth - 1]
        for k in recall:
            recall[k].append(any(hits[:k]))
        r = int((index.labels == label).sum()) - 1
        found, precisions = 0, []
        for rank, hit in enumerate(hits[:r], start=1):
            if hit:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / r)
    return {**{f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}, "map@r": np.mean(aps)}


def test_ivf_one_probe_equals_brute_force_over_its_own_lists(
    built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got = _search(built["ivf"], built["ckpt"], tmp_path, "--nprobe", "1")
    printed = capsys.readouterr().out
    assert "searched index 'IVF4,Flat' with nprobe=1 (--nprobe)" in printed
    index = EmbeddingIndex.load(built["ivf"])
    depth = got["evaluation"]["depth"]
    assert depth == int(np.bincount(index.labels).max())  # R_max + 1 (the own entry)
    expected = brute_force(index, depth, nprobe=1)
    _close(got["metrics"], expected, list(expected))
    full = _search(built["ivf"], built["ckpt"], tmp_path, "--nprobe", "4")
    _close(full["metrics"], brute_force(index, depth, nprobe=4), list(expected))
    # one list of four misses neighbours: the index is scored as it searches (whether that
    # raises or lowers a metric depends on how the lists fall; that it changes them does not)
    assert got["metrics"] != full["metrics"]


def test_neighbour_list_metrics_equal_retrieval_metrics_on_exact_lists() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    labels = torch.arange(60) % 4
    from lightning_metric.retrieval import knn

    depth = 15  # R = 14 for every query
    lists = knn(x, k=depth).indices
    got = neighbour_list_metrics(labels[lists], labels, torch.full((60,), 14), k=(1, 2, 4, 8))
    want = retrieval_metrics(x, labels, k=(1, 2, 4, 8))
    _close(got, want, list(want))
    # a missing neighbour (-1) is a miss, never a hit of label -1 or of anything else
    missing = labels[lists].clone()
    missing[:, 0] = -1
    worse = neighbour_list_metrics(missing, labels, torch.full((60,), 14), k=1, map_at_r=False)
    first_hit = (labels[lists][:, 0] == labels).double().mean()
    assert worse["recall@1"] == 0.0 < float(first_hit)
    with pytest.raises(ValueError, match=r"holds 15 neighbours per query, but 16 are needed"):
        neighbour_list_metrics(labels[lists], labels, torch.full((60,), 16))


# -- provenance -------------------------------------------------------------------------------


def test_the_manifest_records_checkpoint_hash_and_data(built: dict[str, Path]) -> None:
    info = json.loads((built["flat"] / "manifest.json").read_text())["info"]
    sha = hashlib.sha256(built["ckpt"].read_bytes()).hexdigest()
    assert info["model"]["checkpoint"] == str(built["ckpt"].resolve())
    assert info["model"]["checkpoint_sha256"] == sha and info["model"]["weights"] == "checkpoint"
    from lightning_metric.data import DigitsDataModule

    data = DigitsDataModule()
    data.setup("test")
    assert info["data"]["class_path"] == "lightning_metric.data.digits.DigitsDataModule"
    assert info["data"]["predict_split"] == "test"
    count = json.loads((built["flat"] / "manifest.json").read_text())["count"]
    assert info["data"]["dataset_size"] == len(data.dataset("test")) == count  # type: ignore[attr-defined]


def test_predict_without_a_checkpoint_refuses_and_keeps_the_index(
    built: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "run"
    default = root / "index"
    shutil.copytree(built["flat"], default)
    before = (default / "embeddings.npy").read_bytes()
    with pytest.raises(ValueError, match=r"untrained model.*--ckpt_path.*allow_untrained"):
        main(["predict", "--config", CONFIG, *QUIET, f"--trainer.default_root_dir={root}"])
    assert (default / "embeddings.npy").read_bytes() == before
    # asked for: written, and the manifest says so
    out = root / "untrained"
    main(["predict", "--config", CONFIG, *QUIET, f"--trainer.default_root_dir={root}",
          "--trainer.limit_predict_batches=1",
          "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
          f"--trainer.callbacks.output_dir={out}",
          "--trainer.callbacks.allow_untrained=true"])  # fmt: skip
    model = json.loads((out / "manifest.json").read_text())["info"]["model"]
    assert model["checkpoint"] is None and "allow_untrained" in model["weights"]


def test_the_default_index_is_replaced_by_the_same_checkpoint_only(
    built: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "run"
    args = ["predict", "--config", CONFIG, *QUIET, f"--trainer.default_root_dir={root}",
            "--trainer.limit_predict_batches=1", FP32]  # fmt: skip
    main([*args, f"--ckpt_path={built['ckpt']}"])
    main([*args, "--trainer.limit_predict_batches=2", f"--ckpt_path={built['ckpt']}"])
    assert len(EmbeddingIndex.load(root / "index")) == 128  # same checkpoint: replaced
    other = re.escape(str(built["other"].resolve()))
    with pytest.raises(FileExistsError, match=rf"another model.*{other}.*overwrite=true"):
        main([*args, f"--ckpt_path={built['other']}"])
    assert len(EmbeddingIndex.load(root / "index")) == 128


def test_fit_then_predict_in_one_process_is_not_refused(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_metric import MetricLearningModule
    from lightning_metric.backbones import SmallCNN
    from lightning_metric.callbacks import EmbeddingIndexWriter
    from lightning_metric.data import DigitsDataModule
    from lightning_metric.heads import ArcFaceHead

    data = DigitsDataModule(batch_size=32)
    model = MetricLearningModule(
        SmallCNN(in_channels=1, width=8), embedding_dim=8, head=ArcFaceHead, num_classes=5
    )
    writer = EmbeddingIndexWriter(str(tmp_path / "index"))
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, limit_predict_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[writer])  # fmt: skip
    trainer.fit(model, datamodule=data)
    trainer.predict(model, datamodule=data)
    weights = EmbeddingIndex.load(tmp_path / "index").info["model"]["weights"]
    assert weights == "trained by this Trainer (2 steps), no checkpoint"
    # a fresh Trainer that never trained it and loads no checkpoint: refused
    fresh = pl.Trainer(limit_predict_batches=1, logger=False, enable_progress_bar=False,
                       callbacks=[EmbeddingIndexWriter(str(tmp_path / "again"))])  # fmt: skip
    with pytest.raises(ValueError, match="global_step 0"):
        fresh.predict(model, datamodule=data)
    assert not (tmp_path / "again").exists()


def test_search_refuses_another_checkpoint_unless_told(
    built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, other = re.escape(str(built["ckpt"].resolve())), re.escape(str(built["other"]))
    with pytest.raises(SystemExit, match=rf"{ours}.*{other}.*--allow_other_checkpoint"):
        _search(built["flat"], built["other"], tmp_path)
    noisy = _search(built["flat"], built["other"], tmp_path, "--allow_other_checkpoint")
    assert "WARNING (--allow_other_checkpoint)" in capsys.readouterr().err
    right = _search(built["flat"], built["ckpt"], tmp_path)
    assert noisy["metrics"]["map@r"] != right["metrics"]["map@r"]
    # the file at the recorded path was replaced (a new run rewrote best.ckpt): refused too
    moved = tmp_path / "index"
    shutil.copytree(built["flat"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["info"]["model"]["checkpoint"] = str(built["other"])
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"sha256"):
        main(["search", "--index", str(moved), "--query", str(tmp_path)])


def test_an_older_manifest_without_a_hash_is_accepted_for_its_own_path_only(
    built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    shutil.copytree(built["flat"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["info"]["model"]["checkpoint_sha256"], manifest["info"]["data"]["dataset_size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    got = _search(old, built["ckpt"], tmp_path)
    assert "without a sha256" in capsys.readouterr().err
    assert got["evaluation"]["queries_in_index"] == len(EmbeddingIndex.load(old))
    with pytest.raises(SystemExit, match=r"no sha256 recorded.*other\.ckpt"):
        _search(old, built["other"], tmp_path)


def test_queries_of_a_split_the_index_holds_never_find_themselves(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """An index of the val split, evaluated with --split val (ids) and --split test (other
    items: nothing excluded)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(built["root"])
        val = _predict(built["root"], built["ckpt"], tmp_path / "val", "--data.predict_split=val")
    got = _search(val, built["ckpt"], tmp_path, "--split", "val")
    index = EmbeddingIndex.load(val)
    assert got["evaluation"]["queries_in_index"] == len(index)
    expected = retrieval_metrics(torch.from_numpy(index.embeddings), torch.from_numpy(index.labels))
    _close(got["metrics"], expected, ["recall@1", "map@r"])
    test_queries = _search(val, built["ckpt"], tmp_path, "--split", "test")
    assert test_queries["evaluation"]["queries_in_index"] == 0


def test_own_entries_are_matched_by_source_path() -> None:
    """Items of another split (other ids) that are files of the index are still themselves."""
    from types import SimpleNamespace

    from lightning_metric.cli.search_evaluate import evaluate as _evaluate
    from lightning_metric.cli.search_queries import own_rows as _own_rows

    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(12, 6, generator=g))
    labels = torch.arange(12) % 3
    index = EmbeddingIndex(x, labels=labels, paths=[f"/data/{i}.png" for i in range(12)])
    # queries: dataset ids 0..3 of a split whose files are the index's items 8..11
    dataset = SimpleNamespace(paths=[f"/data/{i}.png" for i in (8, 9, 10, 11)])
    rows, how = _own_rows(index, object(), "val", torch.arange(4), dataset)
    assert rows.tolist() == [8, 9, 10, 11] and how == "matched by source path"
    metrics, details = _evaluate(index, x[8:], labels[8:], rows)
    keep = torch.zeros(12, dtype=torch.bool)
    keep[8:] = True
    expected = retrieval_metrics(x, labels, k=(1, 2, 4, 8), query_mask=keep)
    _close(metrics, expected, list(expected))
    assert details["queries_in_index"] == 4


def test_search_refuses_data_whose_split_differs_from_the_indexed_one(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """Another val_fraction gives another test split: the same ids name other images, so
    queries would be matched to the wrong indexed items."""
    with pytest.raises(SystemExit, match=r"built from 448 items of the 'test' split, the "):
        _search(built["flat"], built["ckpt"], tmp_path, "--data.val_fraction=0.3")
