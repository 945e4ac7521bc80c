"""RetrievalMetrics(shard_reference=True): every rank keeps its own rows, and the metrics
equal the one-process numbers exactly (uneven shards, duplicate vectors, singletons)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_harness import run_ranks
from torch.utils.data import DistributedSampler

from lightning_metric.distributed import unpad_gathered
from lightning_metric.retrieval import RetrievalMetrics
from lightning_metric.retrieval.rerank import KReciprocal
from lightning_metric.retrieval.sharded import interleaved_positions, merge_candidates


def dyadic(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors with entries +-1/4 (D=16): every cosine is an exact multiple of 1/16,
    so many scores tie exactly and no float rounding can reorder them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randint(0, 2, (num_classes, 16), generator=g).bool()
    labels = torch.arange(n) % num_classes
    flips = torch.rand(n, 16, generator=g) < 0.2
    signs = centres[labels] ^ flips
    x = torch.where(signs, 0.25, -0.25)
    x[7] = x[3]  # duplicate vectors under other labels: exact score ties
    x[30] = x[3]
    labels[n - 1] = 1000  # a singleton class: unscorable
    return x, labels


def floats(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 8, generator=g)
    labels = torch.arange(n) % num_classes
    x = centres[labels] + 0.8 * torch.randn(n, 8, generator=g)
    x[11] = x[5]
    labels[0] = 999
    labels[2] = -7  # any int64 labels, as in one process: negative ...
    labels[[3, 4]] = 10**12  # ... or far apart
    return x, labels


CASES: dict[str, dict[str, Any]] = {
    "loo": {"data": "dyadic", "args": {"k": (1, 2, 4, 8)}, "size": True},
    "loo_index_only": {"data": "floats", "args": {"k": (1, 3)}, "size": False},
    "macro_l2": {"data": "floats", "args": {"average": "macro", "metric": "l2"}, "size": True},
    "ip_clamped": {"data": "dyadic", "args": {"metric": "ip", "k": (1, 500)}, "size": True},
    "grid": {
        "data": "dyadic",
        "args": {"dims": [8, 16], "precisions": ["float32", "int8", "binary"], "k": (1, 4)},
        "size": True,
    },
    "split": {"data": "split", "args": {"k": (1, 2, 4)}, "size": True},
    "repeated": {"data": "repeated", "args": {"k": (1, 2)}, "size": True},
}


def case_rows(name: str) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """The case's datasets as (embeddings, labels, role), one loader each."""
    data = CASES[name]["data"]
    if data == "dyadic":
        return [(*dyadic(61, 9, 0), "both")]
    if data == "floats":
        return [(*floats(59, 7, 1), "both")]
    x, labels = dyadic(61, 9, 2)
    if data == "repeated":
        return [(x, labels, "query"), (x, labels, "reference")]
    return [(x[:23], labels[:23], "query"), (x[23:], labels[23:], "reference")]


def evaluate(name: str, world: int, rank: int, shard: bool) -> dict[str, float]:
    case = CASES[name]
    metric = RetrievalMetrics(shard_reference=shard, **case["args"])
    for x, labels, role in case_rows(name):
        rows = list(DistributedSampler(range(len(x)), world, rank, shuffle=False))
        size = len(x) if case["size"] else None
        for start in range(0, len(rows), 5):
            batch = torch.tensor(rows[start : start + 5], dtype=torch.int64)
            metric.update(x[batch], labels[batch], batch, role=role, dataset_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: float(v) for k, v in metric.compute().items()}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(rank)  # nothing may depend on it
    out = {name: evaluate(name, world, rank, True) for name in CASES}
    # The gathered path in the same group, as a second reference.
    out["gathered_loo"] = evaluate("loo", world, rank, False)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(tmp_path: Path, world: int) -> None:
    run_ranks(_worker, world, tmp_path, args=(world, str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for name in CASES:
        single = evaluate(name, 1, 0, False)
        assert "recall@1" in single or "d8/int8/recall@1" in single
        for r in range(world):
            assert ranks[r][name] == single, (name, r)
    assert ranks[0]["gathered_loo"] == evaluate("loo", 1, 0, False)
    assert evaluate("loo", 1, 0, False)["unscorable_queries"] == 1.0


def test_interleaved_positions_match_unpad_gathered() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        world = int(torch.randint(2, 5, (1,), generator=g))
        counts = torch.randint(0, 6, (world,), generator=g).tolist()
        if sum(counts) == 0:
            continue
        ranks = torch.repeat_interleave(torch.arange(world), torch.tensor(counts))
        order = unpad_gathered(ranks, world)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        ours = torch.cat([interleaved_positions(counts, r) for r in range(world)])
        assert torch.equal(ours, position)
    # Padding: the last positions are dropped.
    assert interleaved_positions([3, 3], 1, padded=1).tolist() == [1, 3, -1]


def test_merge_candidates_orders_ties_by_global_id() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (20, 12), generator=g).float()
    ids = torch.stack([torch.randperm(100, generator=g)[:12] for _ in range(20)])
    labels = ids % 7
    v, i, lab = merge_candidates(scores, ids, labels, 5, descending=True)
    # Brute force: sort by (-score, id).
    for row in range(20):
        pairs = sorted(zip((-scores[row]).tolist(), ids[row].tolist(), strict=True))[:5]
        assert i[row].tolist() == [p[1] for p in pairs]
        assert torch.equal(lab[row], i[row] % 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rerank": KReciprocal()}, "cannot use `rerank`"),
        ({"clustering": True}, "cannot use `clustering`"),
        ({"label_kind": "hierarchical"}, "takes single class ids"),
        ({"precisions": ["binary_rescore"]}, "'binary_rescore'"),
        ({"shard_reference": 1}, "must be a bool"),
    ],
)
def test_unshardable_options_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    args = {"shard_reference": True, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        RetrievalMetrics(**args)


def test_multi_label_refused_at_update() -> None:
    metric = RetrievalMetrics(shard_reference=True)
    with pytest.raises(ValueError, match="takes single class ids"):
        metric.update(torch.randn(4, 8), torch.ones(4, 3, dtype=torch.bool))


def test_one_process_unchanged() -> None:
    x, labels = floats(40, 5, 3)
    plain, sharded = RetrievalMetrics(), RetrievalMetrics(shard_reference=True)
    for m in (plain, sharded):
        m.update(x, labels, torch.arange(40))
    assert {k: float(v) for k, v in plain.compute().items()} == {
        k: float(v) for k, v in sharded.compute().items()
    }
