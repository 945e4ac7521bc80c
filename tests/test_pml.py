"""The pytorch-metric-learning path: PML objects from YAML, param groups, bad input, empty mining."""

import sys
from functools import partial

import lightning as L
import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers
from repo_paths import CONFIGS
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import MetricLearningModule
from lightning_metric.cli import main
from lightning_metric.distributed import gather_for_loss


def tiny(**kwargs) -> MetricLearningModule:
    """A BatchNorm-free model on 8-dim inputs: fast, and exact for gradient comparisons."""
    defaults = dict(
        backbone=nn.Sequential(nn.Linear(8, 12), nn.Tanh()), neck=nn.Linear(12, 6), embedding_dim=6
    )
    defaults.update(kwargs)
    return MetricLearningModule(**defaults)


# -- example configs ------------------------------------------------------------------------


def _check_triplet_cosine(model: MetricLearningModule) -> None:
    loss = model.loss_fn
    assert isinstance(loss, losses.TripletMarginLoss) and loss.margin == 0.1
    assert isinstance(loss.distance, distances.CosineSimilarity)
    assert isinstance(loss.reducer.reducers["loss"], reducers.ThresholdReducer)
    assert loss.reducer.reducers["loss"].high == 0.3
    assert isinstance(loss.embedding_regularizer, regularizers.LpRegularizer)
    assert isinstance(model.miner, miners.MultiSimilarityMiner)


def _check_multisimilarity(model: MetricLearningModule) -> None:
    assert isinstance(model.loss_fn, losses.MultiSimilarityLoss) and model.loss_fn.beta == 50.0
    # Nothing of the base config's triplet loss (its LpDistance) leaks into the overlay.
    assert isinstance(model.loss_fn.distance, distances.CosineSimilarity)
    assert isinstance(model.miner, miners.MultiSimilarityMiner)


def _check_contrastive(model: MetricLearningModule) -> None:
    assert isinstance(model.loss_fn, losses.ContrastiveLoss)
    assert isinstance(model.miner, miners.BatchEasyHardMiner)
    assert model.miner.neg_strategy == "semihard"


def _check_proxyanchor(model: MetricLearningModule) -> None:
    loss = model.loss_fn
    assert isinstance(loss, losses.ProxyAnchorLoss)
    # num_classes came from the data module, embedding_size from embedding_dim (CLI links).
    assert loss.proxies.shape == (model.hparams.num_classes, model.embedding_dim)
    groups = model.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["model", "objective"]
    assert groups[1]["params"] == [loss.proxies] and groups[1]["lr"] == 0.1


def _check_ntxent(model: MetricLearningModule) -> None:
    assert isinstance(model.loss_fn, losses.NTXentLoss) and model.loss_fn.temperature == 0.1
    assert model.miner is None


def _check_xbm(model: MetricLearningModule) -> None:
    xbm = model.loss_fn
    assert isinstance(xbm, losses.CrossBatchMemory)
    assert isinstance(xbm.loss, losses.ContrastiveLoss)
    assert isinstance(xbm.miner, miners.MultiSimilarityMiner)
    assert xbm.embedding_memory.shape == (4096, model.embedding_dim)
    # Two steps of 16 were enqueued, and the memory is a buffer (saved, moved, synced by DDP).
    assert xbm.queue_idx == 32
    assert xbm.embedding_memory[:32].norm(dim=1).min() > 0.99
    assert "loss_fn.embedding_memory" in model.state_dict()


