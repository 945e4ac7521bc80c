from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
from lightning_metric.batch import EmbeddingBatch, step_embeddings
from lightning_metric.heads import ArcFaceHead, CosFaceHead
from lightning_metric.module import split_batch
from lightning_metric.necks import EmbeddingNeck


def make_module(**kwargs) -> MetricLearningModule:
    defaults = dict(backbone=SmallCNN(in_channels=1, width=4), embedding_dim=16)
    defaults.update(kwargs)
    return MetricLearningModule(**defaults)


def test_forward_returns_unit_norm_float32_embeddings():
    module = make_module(head=ArcFaceHead, num_classes=5).eval()
    x = torch.randn(6, 1, 12, 12)
    emb = module(x)
    assert emb.shape == (6, 16)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    # embed() is the pre-normalisation output; forward is exactly its direction.
    raw = module.embed(x)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(emb, raw / raw.norm(dim=1, keepdim=True))


def test_head_factory_is_built_with_embedding_dim_and_num_classes():
    module = make_module(head=partial(CosFaceHead, margin=0.25), num_classes=7)
    assert isinstance(module.head, CosFaceHead)
    assert module.head.weight.shape == (7, 16)
    assert module.head.margin == 0.25


def test_head_instance_is_used_as_is():
    head = ArcFaceHead(16, 3)
    assert make_module(head=head).head is head


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one objective"),
        ({"head": ArcFaceHead, "num_classes": 3, "loss": losses.ContrastiveLoss()}, "exactly one"),
        ({"head": ArcFaceHead}, "needs num_classes"),
        (
            {"head": ArcFaceHead, "num_classes": 3, "miner": miners.BatchHardMiner()},
            "BatchHardMiner",
        ),
        ({"loss": losses.ContrastiveLoss(), "lr_scheduler_interval": "batch"}, "'batch'"),
    ],
)
def test_bad_objective_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_head_loss_equals_cross_entropy_on_margin_logits():
    module = make_module(head=ArcFaceHead, num_classes=4)
    emb = torch.randn(8, 16)
    labels = torch.randint(0, 4, (8,))
    expected = F.cross_entropy(module.head(emb, labels), labels)
    torch.testing.assert_close(module.compute_loss(emb, labels), expected)


def test_pml_loss_and_miner_see_normalised_embeddings():
    loss, miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
    module = make_module(loss=loss, miner=miner)
    emb = torch.randn(12, 16) * 5
    labels = torch.arange(4).repeat(3)
    unit = F.normalize(emb, dim=1)
    expected = loss(unit, labels, miner(unit, labels))
    torch.testing.assert_close(module.compute_loss(emb, labels), expected)


def test_objective_parameters_get_their_own_learning_rate():
    module = make_module(
        loss=losses.ProxyAnchorLoss(num_classes=5, embedding_size=16),
        objective_lr=0.5,
        optimizer=partial(torch.optim.SGD, lr=0.01),
    )
    optimizer = module.configure_optimizers()
    model_group, objective_group = optimizer.param_groups
    assert model_group["lr"] == 0.01 and objective_group["lr"] == 0.5
    assert {id(p) for p in objective_group["params"]} == {
        id(p) for p in module.loss_fn.parameters()
    }
    all_ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in module.parameters())


def test_parameter_free_loss_has_a_single_group():
    module = make_module(loss=losses.ContrastiveLoss())
    assert len(module.configure_optimizers().param_groups) == 1


def test_scheduler_is_returned_with_its_interval():
    module = make_module(
        loss=losses.ContrastiveLoss(),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1),
        lr_scheduler_interval="step",
    )
    config = module.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step"


def test_split_batch_accepts_dicts_and_tuples_and_rejects_others():
    x, y, i = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2)
    assert split_batch({"x": x, "label": y, "index": i})[2] is i
    assert split_batch((x, y))[2] is None
    with pytest.raises(ValueError, match="missing \\['label'\\]"):
        split_batch({"x": x})
    with pytest.raises(ValueError, match="got Tensor"):
        split_batch(x)


def test_bad_labels_reach_the_user_as_value_error():
    module = make_module(head=ArcFaceHead, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        module.compute_loss(torch.randn(2, 16), torch.tensor([0, 3]))


def test_neck_sizes_from_backbone_and_rejects_bad_shapes():
    module = make_module(head=ArcFaceHead, num_classes=2)
    assert module.neck.linear.in_features == module.backbone.num_features
    with pytest.raises(ValueError, match="shape"):
        EmbeddingNeck(4, 8)(torch.randn(2, 3, 4, 5, 6))


class CenterPull(MetricLearningModule):
    """A user's subclass: adds a penalty through the documented compute_loss hook."""

    def compute_loss(self, embeddings, labels):
        self.extra_called = True
        return super().compute_loss(embeddings, labels) + 0.0 * embeddings.sum()


def test_training_reduces_loss_and_subclass_hooks_are_used(tmp_path):
    torch.manual_seed(0)
    centers = torch.randn(4, 1, 8, 8) * 2
    labels = torch.arange(4).repeat_interleave(16)
    x = centers[labels] + 0.3 * torch.randn(64, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, labels, torch.arange(64)), batch_size=16, shuffle=True)
    module = CenterPull(
        backbone=SmallCNN(in_channels=1, width=4),
        embedding_dim=8,
        head=partial(CosFaceHead, scale=16.0, margin=0.2),
        num_classes=4,
        optimizer=partial(torch.optim.Adam, lr=1e-2),
    )
    before = module.compute_loss(module.embed(x), labels).item()
    trainer = L.Trainer(
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    module.eval()
    after = module.compute_loss(module.embed(x), labels).item()
    assert module.extra_called
    assert after < 0.5 * before


def test_eval_steps_return_an_embedding_batch_that_step_embeddings_reads():
    module = make_module(head=ArcFaceHead, num_classes=3).eval()
    x, labels, index = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    batch = {"x": x, "label": labels, "index": index}
    with torch.no_grad():
        out = module.validation_step(batch, 0)
    assert isinstance(out, EmbeddingBatch)
    torch.testing.assert_close(out.embeddings, module(x))
    assert out.labels is labels and out.index is index
    # Code written for the former dict output still reads it by key.
    assert out["embeddings"] is out.embeddings and out[2] is index
    with pytest.raises(KeyError):
        out["label"]
    # step_embeddings takes the typed output and the dict a subclass may return, alike.
    as_dict = {"embeddings": out.embeddings, "labels": labels}
    for outputs in (out, as_dict):
        embeddings, got_labels, got_index = step_embeddings(module, outputs, batch, "test")
        torch.testing.assert_close(embeddings, out.embeddings)
        assert torch.equal(got_labels, labels) and torch.equal(got_index, index)
    # Without an index the batch has none either: None, not an invented one.
    no_index = module.predict_step((x, labels), 0)
    assert no_index.index is None
    assert step_embeddings(module, no_index, (x, labels), "test")[2] is None
