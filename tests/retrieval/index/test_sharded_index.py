"""EmbeddingIndexWriter(shard=True) under DDP: one shard per rank plus a manifest; the
loaded index searches exactly as the index written by one process; bad shards are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from ddp_harness import FileRendezvousDDP
from tiny_retrieval import DictDataset, Tiny, clustered
from torch.utils.data import DataLoader

from lightning_metric.callbacks import EmbeddingIndexWriter
from lightning_metric.retrieval import EmbeddingIndex
from lightning_metric.retrieval.index import IndexFormatError


class PredictTiny(Tiny):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        return self._step(batch)


def data() -> DataLoader:
    # 43 items over 2 or 3 ranks: DistributedSampler pads; duplicate vectors tie exactly.
    x, labels = clustered(43, 6, seed=8)
    x[9] = x[4]
    x[30] = x[4]
    return DataLoader(DictDataset(x, labels), batch_size=5)


def predict(devices: int, folder: Path, writer: EmbeddingIndexWriter) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FileRendezvousDDP(folder) if devices > 1 else "auto",
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(PredictTiny(), data(), return_predictions=False)


def write(devices: int, out: Path, shard: bool, **kwargs: object) -> EmbeddingIndex:
    target = out / "index"
    writer = EmbeddingIndexWriter(str(target), allow_untrained=True, shard=shard, **kwargs)  # type: ignore[arg-type]
    predict(devices, out, writer)
    return EmbeddingIndex.load(target)


def assert_same_search(one: EmbeddingIndex, other: EmbeddingIndex) -> None:
    assert np.array_equal(one.ids, other.ids)
    assert np.array_equal(one.labels, other.labels)
    assert np.array_equal(one.embeddings, other.embeddings)
    queries = torch.nn.functional.normalize(clustered(20, 6, seed=9)[0], dim=1).numpy()
    queries = np.concatenate([queries, one.embeddings[[4, 9]]])  # ties among 4, 9, 30
    a, b = one.search(queries, k=12), other.search(queries, k=12)
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.scores, b.scores)


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("world", "options"),
    [
        (2, {}),
        (3, {"factory": "IVF4,Flat", "nprobe": 2}),
        (2, {"precision": "int8", "rescore_multiplier": 2}),
    ],
)
def test_sharded_predict_index_equals_one_process(
    tmp_path: Path, world: int, options: dict[str, object]
) -> None:
    single = write(1, tmp_path / "single", False, **options)
    sharded = write(world, tmp_path / "sharded", True, **options)
    shards = sorted(p.name for p in (tmp_path / "sharded" / "index").glob("shard-*"))
    assert shards == [f"shard-{r:05d}-of-{world:05d}" for r in range(world)]
    assert not (tmp_path / "sharded" / "index" / "embeddings.npy").exists()  # nothing gathered
    assert len(sharded) == len(single) == 43
    assert sharded.factory == single.factory and sharded.search_params == single.search_params
    if single.calibration is not None:  # int8 ranges of all rows, not of a shard
        assert sharded.calibration is not None
        assert torch.equal(single.calibration.low, sharded.calibration.low)
        assert torch.equal(single.calibration.high, sharded.calibration.high)
    assert_same_search(single, sharded)
    # Saved merged, it loads as an ordinary index with the same answers.
    assert_same_search(single, EmbeddingIndex.load(sharded.save(tmp_path / "merged")))


@pytest.mark.ddp
def test_missing_and_corrupt_shards_are_named(tmp_path: Path) -> None:
    write(2, tmp_path, True)
    root = tmp_path / "index"
    top = json.loads((root / "manifest.json").read_text())
    assert [s["count"] for s in top["shards"]] == [22, 21]  # padding dropped on rank 1

    copy = tmp_path / "missing"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "shard-00001-of-00002")
    with pytest.raises(IndexFormatError, match=r"missing shard .*shard-00001-of-00002.*21 rows"):
        EmbeddingIndex.load(copy)

    copy = tmp_path / "corrupt"
    shutil.copytree(root, copy)
    emb = copy / "shard-00000-of-00002" / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IndexFormatError, match=r"shard-00000-of-00002/embeddings.npy.*changed"):
        EmbeddingIndex.load(copy)

    copy = tmp_path / "swapped"
    shutil.copytree(root, copy)
    (copy / "shard-00000-of-00002" / "manifest.json").write_text(
        (root / "shard-00001-of-00002" / "manifest.json").read_text()
    )
    with pytest.raises(IndexFormatError, match=r"shard-00000-of-00002/manifest.json.*changed"):
        EmbeddingIndex.load(copy)

    # An existing index is never overwritten unasked, sharded or not.
    writer = EmbeddingIndexWriter(str(root), allow_untrained=True, shard=True)
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(Exception, match="already holds an index"):
        predict(2, tmp_path / "again", writer)
    assert (root / "manifest.json").read_bytes() == before


def test_shard_must_be_bool() -> None:
    with pytest.raises(ValueError, match="shard must be True or False"):
        EmbeddingIndexWriter("out", shard="yes")  # type: ignore[arg-type]
