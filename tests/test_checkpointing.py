"""Checkpoints of MetricLearningModule: the same contents and keys as before the guard, the
sharded-centre lifecycle and this plumbing moved out of module.py (names recorded from that
version below), and a load without the live objects explained through the typed
ObjectiveCountError, while other errors with similar text pass through unchanged."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from pytorch_metric_learning import losses
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
from lightning_metric.checkpointing import missing_objects_error, qualified_name
from lightning_metric.heads import ArcFaceHead
from lightning_metric.pml import ObjectiveCountError, check_objective

pytestmark = pytest.mark.usefixtures("one_thread")

# Recorded from a checkpoint that the module wrote before the refactor (Trainer.save_checkpoint
# after two steps, SmallCNN(in_channels=1, width=4), embedding_dim=8, AdamW).
TOP_LEVEL = {
    "callbacks", "epoch", "global_step", "hparams_name", "hyper_parameters", "loops",
    "lr_schedulers", "optimizer_states", "pytorch-lightning_version", "state_dict",
}  # fmt: skip
NECK = ["neck.bn.bias", "neck.bn.num_batches_tracked", "neck.bn.running_mean",
        "neck.bn.running_var", "neck.bn.weight", "neck.linear.weight"]  # fmt: skip
HPARAMS = {
    "num_classes": 4, "embedding_dim": 8, "objective_lr": None,
    "lr_scheduler_interval": "epoch", "gather_across_ranks": True,
    # Added in 0.3 with defaults that leave training unchanged: older checkpoints load as off.
    "matryoshka_dims": None, "matryoshka_weights": None,
}  # fmt: skip
CASES = {
    "head": (
        dict(head=partial(ArcFaceHead, margin=0.3), num_classes=4),
        ["head.weight", *NECK],
        {"backbone": "lightning_metric.backbones.SmallCNN",
         "head": "lightning_metric.heads.margins.ArcFaceHead"},
    ),
    "pml": (
        dict(loss=losses.ProxyAnchorLoss(4, 8), num_classes=4),
        ["loss_fn.proxies", *NECK],
        {"backbone": "lightning_metric.backbones.SmallCNN",
         "loss": "pytorch_metric_learning.losses.proxy_anchor_loss.ProxyAnchorLoss"},
    ),
}  # fmt: skip


def backbone() -> SmallCNN:
    return SmallCNN(in_channels=1, width=4)


def fit_and_save(path: Path, **kwargs) -> MetricLearningModule:
    model = MetricLearningModule(
        backbone=backbone(),
        embedding_dim=8,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        **kwargs,
    )
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    trainer.save_checkpoint(path)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_keys_and_hparams_are_those_of_the_previous_module(case, tmp_path):
    kwargs, objective_keys, python_objects = CASES[case]
    model = fit_and_save(tmp_path / "m.ckpt", **kwargs)
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    centres = {"lightning_metric_class_centres"} if case == "head" else set()
    assert set(checkpoint) == TOP_LEVEL | centres
    others = [k for k in checkpoint["state_dict"] if not k.startswith("backbone.")]
    assert sorted(others) == objective_keys
    assert dict(checkpoint["hyper_parameters"]) == {
        **HPARAMS,
        "nonfinite": "raise",
        "python_objects": python_objects,
    }
    # One optimizer, one state entry per parameter; the head's centres are the last entry.
    num_params = len(list(model.parameters()))
    assert sorted(checkpoint["optimizer_states"][0]["state"]) == list(range(num_params))
    if case == "head":
        assert checkpoint["lightning_metric_class_centres"] == {
            "shape": [4, 8],
            "saved_by_world_size": 1,
            "optimizer_state": [[0, num_params - 1]],
        }
    # It loads back with its live objects, weights and all.
    loaded = MetricLearningModule.load_from_checkpoint(
        tmp_path / "m.ckpt", backbone=backbone(), **kwargs
    )
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_check_objective_raises_the_typed_error_saying_which_were_given():
    with pytest.raises(ObjectiveCountError, match="exactly one objective") as none:
        check_objective(None, None, None, True)
    assert none.value.given == () and isinstance(none.value, ValueError)
    with pytest.raises(ObjectiveCountError) as both:
        check_objective(ArcFaceHead, losses.ContrastiveLoss(), None, True)
    assert both.value.given == ("head", "loss")


def test_load_without_objective_is_explained_from_the_typed_error(tmp_path):
    fit_and_save(tmp_path / "m.ckpt", **CASES["head"][0])
    with pytest.raises(TypeError, match=r"ArcFaceHead; missing now: head\.") as e:
        MetricLearningModule.load_from_checkpoint(tmp_path / "m.ckpt", backbone=backbone())
    assert isinstance(e.value.__cause__, ObjectiveCountError)
    with pytest.raises(TypeError, match=r"missing now: backbone, head\.") as e:
        MetricLearningModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert "backbone" in str(e.value.__cause__)  # Python's own missing-argument error


class OwnRule(MetricLearningModule):
    """A subclass with its own rule, whose message happens to read like the objective's."""

    def __init__(self, **kwargs) -> None:
        if kwargs.get("embedding_dim") == 8:
            raise ValueError("pass exactly one objective: this subclass wants embedding_dim 16")
        super().__init__(**kwargs)


def test_a_similar_message_from_elsewhere_is_not_swallowed(tmp_path):
    fit_and_save(tmp_path / "m.ckpt", **CASES["head"][0])
    # Matching the message text turned this into the "cannot rebuild the model" TypeError.
    with pytest.raises(ValueError, match="this subclass wants embedding_dim 16") as e:
        OwnRule.load_from_checkpoint(tmp_path / "m.ckpt", backbone=backbone())
    assert not isinstance(e.value, ObjectiveCountError)
    error = ValueError("pass exactly one objective")
    assert missing_objects_error(MetricLearningModule, tmp_path / "m.ckpt", {}, error) is None


def test_missing_objects_error_decides_from_the_error_type_and_the_checkpoint(tmp_path):
    fit_and_save(tmp_path / "m.ckpt", **CASES["head"][0])
    path = tmp_path / "m.ckpt"
    count = ObjectiveCountError("x", given=())
    explained = missing_objects_error(MetricLearningModule, path, {"backbone": 1}, count)
    assert "missing now: head." in str(explained)
    # An objective was passed: the error is about it, not about missing objects.
    assert missing_objects_error(MetricLearningModule, path, {"loss": 1}, count) is None
    typo = TypeError("__init__() got an unexpected keyword argument 'embeding_dim'")
    assert missing_objects_error(MetricLearningModule, path, {"backbone": 1}, typo) is None
    # A file whose hyper-parameters cannot be read: nothing to explain it with.
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert missing_objects_error(MetricLearningModule, tmp_path / "junk.ckpt", {}, typo) is None


def test_qualified_name_of_class_partial_and_instance():
    name = "lightning_metric.heads.margins.ArcFaceHead"
    assert qualified_name(ArcFaceHead) == name
    assert qualified_name(partial(ArcFaceHead, margin=0.2)) == name
    assert qualified_name(ArcFaceHead(4, 3)) == name
