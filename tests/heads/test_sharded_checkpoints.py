"""Sharded class centres built in place and checkpointed per rank through
``torch.distributed.checkpoint`` (``ShardedCentresDDPStrategy``), on spawned gloo ranks: each
rank builds only its rows and they equal the one-process init; a checkpoint saved on W ranks
loads on W' ranks with each rank holding exactly its rows of the weights and AdamW moments;
resume is exact; inference reads the file alone; conversion to one file; bad directories.

The consolidated single-file path (plain ``strategy="ddp"``) is tested in
test_sharded_training.py, whose model and data these tests reuse."""

from __future__ import annotations

import copy
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from ddp_harness import FileRendezvousShardedDDP, run_ranks
from test_sharded_training import (
    F_IN,
    B,
    C,
    D,
    _adam,
    _Data,
    _Items,
    _module,
    _SaveShard,
    trainer_for,
)
from torch import nn
from torch.utils.data import DataLoader

from lightning_metric import MetricLearningModule
from lightning_metric.centre_checkpoint import (
    PENDING_KEY,
    CentreLayout,
    centres_directory,
    convert_checkpoint,
    save_pieces,
)
from lightning_metric.heads import ArcFaceHead, ShardingError, SubCenterArcFaceHead
from lightning_metric.heads.base import deferred_centres
from lightning_metric.heads.init import INIT_BLOCK_ROWS, seeded_rows
from lightning_metric.heads.sharding import CHECKPOINT_KEY, shard_bounds
from lightning_metric.sharded_centres import ShardedCentres
from lightning_metric.strategies import ShardedCentresDDPStrategy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread

BLOCK = 2  # rows per saved piece: several pieces per rank, pieces straddling new shards


# --- built in place ------------------------------------------------------------------------


