"""Non-finite training steps (raise / skip), bad rows in a head's loss, one-class objectives."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
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
from lightning_metric.necks import EmbeddingNeck
from lightning_metric.nonfinite import NonFiniteError

ALL_HEADS: list[Callable[..., MarginHead]] = [
    NormSoftmaxHead,
    CosFaceHead,
    ArcFaceHead,
    CombinedMarginHead,
    SubCenterArcFaceHead,
    CurricularFaceHead,
    AdaFaceHead,
]
D, C, B = 8, 5, 6


class _Batches(Dataset):
    """A fixed list of batches, served in order (DataLoader(batch_size=None))."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


def _batches(n: int = 4, poison_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.arange(8) % 4
        if i == poison_at:
            x[[1, 5]] = float("nan")
        out.append((x, y))
    return out


def _module(**kwargs: object) -> MetricLearningModule:
    torch.manual_seed(0)
    defaults: dict[str, object] = dict(
        backbone=SmallCNN(in_channels=1, width=4),
        head=partial(ArcFaceHead, scale=16.0),
        num_classes=4,
        embedding_dim=8,
    )
    defaults.update(kwargs)
    return MetricLearningModule(**defaults)  # type: ignore[arg-type]


def _fit(model: MetricLearningModule, batches: list, accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(_Batches(batches), batch_size=None))
    return trainer


# ------------------------------------------------------------------ non-finite steps
def test_nonfinite_step_raises_naming_step_epoch_values_and_causes() -> None:
    model = _module()
    with pytest.raises(FloatingPointError) as info:
        _fit(model, _batches(poison_at=2))
    text = str(info.value)
    for fragment in (
        "global step 2",
        "epoch 0",
        "batch 2",
        "loss=nan",
        "8 of 8 embedding rows",  # BatchNorm in training mode spreads NaN to the batch
        "2 of 8 input rows",
        "learning rate",
        "float16",
        "nonfinite='skip'",
    ):
        assert fragment in text, (fragment, text)


def test_huge_learning_rate_raises_instead_of_finishing_quietly() -> None:
    model = _module(optimizer=partial(torch.optim.SGD, lr=1e30))
    with pytest.raises(FloatingPointError, match=r"global step [1-9]"):
        _fit(model, _batches(n=6))


def test_skip_leaves_weights_and_buffers_as_a_run_without_the_bad_batch() -> None:
    clean = _batches(n=4)
    poisoned = clean[:2] + [_batches(n=3, poison_at=2)[2]] + clean[2:]
    assert not torch.isfinite(poisoned[2][0]).all()

    reference = _module(nonfinite="skip")
    skipping = copy.deepcopy(reference)
    _fit(reference, clean)
    with pytest.warns(UserWarning, match="global step 2.*skipped"):
        trainer = _fit(skipping, poisoned)

    assert skipping.skipped_nonfinite_steps == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 1.0
    assert trainer.global_step == 5  # the step happened, it only changed nothing
    ref_state, skip_state = reference.state_dict(), skipping.state_dict()
    assert ref_state.keys() == skip_state.keys()
    for name, value in ref_state.items():  # weights *and* BatchNorm running statistics
        assert torch.equal(value, skip_state[name]), name
    assert all(torch.isfinite(v).all() for v in skip_state.values() if v.is_floating_point())
    # Training moved the weights at all (so equality above is not that of two idle models).
    assert not torch.equal(ref_state["head.weight"], _module().state_dict()["head.weight"])


def test_skip_under_gradient_accumulation_keeps_the_window_s_good_batches() -> None:
    clean, bad = _batches(n=1), _batches(n=2, poison_at=1)[1]
    initial = _module(nonfinite="skip")
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    all_bad = copy.deepcopy(initial)
    _fit(all_bad, [bad, bad], accumulate=2)  # nothing kept in the window: no step at all
    assert all_bad.skipped_nonfinite_steps == 2
    for name, value in all_bad.state_dict().items():
        assert torch.equal(value, state[name]), name
    one_good = copy.deepcopy(initial)
    _fit(one_good, [clean[0], bad], accumulate=2)  # the good batch's gradient is applied
    assert one_good.skipped_nonfinite_steps == 1
    weight = one_good.state_dict()["head.weight"]
    assert torch.isfinite(weight).all() and not torch.equal(weight, state["head.weight"])


def test_skip_restores_a_cross_batch_memory() -> None:
    from pytorch_metric_learning import losses

    clean = _batches(n=3)
    poisoned = clean[:1] + [_batches(n=2, poison_at=1)[1]] + clean[1:]
    memory = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=64)
    reference = _module(head=None, num_classes=None, loss=memory, nonfinite="skip")
    skipping = copy.deepcopy(reference)
    _fit(reference, clean)
    with pytest.warns(UserWarning, match="global step 1"):
        _fit(skipping, poisoned)
    assert skipping.loss_fn.queue_idx == reference.loss_fn.queue_idx == 24
    for name, value in reference.state_dict().items():  # includes the memory buffers
        assert torch.equal(value, skipping.state_dict()[name]), name


