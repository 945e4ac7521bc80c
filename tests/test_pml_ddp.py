"""Cross-rank PML losses: 2 CPU processes (gloo) give the loss and gradients of one big batch.

Each rank computes ``compute_loss`` through ``DistributedDataParallel`` on its slice of a
global batch; the gradients DDP leaves behind (model and learnable loss parameters) and the
loss value must equal one process training on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_harness import FileRendezvousDDP, run_ranks
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import MetricLearningModule

pytestmark = pytest.mark.ddp

WORLD = 2
# Global batch: 4 classes x 4 samples, then a second batch for the memory case.
X = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 3] * 4 + [1, 4, 5, 0] * 4)


def _cosine() -> distances.CosineSimilarity:
    return distances.CosineSimilarity()


# name -> (module kwargs factory, per-rank slices of each step's global batch)
CASES: dict[str, tuple[Callable[[], dict], list[list[slice]]]] = {
    "triplet_cosine": (
        lambda: dict(
            loss=losses.TripletMarginLoss(
                margin=0.1,
                distance=_cosine(),
                reducer=reducers.ThresholdReducer(high=0.3),
                embedding_regularizer=regularizers.LpRegularizer(),
            ),
            miner=miners.MultiSimilarityMiner(epsilon=0.1),
        ),
        [[slice(0, 8), slice(8, 16)]],
    ),
    "contrastive_easy_hard": (
        lambda: dict(loss=losses.ContrastiveLoss(), miner=miners.BatchEasyHardMiner()),
        [[slice(0, 8), slice(8, 16)]],
    ),
    # Learnable proxies: their gradient must not be scaled by the world size.
    "proxy_anchor": (
        lambda: dict(loss=losses.ProxyAnchorLoss(num_classes=6, embedding_size=6)),
        [[slice(0, 8), slice(8, 16)]],
    ),
    # Ranks with different batch sizes (6 and 10).
    "multisimilarity_uneven": (
        lambda: dict(loss=losses.MultiSimilarityLoss(), miner=miners.MultiSimilarityMiner()),
        [[slice(0, 6), slice(6, 16)]],
    ),
    # Two steps: the second one sees the memory filled by the first.
    "xbm": (
        lambda: dict(
            loss=losses.CrossBatchMemory(
                losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=_cosine()),
                embedding_size=6,
                memory_size=24,
                miner=miners.MultiSimilarityMiner(),
            )
        ),
        [[slice(0, 8), slice(8, 16)], [slice(16, 24), slice(24, 32)]],
    ),
}


def build(name: str) -> MetricLearningModule:
    # No BatchNorm: per-rank batch statistics would differ from one big batch by design.
    torch.manual_seed(0)
    return MetricLearningModule(
        backbone=nn.Sequential(nn.Linear(8, 12), nn.Tanh()),
        neck=nn.Linear(12, 6),
        embedding_dim=6,
        **CASES[name][0](),
    )


class LossOf(nn.Module):
    """What DDP wraps: the module's training computation, embeddings -> compute_loss."""

    def __init__(self, module: MetricLearningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.module.compute_loss(self.module.embed(x), labels)


def run_steps(module: MetricLearningModule, steps: list[slice], call: nn.Module) -> list[dict]:
    out = []
    for part in steps:
        module.zero_grad()
        loss = call(X[part], LABELS[part])
        loss.backward()
        record = {
            "loss": loss.detach().clone(),
            "grads": {n: p.grad.clone() for n, p in module.named_parameters()},
        }
        if isinstance(module.loss_fn, losses.CrossBatchMemory):
            record["memory"] = module.loss_fn.embedding_memory.clone()
        out.append(record)
    return out


def worker(rank: int, folder: str) -> None:
    results = {}
    for name, (_, steps) in CASES.items():
        module = build(name)
        ddp = DistributedDataParallel(LossOf(module))
        results[name] = run_steps(module, [step[rank] for step in steps], ddp)
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp_pml")
    run_ranks(worker, WORLD, folder, args=(str(folder),))
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_and_gradients_equal_one_big_batch(name, ranks):
    module = build(name)
    global_steps = [slice(step[0].start, step[-1].stop) for step in CASES[name][1]]
    expected = run_steps(module, global_steps, LossOf(module))
    for got in (r[name] for r in ranks):
        for step_got, step_expected in zip(got, expected, strict=True):
            # The loss each rank returns (and training_step logs) is the big-batch loss.
            torch.testing.assert_close(step_got["loss"], step_expected["loss"], atol=1e-6, rtol=0)
            assert step_expected["loss"] > 0
            for param, grad in step_expected["grads"].items():
                assert grad.abs().sum() > 0, f"{param} got no gradient in the reference"
                # 1e-6, relative to the gradient's scale where that exceeds 1 (ProxyAnchor's
                # alpha=32 gives entries ~20, whose float32 rounding alone is ~2e-6).
                scale = max(1.0, grad.abs().max().item())
                torch.testing.assert_close(
                    step_got["grads"][param], grad, atol=1e-6 * scale, rtol=0, msg=param
                )
            if "memory" in step_expected:
                # Every rank enqueued the gathered batch: memories identical to one process.
                torch.testing.assert_close(step_got["memory"], step_expected["memory"])


def test_without_gathering_each_rank_only_sees_its_own_batch(ranks):
    """The control: turning gathering off changes the loss (pairs no longer cross ranks)."""
    torch.manual_seed(0)
    module = MetricLearningModule(
        backbone=nn.Sequential(nn.Linear(8, 12), nn.Tanh()),
        neck=nn.Linear(12, 6),
        embedding_dim=6,
        gather_across_ranks=False,
        **CASES["triplet_cosine"][0](),
    )
    local = module.compute_loss(module.embed(X[0:8]), LABELS[0:8])
    assert not torch.allclose(local, ranks[0]["triplet_cosine"][0]["loss"], atol=1e-4)


def test_lightning_ddp_step_equals_one_big_batch(tmp_path):
    """Through Lightning's own DDP: one SGD step moves the weights as one big batch would,
    and the logged train/loss is the big-batch loss."""
    make = partial(build, "triplet_cosine")
    trained = make()
    trained.optimizer_factory = partial(torch.optim.SGD, lr=1.0)
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    loader = DataLoader(TensorDataset(X[:16], LABELS[:16]), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=FileRendezvousDDP(tmp_path),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(trained, loader)

    # Lightning's DistributedSampler deals samples round-robin: rank 0 gets 0, 2, 4, ...
    order = torch.cat([torch.arange(r, 16, WORLD) for r in range(WORLD)])
    reference = make()
    loss = reference.compute_loss(reference.embed(X[order]), LABELS[order])
    loss.backward()
    torch.testing.assert_close(
        trainer.callback_metrics["train/loss"], loss.detach(), atol=1e-6, rtol=0
    )
    assert trainer.callback_metrics["train/empty_mining_batches"] == 0
    for name, param in reference.named_parameters():
        step = before[name] - dict(trained.named_parameters())[name].detach()
        torch.testing.assert_close(step, param.grad, atol=1e-6, rtol=0, msg=name)
