"""Matryoshka training (``MetricLearningModule(matryoshka_dims=...)``): the loss is the weighted
mean of the objective on each L2-normalised prefix, computed here by hand with one head (or
one PML loss) per prefix; off (None) changes nothing; streaming, partial FC and sharded class
centres give what the dense one-process computation gives."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ddp_harness import run_ranks
from lightning import Trainer
from pytorch_metric_learning import losses, miners
from sharded_heads import (
    ShardedHeadModel,
    all_batches,
    close,
    rank_batch,
    record_sampling,
    replay_sampling,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import MetricLearningModule
from lightning_metric.heads import (
    AdaFaceHead,
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    CurricularFaceHead,
    MarginHead,
    NormSoftmaxHead,
    SubCenterArcFaceHead,
)
from lightning_metric.heads.sharding import shard_bounds
from lightning_metric.retrieval.quantization import prefix

ROOT = Path(__file__).resolve().parents[1]
D, C = 8, 23
DIMS = (2, 5, 8)
WEIGHTS = (1.0, 0.5, 2.0)
ALL_HEADS: list[Callable[..., MarginHead]] = [
    NormSoftmaxHead,
    CosFaceHead,
    ArcFaceHead,
    SubCenterArcFaceHead,
    CombinedMarginHead,
    CurricularFaceHead,
    AdaFaceHead,
]


def _inputs(seed: int = 0, b: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows of different norms, so AdaFace's norm-dependent margin differs between rows.
    x = torch.randn(b, D, generator=g) * torch.linspace(0.5, 4.0, b).unsqueeze(1)
    return x, torch.randint(0, C, (b,), generator=g)


def _weighted_mean(values: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def _head(cls: Callable[..., MarginHead], **kwargs: Any) -> MarginHead:
    torch.manual_seed(0)
    momentum = {"momentum": 0.5} if cls in (CurricularFaceHead, AdaFaceHead) else {}
    return cls(D, C, **momentum, **kwargs).train()


def _head_by_hand(
    head: MarginHead, x: torch.Tensor, y: torch.Tensor, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """One head of width d per prefix, whose centres are the first d columns of ``head``'s:
    the largest prefix first, training its statistics; the others read them, frozen. Each
    sub-head normalises its input and centres itself; AdaFace gets the whole embedding's norm."""
    centres = head.weight
    full_norm = x.norm(dim=1, keepdim=True)
    values: dict[int, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for d in reversed(DIMS):
        sub = copy.deepcopy(head)  # every hyper-parameter and statistic of the head
        sub.embedding_dim = d
        for name, value in buffers.items():
            getattr(sub, name).copy_(value)
        if d != DIMS[-1]:
            sub.update_statistics = lambda *args: None  # type: ignore[method-assign]
        del sub.weight
        sub.weight = centres[:, :d]  # a view: the gradient reaches the shared centres
        x_d = x[:, :d] / x[:, :d].norm(dim=1, keepdim=True) * full_norm
        torch.manual_seed(seed)  # the same partial-FC draw for every prefix
        values[d] = sub.loss(x_d, y)
        if d == DIMS[-1]:
            buffers = {k: v.clone() for k, v in sub.named_buffers()}
    per_prefix = [values[d] for d in DIMS]
    return _weighted_mean(per_prefix, WEIGHTS), per_prefix, buffers


@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_head_loss_is_the_weighted_mean_of_prefix_heads(
    cls: Callable[..., MarginHead], sample_rate: float
) -> None:
    x, y = _inputs()
    module = MetricLearningModule(
        nn.Identity(),
        neck=nn.Identity(),
        head=_head(cls, sample_rate=sample_rate),
        embedding_dim=D,
        matryoshka_dims=list(DIMS),
        matryoshka_weights=list(WEIGHTS),
    )
    head = module.head
    assert head is not None
    start = {k: v.clone() for k, v in head.state_dict().items()}
    xm = x.clone().requires_grad_()
    torch.manual_seed(7)
    total = module.compute_loss(xm, y)
    total.backward()
    got_buffers = {k: v.clone() for k, v in head.named_buffers()}
    got = [total.detach(), xm.grad, head.weight.grad]
    per_prefix = [v.detach() for v in module._prefix_losses or []]

    head.load_state_dict(start)
    head.weight.grad = None
    xh = x.clone().requires_grad_()
    want_total, want_prefix, want_buffers = _head_by_hand(head, xh, y, seed=7)
    want_total.backward()
    want = [want_total.detach(), xh.grad, head.weight.grad]
    for a, b in zip(got + per_prefix, want + [v.detach() for v in want_prefix], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))
    for name, value in want_buffers.items():  # statistics updated once, by the largest prefix
        torch.testing.assert_close(got_buffers[name], value, rtol=1e-6, atol=1e-7)
    # Prefixes differ from one another: a wrong slice could not pass by accident.
    assert len({round(float(v), 5) for v in per_prefix}) == len(DIMS)