def test_skip_counter_is_logged_as_zero_on_a_clean_run() -> None:
    trainer = _fit(_module(nonfinite="skip"), _batches(n=2))
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 0.0


def test_nonfinite_option_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"`nonfinite` must be one of \('raise', 'skip'\), got 'drop'"
    ):
        _module(nonfinite="drop")


# ------------------------------------------------------------------ one class
@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_single_class_head_is_rejected(cls: Callable[..., MarginHead]) -> None:
    with pytest.raises(
        ValueError, match=r"`num_classes` must be an integer >= 2, got 1: .*loss is exactly 0"
    ):
        cls(D, 1)


def test_single_class_module_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 2, got 1"):
        _module(num_classes=1)


def test_one_label_batch_with_sampling_still_has_a_negative() -> None:
    head = ArcFaceHead(D, 2, sample_rate=0.1).train()  # ceil(0.1 * 2) = 1 class before
    x = torch.randn(B, D, requires_grad=True)
    loss = head.loss(x, torch.zeros(B, dtype=torch.long))
    loss.backward()
    assert loss > 0 and x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------ bad rows in a head
def _loss_and_grads(
    head: MarginHead, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head.zero_grad()
    x = x.clone().requires_grad_()
    loss = head.loss(x, y)
    loss.backward()
    assert x.grad is not None and head.weight.grad is not None
    return loss.detach(), x.grad, head.weight.grad.clone()


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_bad_row_gets_zero_gradient_and_leaves_other_gradients_alone(
    cls: Callable[..., MarginHead], chunk: int | None, bad: str
) -> None:
    head = cls(D, C, chunk_size=chunk).eval()  # eval: running statistics stay fixed
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    loss_ref, gx_ref, gw_ref = _loss_and_grads(head, x[1:], y[1:])
    x_bad = x.clone()
    x_bad[0] = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[bad]
    loss, gx, gw = _loss_and_grads(head, x_bad, y)

    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.equal(gx[0], torch.zeros(D))
    # Mean over B rows instead of B - 1: the other rows' gradients scale by (B - 1) / B.
    scale = (B - 1) / B
    torch.testing.assert_close(gx[1:], gx_ref * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref * scale, rtol=1e-5, atol=1e-6)
    if bad == "zero":
        assert torch.isfinite(loss)
    else:  # the value says so; only the gradient is kept clean
        assert torch.isnan(loss)


@pytest.mark.parametrize("cls", [CurricularFaceHead, AdaFaceHead], ids=lambda c: c.__name__)
def test_nonfinite_row_leaves_running_statistics_unchanged(cls: Callable[..., MarginHead]) -> None:
    head = cls(D, C).train()
    x, y = torch.randn(B, D) * 3, torch.randint(0, C, (B,))
    before = {k: v.clone() for k, v in head.state_dict().items() if k != "weight"}
    x[2, 3] = float("nan")
    head.loss(x, y)
    for k, v in before.items():
        assert torch.equal(head.state_dict()[k], v), k
    x[2, 3] = 0.0
    head.loss(x, y)  # a clean batch does update them
    assert any(not torch.equal(head.state_dict()[k], v) for k, v in before.items())


def test_forward_gives_nan_logits_for_a_nan_row_only() -> None:
    head = ArcFaceHead(D, C)
    x = torch.randn(B, D)
    x[4] = float("nan")
    logits = head(x)
    assert torch.isnan(logits[4]).all() and torch.isfinite(logits[torch.arange(B) != 4]).all()


def test_empty_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"empty batch.*\(0, 8\)"):
        CosFaceHead(D, C).loss(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------ fit start, checkpoints
class _Data(L.LightningDataModule):
    num_classes = 6

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(_batches(n=1)), batch_size=None)


