"""2-process CPU (gloo) DDP validation gives exactly the single-process metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from tiny_retrieval import DictDataset, clustered, validate_on_ranks
from torch.utils.data import DataLoader

from lightning_metric.callbacks import RecallAtK

pytestmark = pytest.mark.ddp


def run(devices: int, folder: Path, loaders: list[DataLoader]) -> dict[str, float]:
    callbacks: list[Callback] = [
        # Each loader leave-one-out on its own (names get /dataloader_idx_i) ...
        RecallAtK(k=(1, 2, 4, 8), precision=True),
        # ... and loader 0 as queries against loader 1 as gallery.
        RecallAtK(k=(1, 2, 4, 8), query_dataloader_idx=0, reference_dataloader_idx=1),
    ]
    return validate_on_ranks(devices, folder, loaders, callbacks)


def test_ddp_validate_equals_single_process(tmp_path: Path) -> None:
    # 101 and 37 items: DistributedSampler pads both loaders with repeated samples.
    x, labels = clustered(101, 12, seed=3)
    labels[100] = 77  # singleton: unscorable
    xg, lg = clustered(37, 12, seed=4)
    loaders = [
        DataLoader(DictDataset(x, labels), batch_size=8),
        DataLoader(DictDataset(xg, lg), batch_size=8),
    ]
    single = run(1, tmp_path / "single", loaders)
    ddp = run(2, tmp_path / "ddp", loaders)
    assert {"val/recall@1", "val/recall@1/dataloader_idx_0", "val/map@r"} <= set(single)
    assert single["val/unscorable_queries/dataloader_idx_0"] == 1.0
    assert single == ddp
