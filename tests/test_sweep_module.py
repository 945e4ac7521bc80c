"""Bad and unusual inputs to MetricLearningModule and the objects composed into it
(NonFiniteGuard, ShardedCentres, the checkpoint plumbing): each bad one raises where it
enters, with a message naming the value; each unusual-but-valid one is checked against what
it must give."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
from lightning_metric.checks import ArgumentTypeError
from lightning_metric.heads import ArcFaceHead, CosFaceHead, ShardingError
from lightning_metric.necks import EmbeddingNeck
from lightning_metric.nonfinite import NonFiniteError, NonFiniteGuard, StepPosition
from lightning_metric.pml import ObjectiveCountError
from lightning_metric.sharded_centres import ShardedCentres

HEAD = {"head": ArcFaceHead, "num_classes": 3}


def tiny(**kwargs: Any) -> MetricLearningModule:
    args: dict[str, Any] = {"backbone": SmallCNN(1, 4), "embedding_dim": 8, **kwargs}
    return MetricLearningModule(**args)


def set_nonfinite(value: Any) -> None:
    tiny(**HEAD).nonfinite = value


def guard_on_inf_gradient() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net[0].bias.grad[1] = float("inf")
    NonFiniteGuard("raise").keep_gradients(net.named_parameters(), StepPosition(4, 1, 9))


def load_centres(num_classes: int) -> None:
    state = {"state_dict": {"head.weight": torch.zeros(5, 8)}}
    ShardedCentres(CosFaceHead(8, num_classes)).load(state, "head.weight", "ckpt-x")


# (id, call, exception type, regex on the message)
BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("no objective", lambda: tiny(), ObjectiveCountError, r"got head=None and loss=None"),
    (
        "two objectives",
        lambda: tiny(**HEAD, loss=losses.ContrastiveLoss()),
        ObjectiveCountError,
        r"head=ArcFaceHead and loss=ContrastiveLoss",
    ),
    ("embedding_dim 0", lambda: tiny(**HEAD, embedding_dim=0), ValueError, r"embedding_dim.*0"),
    (
        "embedding_dim str",
        lambda: tiny(**HEAD, embedding_dim="64"),
        ArgumentTypeError,
        r"embedding_dim.*'64'",
    ),
    (
        "embedding_dim bool",
        lambda: tiny(**HEAD, embedding_dim=True),
        ArgumentTypeError,
        r"embedding_dim.*True",
    ),
    (
        "num_classes 0",
        lambda: tiny(head=ArcFaceHead, num_classes=0),
        ValueError,
        r"num_classes.*0",
    ),
    (
        "num_classes negative",
        lambda: tiny(head=ArcFaceHead, num_classes=-2),
        ValueError,
        r"num_classes.*-2",
    ),
    ("objective_lr 0", lambda: tiny(**HEAD, objective_lr=0.0), ValueError, r"objective_lr.*0"),
    (
        "objective_lr nan",
        lambda: tiny(**HEAD, objective_lr=float("nan")),
        ValueError,
        r"objective_lr.*nan",
    ),
    (
        "objective_lr inf",
        lambda: tiny(**HEAD, objective_lr=float("inf")),
        ValueError,
        r"objective_lr.*inf",
    ),
    (
        "nonfinite upper case",
        lambda: tiny(**HEAD, nonfinite="Raise"),
        ValueError,
        r"`nonfinite` must be one of \('raise', 'skip'\), got 'Raise'",
    ),
    (
        "nonfinite None",
        lambda: tiny(**HEAD, nonfinite=None),
        ValueError,
        r"`nonfinite`.*got None",
    ),
    (
        "nonfinite set later",
        lambda: set_nonfinite("ignore"),
        ValueError,
        r"`nonfinite`.*got 'ignore'",
    ),
    (
        "lr_scheduler_interval",
        lambda: tiny(**HEAD, lr_scheduler_interval="batch"),
        ValueError,
        r"lr_scheduler_interval.*'batch'",
    ),
    (
        "head factory without num_classes",
        lambda: tiny(head=partial(CosFaceHead, margin=0.2)),
        ValueError,
        r"head=CosFaceHead.*needs num_classes",
    ),
    (
        "head instance without loss",
        lambda: tiny(head=nn.Linear(8, 3)),
        ArgumentTypeError,
        r"built head with a \.loss method.*Linear",
    ),
    (
        "miner with a head",
        lambda: tiny(**HEAD, miner=miners.MultiSimilarityMiner()),
        ValueError,
        r"miner=MultiSimilarityMiner.*classification head ArcFaceHead",
    ),
    (
        "miner beside CrossBatchMemory",
        lambda: tiny(
            loss=losses.CrossBatchMemory(losses.ContrastiveLoss(), 8),
            miner=miners.MultiSimilarityMiner(),
        ),
        ValueError,
        r"CrossBatchMemory\(miner=\.\.\.\)",
    ),
    (
        "CrossBatchMemory without gathering",
        lambda: tiny(
            loss=losses.CrossBatchMemory(losses.ContrastiveLoss(), 8), gather_across_ranks=False
        ),
        ValueError,
        r"CrossBatchMemory needs gather_across_ranks=True",
    ),
    (
        "miner on a loss that rejects tuples",
        lambda: tiny(loss=losses.RankedListLoss(0.4, 0.8), miner=miners.MultiSimilarityMiner()),
        ValueError,
        r"loss=RankedListLoss does not accept mined tuples",
    ),
    (
        "distance kinds differ",
        lambda: tiny(
            loss=losses.TripletMarginLoss(),
            miner=miners.TripletMarginMiner(distance=distances.CosineSimilarity()),
        ),
        ValueError,
        r"CosineSimilarity \(a similarity\).*LpDistance \(a distance\)",
    ),
    (
        "PML loss of another width",
        lambda: tiny(loss=losses.ProxyNCALoss(3, 16)),
        ValueError,
        r"embedding_size=16.*embedding_dim=8",
    ),
    (
        "guard mode",
        lambda: NonFiniteGuard("warn"),  # type: ignore[arg-type]
        ValueError,
        r"`nonfinite`.*got 'warn'",
    ),
    (
        "guard names the bad bias",
        guard_on_inf_gradient,
        NonFiniteError,
        r"global step 4 \(epoch 1, batch 9\).*'0\.bias' holds NaN/Inf",
    ),
    (
        "centres under a non-DDP strategy",
        lambda: ShardedCentres(ArcFaceHead(8, 4, shard_classes=True)).setup(
            SingleDeviceStrategy("cpu"), 0, 2
        ),
        ShardingError,
        r"needs Lightning's DDP strategy.*SingleDeviceStrategy with 2 processes",
    ),
    (
        "centres of another num_classes",
        lambda: load_centres(4),
        ShardingError,
        r"ckpt-x: `head\.weight` has shape \(5, 8\), expected \(4, 8\)",
    ),
    (
        "centres: fewer classes than ranks",
        lambda: ShardedCentres(ArcFaceHead(8, 2, shard_classes=True)).setup(DDPStrategy(), 0, 3),
        ShardingError,
        r"num_classes=2.*3 DDP ranks",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [pytest.param(*row[1:], id=row[0]) for row in BAD]
)
def test_bad_input(call: Callable[[], Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call()


def test_table_is_large_and_its_ids_unique() -> None:
    names = [row[0] for row in BAD]
    assert len(names) >= 20 and len(set(names)) == len(names)


# --- unusual but valid ----------------------------------------------------------------------


def test_neck_width_wins_over_embedding_dim_and_sizes_the_head() -> None:
    neck = EmbeddingNeck(SmallCNN(1, 4).num_features, 5)
    model = tiny(neck=neck, head=ArcFaceHead, num_classes=3, embedding_dim=64)
    assert model.embedding_dim == 5 and model.head.weight.shape == (3, 5)
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 5)


def test_nonfinite_set_after_construction_reaches_the_guard() -> None:
    model = tiny(**HEAD)
    model.nonfinite = "skip"
    assert model.nonfinite_guard.mode == "skip" and model.skipped_nonfinite_steps == 0


def test_a_head_instance_needs_no_num_classes_and_pml_has_no_class_centres() -> None:
    head = ArcFaceHead(8, 6)
    model = tiny(head=head)
    assert model.head is head and model.class_centres.head is head
    assert tiny(loss=losses.ContrastiveLoss()).class_centres is None


def test_integer_objective_lr_is_the_objective_group_s_learning_rate() -> None:
    model = tiny(**HEAD, objective_lr=2)
    groups = model.parameter_groups()
    assert [g["name"] for g in groups] == ["model", "objective"]
    assert groups[1]["lr"] == 2.0 and groups[1]["params"] == [model.head.weight]