def test_data_with_more_classes_than_the_head_fails_before_the_first_step() -> None:
    model = _module()  # num_classes=4
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data has num_classes=6.*num_classes=4.*up to 5"):
        trainer.fit(model, _Data())
    assert trainer.global_step == 0


def test_python_checkpoint_loads_with_its_modules_and_says_which_without(tmp_path) -> None:
    model = _module()
    trainer = _fit(model, _batches(n=1))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match=r"SmallCNN.*ArcFaceHead.*missing now: backbone, head"):
        MetricLearningModule.load_from_checkpoint(path)
    loaded = MetricLearningModule.load_from_checkpoint(
        path, backbone=SmallCNN(in_channels=1, width=4), head=partial(ArcFaceHead, scale=16.0)
    )
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


# ------------------------------------------------------------------ DDP: ranks agree
class _RankBatches(_Batches):
    """Step ``i`` of rank ``r`` is ``batches[2 * i + r]`` (no sampler in between)."""

    def __len__(self) -> int:
        return len(self.batches) // 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[2 * i + torch.distributed.get_rank()]


def _ddp_fit(model: MetricLearningModule, batches: list, folder: str) -> L.Trainer:
    from ddp_harness import FileRendezvousDDP  # no port race, no hang

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FileRendezvousDDP(folder),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        use_distributed_sampler=False,
    )
    trainer.fit(model, DataLoader(_RankBatches(batches), batch_size=None))
    return trainer


