"""RecallAtK(dims=..., precisions=...) in a Trainer run logs the prefix x precision grid with
the values of ``retrieval_metrics(dim=..., quantization=...)`` on the same embeddings."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.callbacks import RecallAtK
from lightning_metric.data import DigitsDataModule
from lightning_metric.heads import CosFaceHead
from lightning_metric.retrieval import bytes_per_vector, retrieval_metrics

PRECISIONS = ["float32", "int8", "binary", "binary_rescore"]


def test_fit_logs_the_grid_beside_the_plain_keys() -> None:
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=8),
        embedding_dim=16,
        head=partial(CosFaceHead, scale=16.0, margin=0.2),
        num_classes=data.num_classes,
    )
    callback = RecallAtK(k=(1, 2), dims=[4, 16], precisions=PRECISIONS, rescore_multiplier=2)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    # The embeddings the last validation saw: the model has not changed since.
    model.eval()
    batches = [b for _, b in zip(range(3), data.val_dataloader(), strict=False)]
    with torch.no_grad():
        x = torch.cat([model(b["x"]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])

    plain = retrieval_metrics(x, labels, (1, 2))
    assert logged["val/recall@1"] == pytest.approx(plain["recall@1"], abs=1e-6)
    for dim in (4, 16):
        for precision in PRECISIONS:
            cell = retrieval_metrics(
                x, labels, (1, 2), dim=dim, quantization=precision, rescore_multiplier=2
            )
            for name in ("recall@1", "recall@2", "precision@2", "map@r", "mrr"):
                key = f"val/d{dim}/{precision}/{name}"
                assert logged[key] == pytest.approx(cell[name], abs=1e-6), key
            assert logged[f"val/d{dim}/{precision}/bytes_per_vector"] == bytes_per_vector(
                dim, precision
            )
    # The cells differ where they should: a 4-d binary code is 1 byte and loses ranking.
    assert logged["val/d16/float32/recall@1"] == pytest.approx(logged["val/recall@1"], abs=1e-6)
    assert logged["val/d4/binary/map@r"] < logged["val/d16/float32/map@r"]
