"""Bad and unusual inputs to Matryoshka training (``MetricLearningModule(matryoshka_dims=...,
matryoshka_weights=...)`` and ``MarginHead.prefix_losses``): each bad one raises at
construction (or where the value enters), naming the value and what would work; each
unusual-but-valid one is checked against what it must give."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import nn

from lightning_metric import MetricLearningModule
from lightning_metric.checks import ArgumentTypeError
from lightning_metric.heads import ArcFaceHead, NormSoftmaxHead
from lightning_metric.necks import EmbeddingNeck

D = 8


def tiny(**kwargs: Any) -> MetricLearningModule:
    args: dict[str, Any] = {
        "backbone": nn.Linear(3, D),
        "neck": nn.Identity(),
        "embedding_dim": D,
        "head": ArcFaceHead,
        "num_classes": 5,
        **kwargs,
    }
    return MetricLearningModule(**args)


def pml(loss: nn.Module, **kwargs: Any) -> MetricLearningModule:
    return tiny(head=None, num_classes=None, loss=loss, matryoshka_dims=[4, D], **kwargs)


class LossOverride(ArcFaceHead):
    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return super().loss(embeddings, labels) * 2


class DuckHead(nn.Module):
    """Has MarginHead's interface (``loss``) but not its pipeline."""

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return embeddings.sum()


def prefix_losses(dims: Any, labels: Any = "ok", width: int = D) -> Any:
    head = ArcFaceHead(D, 5)
    y = torch.tensor([0, 1, 2]) if labels == "ok" else labels
    return head.prefix_losses(torch.randn(3, width), y, dims)


# (id, call, exception type, regex on the message)
BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "dims decreasing",
        lambda: tiny(matryoshka_dims=[4, 2, 8]),
        ValueError,
        r"`matryoshka_dims` must be strictly increasing.*\[4, 2, 8\]; e\.g\. \[2, 4, 8\]",
    ),
    (
        "dims repeated",
        lambda: tiny(matryoshka_dims=[4, 4, 8]),
        ValueError,
        r"strictly increasing.*\[4, 4, 8\]",
    ),
    (
        "dims above the embedding",
        lambda: tiny(matryoshka_dims=[4, 16]),
        ValueError,
        r"prefix of 16 coordinates, but the embedding has only 8; use sizes <= 8, e\.g\. \[4, 8\]",
    ),
    (
        "dims empty",
        lambda: tiny(matryoshka_dims=[]),
        ValueError,
        r"`matryoshka_dims` must hold at least one prefix size, got an empty list",
    ),
    (
        "dims with zero",
        lambda: tiny(matryoshka_dims=[0, 8]),
        ValueError,
        r"`matryoshka_dims\[0\]` must be an integer >= 1, got 0",
    ),
    (
        "dims negative",
        lambda: tiny(matryoshka_dims=[-4, 8]),
        ValueError,
        r"`matryoshka_dims\[0\]` must be an integer >= 1, got -4",
    ),
    (
        "dims float",
        lambda: tiny(matryoshka_dims=[2.5, 8]),
        ArgumentTypeError,
        r"`matryoshka_dims\[0\]` must be an integer >= 1, got 2\.5",
    ),
    (
        "dims bool",
        lambda: tiny(matryoshka_dims=[True, 8]),
        ArgumentTypeError,
        r"`matryoshka_dims\[0\]`.*got True",
    ),
    (
        "dims a string",
        lambda: tiny(matryoshka_dims="4,8"),
        ArgumentTypeError,
        r"`matryoshka_dims` must be a list of prefix sizes such as \[32, 64, 128\], got '4,8'",
    ),
    (
        "dims an int",
        lambda: tiny(matryoshka_dims=8),
        ArgumentTypeError,
        r"`matryoshka_dims` must be a list of prefix sizes.*got 8",
    ),
    (
        "dims without the full size",
        lambda: tiny(matryoshka_dims=[2, 4]),
        ValueError,
        r"\[2, 4\] must end with the embedding size 8.*use \[2, 4, 8\], or set embedding_dim=4",
    ),
    (
        "dims past a narrower neck",
        lambda: tiny(neck=EmbeddingNeck(D, 5), matryoshka_dims=[4, 8]),
        ValueError,
        r"prefix of 8 coordinates, but the embedding has only 5",
    ),
    (
        "weights of another length",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=[1.0]),
        ValueError,
        r"`matryoshka_weights` has 1 weights \[1\.0\] but matryoshka_dims has 2 prefixes",
    ),
    (
        "weight negative",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=[1.0, -0.5]),
        ValueError,
        r"`matryoshka_weights\[1\]`.*-0\.5",
    ),
    (
        "weight nan",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=[float("nan"), 1.0]),
        ValueError,
        r"`matryoshka_weights\[0\]`.*nan",
    ),
    (
        "weight inf",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=[1.0, float("inf")]),
        ValueError,
        r"`matryoshka_weights\[1\]`.*inf",
    ),
    (
        "weights all zero",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=[0.0, 0]),
        ValueError,
        r"`matryoshka_weights` = \[0\.0, 0\.0\] are all zero: no prefix would be trained",
    ),
    (
        "weight a string",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=["1", 1.0]),
        ArgumentTypeError,
        r"`matryoshka_weights\[0\]` must be a real number, got '1'",
    ),
    (
        "weights a number",
        lambda: tiny(matryoshka_dims=[4, 8], matryoshka_weights=2.0),
        ArgumentTypeError,
        r"`matryoshka_weights` must be a list of 2 weights >= 0.*got 2\.0",
    ),
    (
        "weights without dims",
        lambda: tiny(matryoshka_weights=[1.0, 2.0]),
        ValueError,
        r"matryoshka_weights=\[1\.0, 2\.0\] was given without matryoshka_dims",
    ),
    (
        "CrossBatchMemory",
        lambda: pml(losses.CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=64)),
        ValueError,
        r"matryoshka_dims cannot be used with loss=CrossBatchMemory.*a queue of its own",
    ),
    (
        "proxy loss",
        lambda: pml(losses.ProxyAnchorLoss(5, D)),
        ValueError,
        r"loss=ProxyAnchorLoss: its class weights \(proxies\) are 8-dimensional",
    ),
    (
        "head overriding loss",
        lambda: tiny(head=LossOverride, matryoshka_dims=[4, D]),
        ValueError,
        r"head=LossOverride overrides loss\(\), which the Matryoshka prefixes would bypass",
    ),
    (
        "duck-typed head",
        lambda: tiny(head=DuckHead(), matryoshka_dims=[4, D]),
        ValueError,
        r"needs a head built on lightning_metric\.heads\.MarginHead.*head=DuckHead",
    ),
    (
        "prefix_losses dims past the head",
        lambda: prefix_losses([4, 9]),
        ValueError,
        r"`dims` = \[4, 9\] asks for a prefix of 9 coordinates, but the embedding has only 8",
    ),
    (
        "prefix_losses dims decreasing",
        lambda: prefix_losses([8, 4]),
        ValueError,
        r"`dims` must be strictly increasing.*\[8, 4\]",
    ),
    (
        "prefix_losses without labels",
        lambda: prefix_losses([4, 8], labels=None),
        ValueError,
        r"ArcFaceHead\.loss needs labels",
    ),
    (
        "prefix_losses wrong width",
        lambda: prefix_losses([4, 8], width=6),
        ValueError,
        r"embedding_dim=8\], got \(3, 6\)",
    ),
    (
        "prefix_losses label out of range",
        lambda: prefix_losses([4, 8], labels=torch.tensor([0, 1, 5])),
        ValueError,
        r"labels.*5",
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


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, D, generator=g), torch.randint(0, 5, (10,), generator=g)