@pytest.fixture(scope="module")
def ddp_without_step_1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Weights of a 2-rank run whose step 1 (batches 2 and 3) never happened: what every
    skipped step 1 must equal (one DDP fit, shared by the skip tests)."""
    clean = _batches(n=6)
    reference = _module(nonfinite="skip")
    _ddp_fit(reference, clean[:2] + clean[4:], str(tmp_path_factory.mktemp("ddp_reference")))
    return reference.state_dict()


@pytest.mark.ddp
def test_ddp_skip_is_taken_by_every_rank_and_equals_a_run_without_that_step(
    tmp_path, ddp_without_step_1: dict[str, torch.Tensor]
) -> None:
    clean = _batches(n=6)
    poisoned = list(clean)
    # Rank 1's step 1 only: rank 0 (whose weights and logs come back) must skip it too.
    poisoned[3] = _batches(n=4, poison_at=3)[3]
    skipping = _module(nonfinite="skip")
    trainer = _ddp_fit(skipping, poisoned, str(tmp_path))
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 1.0
    for name, value in ddp_without_step_1.items():
        assert torch.equal(value, skipping.state_dict()[name]), name


@pytest.mark.ddp
def test_ddp_nonfinite_step_raises_on_every_rank(tmp_path) -> None:
    poisoned = _batches(n=4)
    poisoned[3] = _batches(n=4, poison_at=3)[3]  # only rank 1 sees NaN, at its step 1
    with pytest.raises(Exception, match="global step 1") as info:
        _ddp_fit(_module(), poisoned, str(tmp_path))
    # A spawned rank's error comes back as text: its type is named in the traceback.
    assert "NonFiniteError" in repr(info.value) or isinstance(info.value, FloatingPointError)


# ------------------------------------------------------------------ PML class-centre sizes
@pytest.mark.parametrize(
    "name",
    ["ArcFaceLoss", "NormalizedSoftmaxLoss", "SoftTripleLoss", "ProxyNCALoss", "ProxyAnchorLoss"],
)
def test_pml_class_centre_sizes_come_from_the_loss_parameters(name: str) -> None:
    # PML keeps no embedding_size attribute (and records 0 for some losses): the old
    # attribute check rejected NormalizedSoftmax / SoftTriple / ProxyNCA whatever the sizes.
    from pytorch_metric_learning import losses

    cls = getattr(losses, name)
    _module(head=None, loss=cls(num_classes=4, embedding_size=8), num_classes=4)
    with pytest.raises(ValueError, match="embedding_size=16 but .* embedding_dim=8"):
        _module(head=None, loss=cls(num_classes=4, embedding_size=16), num_classes=4)
    with pytest.raises(ValueError, match="has num_classes=4 but num_classes=6"):
        _module(head=None, loss=cls(num_classes=4, embedding_size=8), num_classes=6)


# ------------------------------------------------------------------ non-finite gradients
class _FilledGradient(torch.autograd.Function):
    """Identity forward; backward fills the gradient with ``value`` (NaN, Inf): a finite loss
    whose gradient is not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: float) -> torch.Tensor:  # type: ignore[override]
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return torch.full_like(grad, ctx.value), None