def test_seeded_rows_of_any_split_equal_the_whole_across_blocks() -> None:
    rows = 2 * INIT_BLOCK_ROWS + 5
    whole = seeded_rows(11, 0, rows, 3)
    cuts = [0, 1, INIT_BLOCK_ROWS - 1, INIT_BLOCK_ROWS + 7, rows]
    parts = [seeded_rows(11, a, b, 3) for a, b in pairwise(cuts)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(seeded_rows(12, 0, 5, 3), whole[:5])  # the seed matters
    assert abs(float(whole.std()) - 0.01) < 1e-3


def test_deferred_head_materializes_to_the_one_process_init() -> None:
    torch.manual_seed(3)
    eager = SubCenterArcFaceHead(D, C, sub_centers=2, shard_classes=True)
    torch.manual_seed(3)
    with deferred_centres():
        lazy = SubCenterArcFaceHead(D, C, sub_centers=2, shard_classes=True)
    assert lazy.weight.is_meta and lazy.weight.shape == (2 * C, D)
    with pytest.raises(ShardingError, match="not built yet"):
        lazy.loss(torch.randn(2, D), torch.tensor([0, 1]))
    lazy.materialize()
    assert torch.equal(lazy.weight, eager.weight)
    torch.manual_seed(3)
    module = _module()  # MetricLearningModule defers a shard_classes head
    assert module.head.weight.is_meta


def _build_in_place(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(100 + rank)  # ranks disagree: rank 0's seed must win
    if rank == 0:
        torch.manual_seed(0)
    with deferred_centres():
        head = SubCenterArcFaceHead(D, 11, sub_centers=2, shard_classes=True)
    assert head.weight.is_meta  # never the whole matrix on this rank
    head.shard(rank, world)
    torch.save(head.weight.detach(), Path(folder) / f"rows{rank}.pt")


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_built_in_place_equal_the_one_process_init(world: int, tmp_path: Path) -> None:
    run_ranks(_build_in_place, world, tmp_path, args=(world, str(tmp_path)))
    torch.manual_seed(0)
    # The same head in one process (where shard_classes is a no-op) draws the whole matrix.
    whole = SubCenterArcFaceHead(D, 11, sub_centers=2, shard_classes=True).weight.detach()
    shards = [torch.load(tmp_path / f"rows{r}.pt") for r in range(world)]
    for shard, (a, b) in zip(shards, shard_bounds(11, world), strict=True):
        assert shard.shape == (2 * (b - a), D)
    assert torch.equal(torch.cat(shards), whole)


# --- saved per rank, loaded in any world size ------------------------------------------------


def _fit_sharded(
    root: Path, world: int, steps: int, ckpt_path: Path | None = None, shards: bool = False
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    strategy = FileRendezvousShardedDDP(root, centre_block_rows=BLOCK)
    trainer = trainer_for(root, world, steps, strategy, [_SaveShard(root)] if shards else [])
    module = _module(optimizer=_adam())
    trainer.fit(module, _Data(B * 2 // world if world < 3 else B), ckpt_path=ckpt_path)
    return root / "last.ckpt"


def _whole(path: Path, tmp: Path) -> dict[str, Any]:
    """The sharded checkpoint ``path`` as one file (through the conversion tool)."""
    target = tmp / f"whole-{path.parent.name}-{path.stem}.ckpt"
    convert_checkpoint(path, target)
    return torch.load(target, weights_only=False)


def _centre_moments(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    index = checkpoint[CHECKPOINT_KEY]["optimizer_state"][0][1]
    return dict(checkpoint["optimizer_states"][0]["state"][index])


@pytest.fixture(scope="module")
def sharded_step(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The sharded checkpoint of one AdamW step on W ranks (made once per W)."""
    made: dict[int, Path] = {}

    def checkpoint(world: int) -> Path:
        if world not in made:
            made[world] = _fit_sharded(tmp_path_factory.mktemp(f"sharded-{world}"), world, 1)
        return made[world]

    return checkpoint


@pytest.mark.ddp
def test_the_file_holds_no_centres_and_each_rank_wrote_its_pieces(sharded_step: Any) -> None:
    path = sharded_step(2)
    checkpoint = torch.load(path, weights_only=False)
    assert "head.weight" not in checkpoint["state_dict"]
    assert set(_centre_moments(checkpoint)) == {"step"}  # the moments are in the directory
    layout = CentreLayout.from_dict(checkpoint[CHECKPOINT_KEY]["layout"])
    assert layout.row_bounds == ((0, 4), (4, 7)) and layout.block_rows == BLOCK
    files = sorted(p.name for p in centres_directory(path).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "save_id"]
    assert (centres_directory(path) / "save_id").read_text() == checkpoint[CHECKPOINT_KEY][
        "save_id"
    ]


@pytest.mark.ddp
@pytest.mark.parametrize(("source", "target"), [(2, 1), (1, 3), (2, 3), (4, 2)])
def test_checkpoint_of_w_ranks_loads_on_w_prime_ranks(
    source: int, target: int, sharded_step: Any, tmp_path: Path
) -> None:
    saved = _whole(sharded_step(source), tmp_path)
    weight, moments = saved["state_dict"]["head.weight"], _centre_moments(saved)
    assert weight.shape == (C, D) and moments["exp_avg"].shape == (C, D)
    out = tmp_path / "resumed"
    _fit_sharded(out, target, 2, ckpt_path=sharded_step(source), shards=True)
    for rank, (start, stop) in enumerate(shard_bounds(C, target)):
        shard = torch.load(out / f"shard{rank}.pt")
        assert torch.equal(shard["weight"], weight[start:stop])
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(shard[name], moments[name][start:stop]), name
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.ddp
def test_resume_from_a_sharded_checkpoint_is_exact(sharded_step: Any, tmp_path: Path) -> None:
    straight = _whole(_fit_sharded(tmp_path / "straight", 2, 2), tmp_path)
    resumed = _whole(_fit_sharded(tmp_path / "second", 2, 2, ckpt_path=sharded_step(2)), tmp_path)
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for i, state in straight["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer_states"][0]["state"][i][name], value), name


def _inference_objects() -> dict[str, Any]:
    return {
        "backbone": nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU()),
        "neck": nn.Linear(16, D),
        "head": partial(ArcFaceHead, scale=16.0, shard_classes=True),
        "num_classes": C,
        "embedding_dim": D,
    }


@pytest.mark.ddp
def test_inference_reads_the_file_alone(sharded_step: Any, tmp_path: Path) -> None:
    path = sharded_step(2)
    whole = _whole(path, tmp_path)
    directory = centres_directory(path)
    hidden = directory.with_name("hidden")
    directory.rename(hidden)  # inference must not need the centres
    try:
        model = MetricLearningModule.load_from_checkpoint(path, **_inference_objects())
        for name, value in model.state_dict().items():
            if name != "head.weight":
                assert torch.equal(value, whole["state_dict"][name]), name
        assert model.head.weight.shape == (0, D)
        with pytest.raises(ShardingError, match="without its class centres"):
            model.head.loss(torch.randn(2, D), torch.tensor([0, 1]))
        x = _Items().x[:5]
        expected = model(x)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        fresh = MetricLearningModule(**_inference_objects())
        loader = DataLoader(_Items(), batch_size=5)
        batches = trainer.predict(fresh, loader, ckpt_path=path)
        assert torch.equal(batches[0].embeddings, expected)
    finally:
        hidden.rename(directory)


# --- one process: the conversion tool and bad directories ----------------------------------


def _write_sharded(path: Path, num_classes: int = C, dim: int = D) -> dict[str, torch.Tensor]:
    """A sharded checkpoint as one rank writes it (no process group): after one AdamW step
    of a whole head, cut into pieces of BLOCK rows. Returns the centres and moments."""
    torch.manual_seed(1)
    head = ArcFaceHead(dim, num_classes, shard_classes=True)
    model = nn.ModuleDict({"neck": nn.Linear(dim, dim), "head": head})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    labels = torch.arange(10) % num_classes
    head.loss(model["neck"](torch.randn(10, dim)), labels).backward()
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    strategy = ShardedCentresDDPStrategy(centre_block_rows=BLOCK)
    ShardedCentres(head).save(checkpoint, "head.weight", [optimizer], strategy)
    pending = checkpoint.pop(PENDING_KEY)
    save_pieces(centres_directory(path), pending, checkpoint[CHECKPOINT_KEY])
    torch.save(checkpoint, path)
    return {"weight": head.weight.detach().clone(), **optimizer.state[head.weight]}


def _resume_load(path: Path, num_classes: int = C, dim: int = D) -> dict[str, Any]:
    checkpoint = torch.load(path, weights_only=False)
    head = ArcFaceHead(dim, num_classes, shard_classes=True)
    ShardedCentres(head).load(checkpoint, "head.weight", f"checkpoint {path}", path, True)
    return checkpoint


def test_convert_writes_one_file_and_never_overwrites(tmp_path: Path) -> None:
    saved = _write_sharded(tmp_path / "a.ckpt")
    one = convert_checkpoint(tmp_path / "a.ckpt", tmp_path / "one.ckpt")
    checkpoint = torch.load(one, weights_only=False)
    assert torch.equal(checkpoint["state_dict"]["head.weight"], saved["weight"])
    state = _centre_moments(checkpoint)
    assert torch.equal(state["exp_avg"], saved["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
    # The result is today's single-file format: it loads whole, or cut for a rank.
    head = ArcFaceHead(D, C, shard_classes=True)
    head.shard(1, 2)
    ShardedCentres(head).load(checkpoint, "head.weight", "one.ckpt")
    assert torch.equal(checkpoint["state_dict"]["head.weight"], saved["weight"][4:7])
    before = one.read_bytes()
    with pytest.raises(FileExistsError, match=r"one\.ckpt exists"):
        convert_checkpoint(tmp_path / "a.ckpt", one)
    assert one.read_bytes() == before
    with pytest.raises(ShardingError, match=r"one\.ckpt holds its class centres itself"):
        convert_checkpoint(one, tmp_path / "again.ckpt")
    assert not (tmp_path / "again.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.centres", "one.ckpt"]


def test_a_rank_reads_only_the_pieces_over_its_rows(tmp_path: Path) -> None:
    saved = _write_sharded(tmp_path / "a.ckpt")
    layout = CentreLayout(C, D, ((0, C),), BLOCK)
    assert layout.pieces_of(3, 5) == [(2, 4), (4, 6)]
    checkpoint = _resume_load(tmp_path / "a.ckpt")
    assert torch.equal(checkpoint["state_dict"]["head.weight"], saved["weight"])
    head = ArcFaceHead(D, C, shard_classes=True)
    head.shard(2, 3)  # rows [5, 7)
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    ShardedCentres(head).load(checkpoint, "head.weight", "a", tmp_path / "a.ckpt", True)
    assert torch.equal(checkpoint["state_dict"]["head.weight"], saved["weight"][5:7])
    assert torch.equal(_centre_moments(checkpoint)["exp_avg"], saved["exp_avg"][5:7])


def test_bad_directories_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    _write_sharded(path)
    directory = centres_directory(path)
    shard = directory / "__0_0.distcp"
    original = shard.read_bytes()
    with pytest.raises(ShardingError, match=r"shape \(7, 8\), expected \(9, 8\).*num_classes"):
        _resume_load(path, num_classes=9)
    with pytest.raises(ShardingError, match=r"shape \(7, 8\), expected \(7, 4\)"):
        _resume_load(path, dim=4)
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(ShardingError, match=r"__0_0\.distcp is truncated"):
        _resume_load(path)
    shard.write_bytes(bytes(len(original)))
    with pytest.raises(ShardingError, match=r"a\.ckpt: could not read rows \[0, 7\).*corrupt"):
        _resume_load(path)
    shard.unlink()
    with pytest.raises(ShardingError, match=r"shard file .*__0_0\.distcp is missing"):
        _resume_load(path)
    (directory / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ShardingError, match=r"\.metadata is not readable DCP metadata"):
        _resume_load(path)
    # The directory of another checkpoint (other num_classes) beside this file.
    other = tmp_path / "other.ckpt"
    _write_sharded(other, num_classes=9)
    copy_of = tmp_path / "b.ckpt"
    copy_of.write_bytes(path.read_bytes())
    centres_directory(other).rename(centres_directory(copy_of))
    with pytest.raises(ShardingError, match=r"b\.ckpt\.centres was written by another save"):
        _resume_load(copy_of)
    # ... even if its save id were made to match, its pieces are not this file's.
    (centres_directory(copy_of) / "save_id").write_text(
        torch.load(copy_of, weights_only=False)[CHECKPOINT_KEY]["save_id"]
    )
    with pytest.raises(
        ShardingError, match=r"holds \(2, 8\) as `weight/rows6`, expected rows \[6, 7\)"
    ):
        _resume_load(copy_of)
    with pytest.raises(ShardingError, match=r"does not exist"):
        _resume_load(other, num_classes=9)
    with pytest.raises(ShardingError, match=r"resume with trainer.fit"):
        checkpoint = torch.load(path, weights_only=False)
        ShardedCentres(ArcFaceHead(D, C)).load(checkpoint, "head.weight", "a", None, True)


def test_the_strategy_checks_its_block_rows() -> None:
    with pytest.raises(ValueError, match="centre_block_rows"):
        ShardedCentresDDPStrategy(centre_block_rows=0)
    assert copy.copy(ShardedCentresDDPStrategy()).centre_block_rows is None
