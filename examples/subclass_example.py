"""A user's own LightningModule built by subclassing MetricLearningModule.

It keeps the library's backbone -> neck -> head pipeline and changes two documented hooks:
  * ``compute_loss`` adds a penalty that keeps the pre-normalisation embedding norm near a
    target (a common trick when heads see un-normalised features) and logs it;
  * ``configure_optimizers`` keeps the library's param groups (model vs class centres)
    and adds a linear warm-up.

Run:  python examples/subclass_example.py            (digits, ~20 s on a laptop CPU)
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.callbacks import RecallAtK
from lightning_metric.data import DigitsDataModule
from lightning_metric.heads import CosFaceHead


class NormRegularisedModule(MetricLearningModule):
    def __init__(self, norm_target: float = 10.0, norm_weight: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm_target = norm_target
        self.norm_weight = norm_weight

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norm_penalty = (embeddings.norm(dim=1) - self.norm_target).pow(2).mean()
        self.log("train/norm_penalty", norm_penalty)
        return super().compute_loss(embeddings, labels) + self.norm_weight * norm_penalty

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def main(max_epochs: int = 5, limit_train_batches: float = 1.0) -> dict[str, float]:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = NormRegularisedModule(
        backbone=SmallCNN(in_channels=1, width=16),
        embedding_dim=32,
        head=partial(CosFaceHead, scale=16.0, margin=0.2),
        num_classes=data.num_classes,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    trainer = L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        accelerator="cpu",
        callbacks=[RecallAtK(k=(1, 2, 4, 8))],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("unseen digits 5-9:", {k: round(v, 4) for k, v in sorted(metrics.items()) if "val/" in k})
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    args = parser.parse_args()
    main(args.max_epochs, args.limit_train_batches)