def test_a_zero_weight_logs_a_prefix_without_training_it() -> None:
    torch.manual_seed(0)
    head = ArcFaceHead(D, 5)
    x, y = _batch()
    model = tiny(head=head, matryoshka_dims=[2, D], matryoshka_weights=[0.0, 1.0])
    xr = x.clone().requires_grad_()
    total = model.compute_loss(xr, y)
    total.backward()
    x0 = x.clone().requires_grad_()
    head.weight.grad, grad = None, head.weight.grad
    plain = head.loss(x0, y)
    plain.backward()
    assert torch.equal(total, plain) and torch.equal(xr.grad, x0.grad)
    assert torch.equal(grad, head.weight.grad)
    logged = model._prefix_losses or []
    assert float(logged[0].detach()) > 0 and not torch.equal(logged[0], logged[1])


def test_numpy_and_tuple_dims_and_integer_weights() -> None:
    model = tiny(matryoshka_dims=(np.int64(2), D), matryoshka_weights=[1, 3])
    assert model.matryoshka is not None
    assert model.matryoshka.dims == (2, D) and model.matryoshka.weights == (1.0, 3.0)
    x, y = _batch()
    total = model.compute_loss(x, y)
    small, full = model._prefix_losses or []
    torch.testing.assert_close(total, (small + 3 * full) / 4)


def test_weights_are_normalised_by_their_sum() -> None:
    x, y = _batch()
    values = []
    for weights in ([1.0, 2.0], [10.0, 20.0]):
        torch.manual_seed(0)
        values.append(tiny(matryoshka_dims=[4, D], matryoshka_weights=weights).compute_loss(x, y))
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0.0)


def test_a_one_coordinate_prefix_is_the_sign() -> None:
    """d=1: the prefix is +-1 and so is each centre's, so the logits are +-scale."""
    torch.manual_seed(0)
    head = NormSoftmaxHead(D, 5, scale=3.0)
    x, y = _batch()
    one, _ = head.prefix_losses(x, y, [1, D])
    cos = torch.sign(x[:, :1]) * torch.sign(head.weight.detach()[:, 0]).unsqueeze(0)
    torch.testing.assert_close(one, F.cross_entropy(3.0 * cos, y))


def test_a_pml_loss_with_a_miner_and_one_prefix_per_call() -> None:
    """A pair loss with its miner and dims=[D]: exactly the plain objective."""
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    x, y = _batch()
    plain = tiny(head=None, num_classes=None, loss=loss_fn, miner=miner)
    whole = tiny(head=None, num_classes=None, loss=loss_fn, miner=miner, matryoshka_dims=[D])
    assert torch.equal(whole.compute_loss(x, y), plain.compute_loss(x, y))
    assert whole._mined_nothing == plain._mined_nothing