@pytest.mark.parametrize(
    "configs, check",
    [
        (["glyphs_triplet_cosine.yaml"], _check_triplet_cosine),
        (["glyphs_triplet.yaml", "pml/multisimilarity.yaml"], _check_multisimilarity),
        (["glyphs_triplet.yaml", "pml/contrastive.yaml"], _check_contrastive),
        (["glyphs_triplet.yaml", "pml/proxyanchor.yaml"], _check_proxyanchor),
        (["glyphs_triplet.yaml", "pml/ntxent.yaml"], _check_ntxent),
        (["glyphs_triplet.yaml", "pml/xbm.yaml"], _check_xbm),
    ],
)
def test_example_config_builds_pml_objects_and_trains(configs, check, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-metric"])  # pytest's own flags are not ours
    cli = main(
        [
            "fit",
            *(f"--config={CONFIGS / path}" for path in configs),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--model.init_args.backbone.init_args.width=4",
            "--data.init_args.batch_size=16",
            "--data.init_args.max_classes=40",
        ]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    has_miner = cli.model.miner is not None or getattr(cli.model.loss_fn, "miner", None)
    assert ("train/empty_mining_batches" in cli.trainer.callback_metrics) == bool(has_miner)
    check(cli.model)


# -- learnable losses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        partial(losses.ArcFaceLoss, num_classes=5, embedding_size=6),
        partial(losses.ProxyAnchorLoss, num_classes=5, embedding_size=6),
    ],
)
def test_learnable_loss_is_a_submodule_with_its_own_param_group(loss):
    module = tiny(loss=loss(), objective_lr=0.3, optimizer=partial(torch.optim.SGD, lr=0.01))
    loss_params = list(module.loss_fn.parameters())
    assert loss_params, "the loss must own learnable parameters for this test"
    # A submodule: in the state dict (checkpoints) and in module.parameters() (DDP syncs them).
    assert any(key.startswith("loss_fn.") for key in module.state_dict())
    model_group, objective_group = module.configure_optimizers().param_groups
    assert objective_group["lr"] == 0.3 and model_group["lr"] == 0.01
    assert [id(p) for p in objective_group["params"]] == [id(p) for p in loss_params]
    # ...and the loss's parameters really are trained through the module's loss.
    module.compute_loss(torch.randn(10, 6), torch.arange(5).repeat(2)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_params)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (
            {"loss": losses.ArcFaceLoss(5, 6), "miner": miners.BatchHardMiner()},
            ["ArcFaceLoss", "BatchHardMiner"],
        ),
        (
            {"loss": losses.ProxyAnchorLoss(5, 6), "miner": miners.MultiSimilarityMiner()},
            ["ProxyAnchorLoss", "MultiSimilarityMiner"],
        ),
        (
            {"loss": losses.NormalizedSoftmaxLoss(5, 6), "miner": miners.BatchHardMiner()},
            ["NormalizedSoftmaxLoss", "BatchHardMiner"],
        ),
        (
            {"loss": losses.RankedListLoss(0.4, 0.8), "miner": miners.BatchHardMiner()},
            ["RankedListLoss", "BatchHardMiner"],
        ),
        (  # similarity-based miner, distance-based loss: margins in different units
            {"loss": losses.TripletMarginLoss(), "miner": miners.MultiSimilarityMiner()},
            ["MultiSimilarityMiner", "CosineSimilarity", "TripletMarginLoss", "LpDistance"],
        ),
        (
            {
                "loss": losses.CrossBatchMemory(
                    losses.ContrastiveLoss(), 6, miner=miners.MultiSimilarityMiner()
                )
            },
            ["MultiSimilarityMiner", "ContrastiveLoss", "CosineSimilarity"],
        ),
        (
            {
                "loss": losses.CrossBatchMemory(losses.ContrastiveLoss(), 6),
                "miner": miners.BatchHardMiner(),
            },
            ["BatchHardMiner", "CrossBatchMemory(miner=...)"],
        ),
        (
            {
                "loss": losses.CrossBatchMemory(losses.ContrastiveLoss(), 6),
                "gather_across_ranks": False,
            },
            ["CrossBatchMemory", "gather_across_ranks=True"],
        ),
        (
            {"loss": losses.CrossBatchMemory(losses.ContrastiveLoss(), 32)},
            ["embedding_size=32", "embedding_dim=6"],
        ),
        (
            {"loss": losses.ProxyAnchorLoss(5, 6), "num_classes": 7},
            ["num_classes=5", "num_classes=7"],
        ),
    ],
)
def test_bad_pml_composition_raises_naming_both_parts(kwargs, names):
    with pytest.raises(ValueError) as info:
        tiny(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_matching_distances_and_pair_losses_with_miners_are_accepted():
    cosine = distances.CosineSimilarity
    tiny(loss=losses.TripletMarginLoss(distance=cosine()), miner=miners.MultiSimilarityMiner())
    tiny(loss=losses.ContrastiveLoss(), miner=miners.BatchEasyHardMiner())
    tiny(loss=losses.ProxyAnchorLoss(5, 6))  # proxy loss without a miner is fine


def test_memory_smaller_than_the_global_batch_is_a_value_error():
    module = tiny(loss=losses.CrossBatchMemory(losses.ContrastiveLoss(), 6, memory_size=8))
    with pytest.raises(ValueError, match="memory_size=8.*12 embeddings"):
        module.compute_loss(torch.randn(12, 6), torch.arange(4).repeat(3))


# -- empty mining -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, miner",
    [
        (losses.TripletMarginLoss(), miners.BatchHardMiner()),
        (
            losses.TripletMarginLoss(
                distance=distances.CosineSimilarity(),
                reducer=reducers.ThresholdReducer(high=0.3),
            ),
            miners.MultiSimilarityMiner(),
        ),
        (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()),
        (losses.ContrastiveLoss(), miners.BatchEasyHardMiner()),
        (  # no similarity exceeds 1.5: no negative pair is mined either
            losses.NTXentLoss(),
            miners.PairMarginMiner(0.0, 1.5, distance=distances.CosineSimilarity()),
        ),
    ],
)
def test_batch_without_any_mined_tuple_gives_zero_loss_with_gradient(loss, miner):
    module = tiny(loss=loss, miner=miner)
    x = torch.randn(6, 8)
    labels = torch.arange(6)  # all different: no positive, so nothing can be mined
    value = module.compute_loss(module.embed(x), labels)
    assert module._mined_nothing is True
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_empty_mining_batches_are_counted_in_the_logged_metric(tmp_path):
    # 3 batches of 4: the first has a repeated label, the other two are all distinct.
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    loader = DataLoader(TensorDataset(torch.randn(12, 8), labels), batch_size=4)
    module = tiny(loss=losses.TripletMarginLoss(), miner=miners.BatchHardMiner())
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert trainer.callback_metrics["train/empty_mining_batches"].item() == 2.0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_gather_for_loss_is_identity_on_one_process():
    emb, labels = torch.randn(4, 3, requires_grad=True), torch.arange(4)
    out_emb, out_labels = gather_for_loss(emb, labels)
    assert out_emb is emb and out_labels is labels
