"""2-process CPU (gloo) DDP validation gives exactly the single-process metrics."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from ddp_harness import FileRendezvousDDP
from lightning.pytorch.callbacks import Callback
from tiny_retrieval import DictDataset, Tiny, clustered
from torch.utils.data import DataLoader

from lightning_metric.callbacks import RecallAtK

pytestmark = pytest.mark.ddp


class DumpMetrics(Callback):
    """Writes every rank's logged metrics, to check that all ranks agree, and the warnings
    raised while validating."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catcher.__exit__(None, None, None)
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(values))
        said = [str(w.message) for w in self._caught]
        (Path(self.folder) / f"warnings{trainer.global_rank}.json").write_text(json.dumps(said))


def validate_on_ranks(
    devices: int, folder: Path, loaders: list[DataLoader] | DataLoader, callbacks: list[Callback]
) -> dict[str, float]:
    """``Tiny`` validated on ``devices`` CPU processes; every rank must log the same metrics."""
    folder.mkdir()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FileRendezvousDDP(folder) if devices > 1 else "auto",
        callbacks=[*callbacks, DumpMetrics(str(folder))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(Tiny(), loaders, verbose=False)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    assert len(ranks) == devices
    said = [w for p in folder.glob("warnings*.json") for w in json.loads(p.read_text())]
    # RecallAtK logs values every rank already shares: Lightning's sync_dist advice is noise.
    assert not [w for w in said if "sync_dist" in w], said
    for other in ranks[1:]:
        assert other == ranks[0]
    return ranks[0]


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
