"""Sharded class centres (``shard_classes=True``): 2 and 3 gloo ranks, each holding a slice of
the centres, give the loss and every gradient of one process holding the whole head on the
concatenated batch, for every head, with and without class-centre sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_harness import run_ranks
from sharded_heads import (
    ShardedHeadModel,
    all_batches,
    close,
    rank_batch,
    record_sampling,
    replay_sampling,
)
from torch.nn.parallel import DistributedDataParallel

from lightning_metric.heads import (
    AdaFaceHead,
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    CurricularFaceHead,
    MarginHead,
    NormSoftmaxHead,
    ShardingError,
    SubCenterArcFaceHead,
)
from lightning_metric.heads.sharding import shard_bounds

D, C = 8, 11

# (head, extra arguments); every one runs with sample_rate 1.0 and 0.5.
CASES: list[tuple[type[MarginHead], dict[str, Any]]] = [
    (NormSoftmaxHead, {}),
    (CosFaceHead, {"chunk_size": 2}),  # several chunks per shard
    (ArcFaceHead, {"label_smoothing": 0.1}),
    (SubCenterArcFaceHead, {"sub_centers": 2}),
    (CombinedMarginHead, {}),
    (CurricularFaceHead, {"momentum": 0.5}),  # a large momentum makes `t` matter
    (AdaFaceHead, {"momentum": 0.5}),
]
RATES = (1.0, 0.5)


def _loss(head: MarginHead, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return head.loss(embeddings, labels)


def _model(cls: type[MarginHead], rate: float, kwargs: dict[str, Any]) -> ShardedHeadModel:
    return ShardedHeadModel(cls, rate, kwargs, D, C, _loss)


def _worker(rank: int, world: int, folder: str) -> None:
    results = []
    record: list[torch.Tensor] = []
    offset = [0]
    record_sampling(record, offset)
    for cls, kwargs in CASES:
        for rate in RATES:
            model = _model(cls, rate, kwargs)
            model.head.shard(rank, world)
            offset[0] = model.head.class_shard.start  # type: ignore[union-attr]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["head.weight"]
            )
            ddp = DistributedDataParallel(model)
            record.clear()
            x, y = rank_batch(rank, C)
            loss = ddp(x, y)
            loss.backward()
            sampled = torch.cat(record) if record else None
            results.append(
                {
                    "loss": loss.detach(),
                    "backbone": [p.grad.clone() for p in model.backbone.parameters()],
                    "centres": model.head.weight.grad.clone(),
                    "buffers": {k: v.clone() for k, v in model.head.named_buffers()},
                    "sampled": sampled,
                }
            )
    torch.save(results, Path(folder) / f"rank{rank}.pt")


def _reference(
    cls: type[MarginHead], rate: float, kwargs: dict[str, Any], world: int, sampled: Any
) -> dict[str, Any]:
    model = _model(cls, rate, kwargs)
    x, y = all_batches(world, C)
    with replay_sampling(sampled):
        loss = model(x, y)
    loss.backward()
    return {
        "loss": loss.detach(),
        "backbone": [p.grad for p in model.backbone.parameters()],
        "centres": model.head.weight.grad,
        "buffers": dict(model.head.named_buffers()),
    }


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_heads_equal_one_process(world: int, tmp_path: Path) -> None:
    run_ranks(_worker, world, tmp_path, args=(world, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    i = 0
    for cls, kwargs in CASES:
        k = kwargs.get("sub_centers", 1)
        for rate in RATES:
            got = [ranks[r][i] for r in range(world)]
            i += 1
            sampled = None
            if rate < 1.0:
                sampled = torch.cat([g["sampled"] for g in got]).sort().values
                assert sampled.numel() < C  # sampling did leave classes out
            ref = _reference(cls, rate, kwargs, world, sampled)
            case = f"{cls.__name__} rate={rate} world={world}"
            for r, g in enumerate(got):
                close(g["loss"], ref["loss"], msg=f"loss, rank {r}, {case}")
                for a, b in zip(g["backbone"], ref["backbone"], strict=True):
                    close(a, b, msg=f"backbone gradient, rank {r}, {case}")
                start, stop = shard_bounds(C, world)[r]
                close(g["centres"], ref["centres"][start * k : stop * k], msg=f"centres {case}")
                for name, value in ref["buffers"].items():
                    close(g["buffers"][name], value, msg=f"{name}, rank {r}, {case}")


def test_shard_without_ddp_is_a_no_op() -> None:
    head = ArcFaceHead(D, C, shard_classes=True)
    plain = ArcFaceHead(D, C)
    plain.load_state_dict(head.state_dict())
    weight = head.weight
    head.shard(0, 1)
    assert head.class_shard is None and head.weight is weight
    x = torch.randn(7, D)
    y = torch.randint(0, C, (7,))
    torch.testing.assert_close(head.loss(x, y), plain.loss(x, y), rtol=0, atol=0)


def test_shard_rejects_fewer_classes_than_ranks() -> None:
    head = ArcFaceHead(D, 3, shard_classes=True)
    with pytest.raises(ShardingError, match=r"num_classes=3.*4 DDP ranks"):
        head.shard(0, 4)


def test_shard_rejects_a_head_that_overrides_the_loss() -> None:
    class Custom(ArcFaceHead):
        def loss(self, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return super().loss(embeddings, labels) * 2

    with pytest.raises(ShardingError, match=r"Custom overrides loss\(\).*2 DDP ranks"):
        Custom(D, C, shard_classes=True).shard(0, 2)


def test_shard_classes_must_be_a_bool() -> None:
    with pytest.raises(ShardingError, match="shard_classes"):
        ArcFaceHead(D, C, shard_classes="yes")  # type: ignore[arg-type]
