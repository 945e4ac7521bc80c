"""ShardedCentres on its own: a checkpoint's centres (and their Adam moments) saved whole and
cut into each rank's shard equal the original tensor's shards; sub-centres move with their
class; with 2 gloo ranks the saved matrix is the shards gathered in rank order.

The same object inside Lightning's DDP training is tested in heads/test_sharded_training.py."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_harness import run_ranks
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_metric.heads import ArcFaceHead, ShardingError, SubCenterArcFaceHead
from lightning_metric.heads.sharding import CHECKPOINT_KEY, shard_bounds
from lightning_metric.sharded_centres import ShardedCentres

D, C = 6, 7


def trained(head: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``head`` inside a model, after one Adam step (so the optimizer state has moments)."""
    model = nn.ModuleDict({"neck": nn.Linear(D, D), "head": head})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x, labels = torch.randn(10, D), torch.arange(10) % C
    head.loss(model["neck"](x), labels).backward()
    optimizer.step()
    return model, optimizer


def saved(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    centres = ShardedCentres(model["head"])
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    centres.save(checkpoint, centres.weight_key(model.named_parameters()), [optimizer])
    return checkpoint


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("head_cls", [ArcFaceHead, SubCenterArcFaceHead])
def test_save_then_load_per_rank_gives_the_original_shards(world, head_cls):
    head = head_cls(D, C, shard_classes=True)
    model, optimizer = trained(head)
    k = getattr(head, "sub_centers", 1)
    weight = head.weight.detach().clone()
    moments = {n: t.clone() for n, t in optimizer.state[head.weight].items() if t.ndim == 2}
    checkpoint = saved(model, optimizer)
    assert checkpoint[CHECKPOINT_KEY]["shape"] == [C * k, D]
    index = checkpoint[CHECKPOINT_KEY]["optimizer_state"]
    assert index == [[0, len(list(model.parameters())) - 1]]  # the head's weight is last
    shards, moment_shards = [], {n: [] for n in moments}
    for rank in range(world):
        local = copy.deepcopy(head)
        local.shard(rank, world)  # no process group: the matrix is already rank 0's
        ckpt = copy.deepcopy(checkpoint)
        ShardedCentres(local).load(ckpt, "head.weight", "test checkpoint")
        start, stop = shard_bounds(C, world)[rank]
        part = ckpt["state_dict"]["head.weight"]
        assert part.shape == local.weight.shape == ((stop - start) * k, D)
        shards.append(part)
        for name in moments:
            moment_shards[name].append(ckpt["optimizer_states"][0]["state"][index[0][1]][name])
        # The live optimizer state is not cut: the checkpoint's state dicts are new ones.
        assert optimizer.state[head.weight]["exp_avg"].shape == (C * k, D)
    assert torch.equal(torch.cat(shards), weight)
    for name, full in moments.items():
        assert torch.equal(torch.cat(moment_shards[name]), full)


def test_whole_head_loads_unchanged_and_a_wrong_shape_names_the_source():
    model, optimizer = trained(ArcFaceHead(D, C))
    checkpoint = saved(model, optimizer)
    before = checkpoint["state_dict"]["head.weight"].clone()
    ShardedCentres(model["head"]).load(checkpoint, "head.weight", "ckpt A")
    assert torch.equal(checkpoint["state_dict"]["head.weight"], before)
    other = ShardedCentres(ArcFaceHead(D, C + 1))
    with pytest.raises(
        ShardingError, match=r"ckpt A: `head.weight` has shape \(7, 6\), expected \(8, 6\)"
    ):
        other.load(checkpoint, "head.weight", "ckpt A")
    with pytest.raises(ShardingError, match=r"ckpt B holds no class centres `head.other`"):
        other.load(checkpoint, "head.other", "ckpt B")


def test_weight_key_is_the_name_in_the_owning_model():
    head = ArcFaceHead(D, C)
    outer = nn.ModuleDict({"inner": nn.ModuleDict({"objective": head})})
    assert ShardedCentres(head).weight_key(outer.named_parameters()) == "inner.objective.weight"
    with pytest.raises(ValueError, match="ArcFaceHead are not among the model's parameters"):
        ShardedCentres(head).weight_key(nn.Linear(2, 2).named_parameters())


def test_setup_shards_only_under_ddp_with_shard_classes():
    ddp = DDPStrategy()
    assert ShardedCentres(ArcFaceHead(D, C)).setup(ddp, 1, 2) is False  # shard_classes=False
    whole = ArcFaceHead(D, C, shard_classes=True)
    assert ShardedCentres(whole).setup(SingleDeviceStrategy("cpu"), 0, 1) is False
    assert whole.class_shard is None
    head = ArcFaceHead(D, C, shard_classes=True)
    full = head.weight.detach().clone()
    assert ShardedCentres(head).setup(ddp, 1, 2) is True
    assert torch.equal(head.weight, full[4:7]) and head.class_shard.start == 4
    with pytest.raises(
        ShardingError, match=r"needs Lightning's DDP strategy.*got FSDPStrategy with 2"
    ):
        ShardedCentres(ArcFaceHead(D, C, shard_classes=True)).setup(
            pl.strategies.FSDPStrategy(), 0, 2
        )


def _gather_worker(rank: int, folder: str) -> None:
    torch.manual_seed(0)  # every rank builds the same whole head, as DDP's broadcast makes it
    head = SubCenterArcFaceHead(D, C, sub_centers=2, shard_classes=True)
    whole = head.weight.detach().clone()
    model, optimizer = nn.ModuleDict({"head": head}), None
    head.shard(rank, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = saved(model, optimizer)  # a collective: both ranks save together
    if rank == 0:
        assert torch.equal(checkpoint["state_dict"]["head.weight"], whole)
        assert checkpoint[CHECKPOINT_KEY]["saved_by_world_size"] == 2
        torch.save(checkpoint, Path(folder) / "centres.pt")


@pytest.mark.ddp
def test_two_ranks_save_the_whole_matrix_gathered_in_rank_order(tmp_path):
    run_ranks(_gather_worker, 2, tmp_path, args=(str(tmp_path),))
    checkpoint = torch.load(tmp_path / "centres.pt", weights_only=True)
    torch.manual_seed(0)
    expected = SubCenterArcFaceHead(D, C, sub_centers=2, shard_classes=True).weight.detach()
    assert torch.equal(checkpoint["state_dict"]["head.weight"], expected)