def filled_gradient(x: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    return _FilledGradient.apply(x, value)  # type: ignore[no-any-return]


class _PoisonGradient(torch.nn.Module):
    """Identity whose backward is NaN in the training forward calls numbered in ``calls``."""

    def __init__(self, calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.calls, self.count = set(calls), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return filled_gradient(x) if self.count - 1 in self.calls else x


def _gradient_module(calls: tuple[int, ...] = (), **kwargs: object) -> MetricLearningModule:
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=1, width=4)
    neck = torch.nn.Sequential(EmbeddingNeck(backbone.num_features, 8), _PoisonGradient(calls))
    return _module(backbone=backbone, neck=neck, **kwargs)


def _optimizer_state(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    state = trainer.optimizers[0].state_dict()["state"]
    return {f"{i}/{k}": torch.as_tensor(v) for i, s in state.items() for k, v in s.items()}


def test_nan_gradient_with_a_finite_loss_raises_naming_the_parameter_and_step() -> None:
    model = _gradient_module(calls=(1,))
    first = next(name for name, _ in model.named_parameters())
    with pytest.raises(NonFiniteError) as info:
        _fit(model, _batches(n=4))
    assert info.value.global_step == 1 and info.value.parameter == first
    text = str(info.value)
    for fragment in ("global step 1", "epoch 0", f"gradient of {first!r}", "nonfinite='skip'"):
        assert fragment in text, (fragment, text)
    assert isinstance(info.value, FloatingPointError)  # callers catching that keep working


def test_nan_gradient_step_is_skipped_as_if_the_batch_were_absent() -> None:
    clean = _batches(n=4)
    reference = _gradient_module(nonfinite="skip")
    skipping = copy.deepcopy(reference)
    skipping.neck[1].calls = {2}  # finite loss at step 2, NaN gradient
    ref_trainer = _fit(reference, clean[:2] + clean[3:])
    with pytest.warns(UserWarning, match=r"global step 2.*gradient of 'backbone\..*skipped"):
        trainer = _fit(skipping, clean)
    assert skipping.skipped_nonfinite_steps == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 1.0
    for name, value in reference.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, skipping.state_dict()[name]), name
    ref_opt, skip_opt = _optimizer_state(ref_trainer), _optimizer_state(trainer)
    assert ref_opt.keys() == skip_opt.keys() and ref_opt
    for key, value in ref_opt.items():  # Adam moments and step counts: untouched by the skip
        assert torch.equal(value, skip_opt[key]), key
    assert not torch.equal(
        reference.state_dict()["head.weight"], _module().state_dict()["head.weight"]
    )


def test_nan_gradient_in_an_accumulation_window_drops_the_whole_window() -> None:
    batches = _batches(n=2)
    initial = _gradient_module(calls=(1,), nonfinite="skip")
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    model = copy.deepcopy(initial)
    trainer = _fit(model, batches, accumulate=2)  # batch 0 fine, batch 1 NaN: one window
    assert model.skipped_nonfinite_steps == 1
    for name, value in model.state_dict().items():  # BatchNorm of batch 0 is undone too
        assert torch.equal(value, state[name]), name
    assert _optimizer_state(trainer) == {}  # the optimizer never stepped


def test_a_clean_run_is_unchanged_by_the_gradient_check() -> None:
    plain, checked = _gradient_module(), _gradient_module(nonfinite="skip")
    _fit(plain, _batches(n=3))
    _fit(checked, _batches(n=3))
    assert checked.skipped_nonfinite_steps == 0
    for name, value in plain.state_dict().items():
        assert torch.equal(value, checked.state_dict()[name]), name


class _RankLocalNaNGradient(MetricLearningModule):
    """Rank 1 alone gets a NaN gradient at global step 1, after DDP's gradient average (as a
    gradient DDP leaves alone would): only the reduced flag makes rank 0 act too."""

    def on_after_backward(self) -> None:
        if self.global_step == 1 and self.global_rank == 1:
            weight = self.head.weight  # type: ignore[union-attr]
            assert weight.grad is not None
            weight.grad.view(-1)[0] = float("nan")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().optimizer_step(*args, **kwargs)
        except NonFiniteError:  # a file per rank that raised, for the parent to count
            Path(self.raised_dir, f"raised{self.global_rank}").touch()
            raise


def _rank_local_module(**kwargs: object) -> MetricLearningModule:
    torch.manual_seed(0)
    return _RankLocalNaNGradient(
        backbone=SmallCNN(in_channels=1, width=4),
        head=partial(ArcFaceHead, scale=16.0),
        num_classes=4,
        embedding_dim=8,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.ddp
def test_ddp_rank_local_nan_gradient_is_skipped_by_every_rank(
    tmp_path, ddp_without_step_1: dict[str, torch.Tensor]
) -> None:
    skipping = _rank_local_module(nonfinite="skip")
    trainer = _ddp_fit(skipping, _batches(n=6), str(tmp_path))
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 1.0
    for name, value in ddp_without_step_1.items():  # rank 0's weights: it skipped too
        assert torch.equal(value, skipping.state_dict()[name]), name


@pytest.mark.ddp
def test_ddp_rank_local_nan_gradient_raises_on_every_rank(tmp_path) -> None:
    model = _rank_local_module()
    model.raised_dir = str(tmp_path)
    with pytest.raises(Exception, match=r"global step 1.*gradient of 'head\.weight'"):
        _ddp_fit(model, _batches(n=6), str(tmp_path))
    # Rank 0, whose own gradients are finite, raised the same error (no hang, no drift).
    assert sorted(p.name for p in tmp_path.glob("raised*")) == ["raised0", "raised1"]


def test_under_a_grad_scaler_nan_gradients_are_left_to_the_scaler() -> None:
    # 16-mixed: overflow is how the GradScaler finds its scale; it skips the step and halves
    # the scale. Raising there would stop every fp16 run at its first overflow.
    from lightning.pytorch.plugins import MixedPrecision

    model = _gradient_module(calls=(1,))  # nonfinite="raise"
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(model, DataLoader(_Batches(_batches(n=3)), batch_size=None))
    assert trainer.global_step == 3 and scaler.get_scale() == 512.0  # one skip, by the scaler
    assert all(torch.isfinite(p).all() for p in model.parameters())
