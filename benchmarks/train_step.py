"""Training-step overhead of MetricLearningModule + Lightning vs a plain PyTorch loop.

    python benchmarks/train_step.py                       # CPU, 1 thread, batch 128
    python benchmarks/train_step.py --device cuda --threads 0

Both sides train the same SmallCNN + EmbeddingNeck (same seed) with the same objective and
AdamW on the same pre-built glyph-sized batches (1x32x32, 4 samples per class) served by the
same DataLoader:

* "pml": TripletMarginLoss(CosineSimilarity) with MultiSimilarityMiner,
* "head": ArcFaceHead (cross-entropy on margin logits).

Lightning side: ``Trainer.fit`` with logger, checkpointing, progress bar and sanity check
off, i.e. the module's own ``training_step`` including its ``self.log`` calls. Plain side:
``zero_grad -> embed -> (normalise, mine, loss | head.loss) -> backward -> step``.
Steps/second are timed after ``--warmup`` steps; the two sides alternate over ``--rounds``
so background load hits both alike. Reported: the best round of each side and their
ratio (plain / module steps per second: the module's time overhead), and the median of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import nn
from torch.utils.data import DataLoader

from lightning_metric import EmbeddingNeck, MetricLearningModule, SmallCNN
from lightning_metric.heads import ArcFaceHead

NUM_CLASSES = 512


def make_batches(n: int, batch_size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    per_class = 4
    out = []
    for _ in range(n):
        classes = torch.randperm(NUM_CLASSES, generator=g)[: batch_size // per_class]
        labels = classes.repeat_interleave(per_class)
        x = torch.rand(len(labels), 1, 32, 32, generator=g)
        out.append((x.to(device), labels.to(device)))
    return out


def build_parts(case: str, width: int, dim: int) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=1, width=width)
    neck = EmbeddingNeck(backbone.num_features, dim)
    if case == "pml":
        return dict(
            backbone=backbone,
            neck=neck,
            loss=losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity()),
            miner=miners.MultiSimilarityMiner(epsilon=0.1),
        )
    return dict(backbone=backbone, neck=neck, head=ArcFaceHead(dim, NUM_CLASSES, scale=30.0))


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_lightning(case: str, args: argparse.Namespace, batches: list) -> float:
    parts = build_parts(case, args.width, args.dim)
    module = MetricLearningModule(**parts, embedding_dim=args.dim, optimizer=torch.optim.AdamW)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, loader(batches))
    return (len(batches) - args.warmup) / (timer.end - timer.start)


def run_plain(case: str, args: argparse.Namespace, batches: list) -> float:
    parts = build_parts(case, args.width, args.dim)
    model = nn.ModuleDict(parts).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if case == "pml":

        def step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            emb = F.normalize(model["neck"](model["backbone"](x)), dim=-1)
            return model["loss"](emb, labels, model["miner"](emb, labels))

    else:

        def step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model["head"].loss(model["neck"](model["backbone"](x)), labels)

    start = 0.0
    for i, (x, labels) in enumerate(loader(batches)):
        if i == args.warmup:
            _sync()
            start = time.perf_counter()
        optimizer.zero_grad()
        step(x, labels).backward()
        optimizer.step()
    _sync()
    return (len(batches) - args.warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: default")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--steps", type=int, default=30, help="steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["pml", "head"], choices=["pml", "head"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    batches = make_batches(args.steps, args.batch_size, args.device)

    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"width={args.width} dim={args.dim} steps={args.steps - args.warmup} rounds={args.rounds}"
    )
    print(
        f"{'case':6s} {'plain steps/s':>14s} {'module steps/s':>15s} {'overhead (x)':>13s} "
        f"{'median paired (x)':>18s}"
    )
    for case in args.cases:
        plain, module = [], []
        for _ in range(args.rounds):
            plain.append(run_plain(case, args, batches))
            module.append(run_lightning(case, args, batches))
        best_plain, best_module = max(plain), max(module)
        # Rounds alternate, so each round's ratio shares its background load.
        paired = statistics.median(p / m for p, m in zip(plain, module, strict=True))
        print(
            f"{case:6s} {best_plain:14.2f} {best_module:15.2f} "
            f"{best_plain / best_module:13.3f} {paired:18.3f}"
        )


if __name__ == "__main__":
    main()
