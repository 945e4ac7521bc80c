"""RecallAtK(shard_reference=True) under a 2-process gloo Trainer logs exactly the
single-process metrics, leave-one-out, query/gallery and the prefix x precision grid."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from tiny_retrieval import DictDataset, clustered, validate_on_ranks
from torch.utils.data import DataLoader

from lightning_metric.callbacks import RecallAtK

pytestmark = pytest.mark.ddp


def run(devices: int, folder: Path, loaders: list[DataLoader], shard: bool) -> dict[str, float]:
    callbacks: list[Callback] = [
        RecallAtK(k=(1, 2, 4), dims=[4, 8], precisions=["float32", "int8"], shard_reference=shard),
        RecallAtK(
            k=(1, 4), query_dataloader_idx=0, reference_dataloader_idx=1, shard_reference=shard
        ),
    ]
    return validate_on_ranks(devices, folder, loaders, callbacks)


def test_sharded_recall_at_k_equals_single_process(tmp_path: Path) -> None:
    # 53 and 38 items: DistributedSampler pads the first loader with a repeated sample.
    x, labels = clustered(53, 9, seed=5)
    x[20] = x[2]  # a duplicate vector under another label: an exact score tie
    labels[52] = 500  # a singleton: unscorable
    xg, lg = clustered(38, 9, seed=6)
    loaders = [
        DataLoader(DictDataset(x, labels), batch_size=6),
        DataLoader(DictDataset(xg, lg), batch_size=6),
    ]
    single = run(1, tmp_path / "single", loaders, shard=False)
    sharded = run(2, tmp_path / "sharded", loaders, shard=True)
    assert {"val/recall@1/dataloader_idx_0", "val/d4/int8/map@r/dataloader_idx_1"} <= set(single)
    assert single["val/unscorable_queries/dataloader_idx_0"] == 1.0
    assert sharded == single