class _RecordingMiner(miners.MultiSimilarityMiner):
    def __init__(self) -> None:
        super().__init__(epsilon=0.3)
        self.widths: list[int] = []

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor, *args: Any) -> Any:
        self.widths.append(embeddings.shape[1])
        return super().mine(embeddings, labels, *args)


def test_pml_loss_and_miner_score_each_prefix_on_its_own() -> None:
    x, y = _inputs(1, b=24)
    y = y % 5  # several items per class: pairs to mine
    miner = _RecordingMiner()
    loss_fn = losses.MultiSimilarityLoss()
    module = MetricLearningModule(
        nn.Identity(),
        neck=nn.Identity(),
        loss=loss_fn,
        miner=miner,
        embedding_dim=D,
        matryoshka_dims=list(DIMS),
        matryoshka_weights=list(WEIGHTS),
    )
    xm = x.clone().requires_grad_()
    total = module.compute_loss(xm, y)
    total.backward()
    assert miner.widths == list(DIMS)  # the miner saw each prefix, not the whole embedding

    xh = x.clone().requires_grad_()
    by_hand = []
    for d in DIMS:
        tuples = miner(prefix(x, d), y)  # retrieval's definition of a prefix
        by_hand.append(loss_fn(F.normalize(xh[:, :d], dim=1), y, tuples))
    want = _weighted_mean(by_hand, WEIGHTS)
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xm.grad, xh.grad, rtol=1e-5, atol=1e-7)
    assert [float(v.detach()) for v in module._prefix_losses or []] == pytest.approx(
        [float(v.detach()) for v in by_hand], rel=1e-6
    )


def _module(head: MarginHead | None = None, **kwargs: Any) -> MetricLearningModule:
    return MetricLearningModule(
        nn.Identity(),
        neck=nn.Identity(),
        head=head if head is not None else _head(CurricularFaceHead, sample_rate=0.5),
        embedding_dim=D,
        **kwargs,
    )


def _loss_and_grads(module: MetricLearningModule, seed: int) -> list[torch.Tensor]:
    x, y = _inputs(2)
    x.requires_grad_()
    torch.manual_seed(seed)
    loss = module.compute_loss(x, y)
    loss.backward()
    head = module.head
    assert head is not None
    return [loss.detach(), x.grad, head.weight.grad, *[b.clone() for b in head.buffers()]]


def test_off_is_the_plain_objective_bit_for_bit() -> None:
    plain = _module()
    head = _head(CurricularFaceHead, sample_rate=0.5)
    direct = [head.loss]  # the head's own loss, called as before Matryoshka existed
    x, y = _inputs(2)
    x.requires_grad_()
    torch.manual_seed(3)
    loss = direct[0](x, y)
    loss.backward()
    want = [loss.detach(), x.grad, head.weight.grad, *[b.clone() for b in head.buffers()]]
    got = _loss_and_grads(plain, seed=3)
    # Only the whole embedding, as a one-entry Matryoshka list: the same computation.
    whole = _loss_and_grads(_module(matryoshka_dims=[D]), seed=3)
    for a, b, c in zip(got, want, whole, strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert plain.matryoshka is None and plain._prefix_losses is None


def test_off_pml_loss_is_pml_loss_unchanged() -> None:
    from lightning_metric.pml import pml_loss

    x, y = _inputs(3, b=24)
    y = y % 5
    loss_fn = losses.MultiSimilarityLoss()
    module = MetricLearningModule(nn.Identity(), neck=nn.Identity(), loss=loss_fn, embedding_dim=D)
    want, _ = pml_loss(loss_fn, None, x, y, True)
    assert torch.equal(module.compute_loss(x, y), want)


def _counting(select: Callable[..., Any], draws: list[int]) -> Callable[..., Any]:
    def counted(labels: torch.Tensor, n: int) -> Any:
        draws.append(n)
        return select(labels, n)

    return counted


@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_streaming_and_partial_fc_equal_dense(
    cls: Callable[..., MarginHead], sample_rate: float
) -> None:
    x, y = _inputs(4)
    results = []
    for chunk in (None, 5):  # 23 classes: the last chunk is partial
        head = _head(cls, sample_rate=sample_rate, label_smoothing=0.1, chunk_size=chunk)
        draws: list[int] = []
        head.select_classes = _counting(head.select_classes, draws)  # type: ignore[method-assign]
        xr = x.clone().requires_grad_()
        torch.manual_seed(11)
        per_prefix = head.prefix_losses(xr, y, DIMS)
        _weighted_mean(per_prefix, WEIGHTS).backward()
        assert len(draws) == (1 if sample_rate < 1 else 0)  # one draw serves every prefix
        results.append([*(v.detach() for v in per_prefix), xr.grad, head.weight.grad])
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_full_prefix_of_prefix_losses_is_loss() -> None:
    head = _head(ArcFaceHead)
    x, y = _inputs(5)
    small, full = head.prefix_losses(x, y, [3, D])
    assert torch.equal(full, head.loss(x, y)) and not torch.equal(small, full)


def test_a_nan_row_makes_every_prefix_loss_nan_and_keeps_statistics() -> None:
    head = _head(CurricularFaceHead)
    x, y = _inputs(6)
    x[3, -1] = float("nan")  # outside the small prefixes: still a poisoned batch
    t = head.t.clone()
    values = head.prefix_losses(x, y, DIMS)
    assert all(bool(v.isnan()) for v in values) and torch.equal(head.t, t)


# ------------------------------------------------------------------- sharded centres (DDP)
WORLD = 2
DDP_CASES: list[tuple[type[MarginHead], float, dict[str, Any]]] = [
    (ArcFaceHead, 1.0, {}),
    (CosFaceHead, 0.5, {"chunk_size": 2}),
    (CurricularFaceHead, 1.0, {"momentum": 0.5}),
    (AdaFaceHead, 0.5, {"momentum": 0.5}),
]


def _prefix_losses(head: MarginHead, embeddings: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per_prefix = head.prefix_losses(embeddings, y, DIMS)
    return torch.stack([*per_prefix, _weighted_mean(per_prefix, WEIGHTS)])


def _model(cls: type[MarginHead], rate: float, kwargs: dict[str, Any]) -> ShardedHeadModel:
    return ShardedHeadModel(cls, rate, kwargs, D, C, _prefix_losses)


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    record: list[torch.Tensor] = []
    offset = [0]
    record_sampling(record, offset)
    results = []
    for cls, rate, kwargs in DDP_CASES:
        model = _model(cls, rate, kwargs)
        model.head.shard(rank, world)
        offset[0] = model.head.class_shard.start  # type: ignore[union-attr]
        record.clear()
        x, y = rank_batch(rank, C)
        values = model(x, y)
        values[-1].backward()
        backbone = []
        for p in model.backbone.parameters():  # the replicas' average, as DDP takes it
            grad = p.grad.clone()
            dist.all_reduce(grad)
            backbone.append(grad / world)
        results.append(
            {
                "values": values.detach(),
                "backbone": backbone,
                "centres": model.head.weight.grad.clone(),
                "buffers": {k: v.clone() for k, v in model.head.named_buffers()},
                "sampled": torch.cat(record) if record else None,
            }
        )
    torch.save(results, Path(folder) / f"rank{rank}.pt")


def _one_process(
    cls: type[MarginHead], rate: float, kwargs: dict[str, Any], sampled: Any
) -> dict[str, Any]:
    model = _model(cls, rate, kwargs)
    x, y = all_batches(WORLD, C)
    with replay_sampling(sampled):
        values = model(x, y)
    values[-1].backward()
    return {
        "values": values.detach(),
        "backbone": [p.grad for p in model.backbone.parameters()],
        "centres": model.head.weight.grad,
        "buffers": dict(model.head.named_buffers()),
    }


@pytest.mark.ddp
def test_sharded_centres_equal_one_process(tmp_path: Path) -> None:
    run_ranks(_ddp_worker, WORLD, tmp_path, args=(WORLD, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for i, (cls, rate, kwargs) in enumerate(DDP_CASES):
        got = [ranks[r][i] for r in range(WORLD)]
        sampled = None
        if rate < 1.0:
            sampled = torch.cat([g["sampled"] for g in got]).sort().values
            assert sampled.numel() < C  # sampling did leave classes out
        ref = _one_process(cls, rate, kwargs, sampled)
        for r, g in enumerate(got):
            case = f"{cls.__name__} rate={rate} rank {r}"
            close(g["values"], ref["values"], f"losses, {case}")
            for a, b in zip(g["backbone"], ref["backbone"], strict=True):
                close(a, b, f"backbone gradient, {case}")
            start, stop = shard_bounds(C, WORLD)[r]
            close(g["centres"], ref["centres"][start:stop], f"centre gradient, {case}")
            for name, value in ref["buffers"].items():
                close(g["buffers"][name], value, f"{name}, {case}")


# ------------------------------------------------------------------------ training and YAML
def test_training_logs_the_total_and_each_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.arange(32) % 4
    module = MetricLearningModule(
        nn.Linear(6, D),
        neck=nn.Identity(),
        head=NormSoftmaxHead,
        num_classes=4,
        embedding_dim=D,
        matryoshka_dims=list(DIMS),
        matryoshka_weights=list(WEIGHTS),
    )
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    logged = trainer.callback_metrics
    prefixes = [float(logged[f"train/loss/d{d}"]) for d in DIMS]
    assert len(set(prefixes)) == len(DIMS)
    want = sum(w * v for w, v in zip(WEIGHTS, prefixes, strict=True)) / sum(WEIGHTS)
    assert float(logged["train/loss"]) == pytest.approx(want, rel=1e-6)


def test_example_overlay_builds_a_matryoshka_model_and_its_grid() -> None:
    from lightning_metric.callbacks import RecallAtK
    from lightning_metric.cli import main

    configs = ["glyphs_arcface.yaml", "matryoshka.yaml"]
    args = [a for c in configs for a in ("--config", str(ROOT / "examples" / "configs" / c))]
    cli = main([*args, "--trainer.logger=false"], run=False)
    matryoshka = cli.model.matryoshka
    assert matryoshka is not None and matryoshka.dims == (16, 32, 64, 128)
    assert matryoshka.weights == (1.0, 1.0, 1.0, 3.0)
    recall = [c for c in cli.trainer.callbacks if isinstance(c, RecallAtK)]
    assert len(recall) == 1 and recall[0].metrics.dims == (16, 32, 64, 128)
    x = torch.zeros(2, 1, 32, 32)
    assert cli.model.eval()(x).shape == (2, 128)


def test_tiny_fit_from_yaml_trains_every_prefix(tmp_path: Path) -> None:
    from lightning_metric.cli import main

    config = str(ROOT / "examples" / "configs" / "digits_arcface.yaml")
    cli = main(
        [
            "fit",
            "--config",
            config,
            "--model.init_args.matryoshka_dims=[8, 16, 32]",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.model.matryoshka.dims == (8, 16, 32)
    logged = cli.trainer.callback_metrics
    prefixes = [float(logged[f"train/loss/d{d}"]) for d in (8, 16, 32)]
    assert float(logged["train/loss"]) == pytest.approx(sum(prefixes) / 3, rel=1e-6)


def test_docstring_examples_of_the_matryoshka_module() -> None:
    import doctest

    import lightning_metric.matryoshka as module

    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
