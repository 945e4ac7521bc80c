"""NonFiniteGuard on its own: fake steps (a model, its buffers, hand-set gradients), no Trainer.

The same guard inside MetricLearningModule's training is tested in test_nonfinite_training.py."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses
from torch import nn

from lightning_metric.nonfinite import (
    NonFiniteError,
    NonFiniteGuard,
    StepPosition,
    snapshot_state,
    zero_loss,
)

WHERE = StepPosition(global_step=7, epoch=2, batch=3)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def forward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = net.train()(x)
    return embeddings, embeddings.pow(2).mean()


def fill_gradients(net: nn.Module, bad: str | None = None, value: float = float("nan")) -> None:
    """Finite gradients everywhere, ``value`` in the first entry of parameter ``bad``."""
    for name, p in net.named_parameters():
        p.grad = torch.ones_like(p)
        if name == bad:
            p.grad.view(-1)[0] = value


def buffers(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in net.buffers()]


def test_nan_gradient_raises_naming_the_first_bad_parameter_and_the_step():
    net, guard = model(), NonFiniteGuard("raise")
    fill_gradients(net, bad="2.weight")  # "2.bias" later in order is fine, "0.*" before too
    with pytest.raises(
        NonFiniteError, match=r"global step 7 \(epoch 2, batch 3\).*'2\.weight'"
    ) as e:
        guard.keep_gradients(net.named_parameters(), WHERE)
    assert e.value.parameter == "2.weight" and e.value.global_step == 7
    assert isinstance(e.value, FloatingPointError) and guard.skipped_steps == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_first_bad_parameter_in_named_parameters_order_is_named(value):
    net = model()
    fill_gradients(net, bad="0.bias", value=value)
    net[2].weight.grad[0, 0] = float("nan")  # a later one too: the first is reported
    with pytest.raises(NonFiniteError) as e:
        NonFiniteGuard().keep_gradients(net.named_parameters(), WHERE)
    assert e.value.parameter == "0.bias"


def test_finite_gradients_are_kept_and_check_false_leaves_them_to_a_grad_scaler():
    net = model()
    fill_gradients(net)
    assert NonFiniteGuard("raise").keep_gradients(net.named_parameters(), WHERE) is True
    fill_gradients(net, bad="0.weight")
    assert NonFiniteGuard("raise").keep_gradients(net.named_parameters(), WHERE, check=False)


def test_skip_drops_a_nan_gradient_window_and_restores_its_first_snapshot():
    net, guard = model(), NonFiniteGuard("skip")
    before = buffers(net)
    # Two batches of an accumulation window: both finite, both change BatchNorm statistics.
    for x in (torch.randn(8, 4), torch.randn(8, 4) + 5):
        guard.begin_step(net)
        embeddings, loss = forward(net, x)
        assert guard.check_step(WHERE, x, embeddings, loss)
    assert not all(torch.equal(a, b) for a, b in zip(before, buffers(net), strict=True))
    fill_gradients(net, bad="0.weight")
    with pytest.warns(UserWarning, match=r"'0\.weight' holds NaN/Inf.*skipped"):
        assert guard.keep_gradients(net.named_parameters(), WHERE) is False
    assert guard.skipped_steps == 1
    for a, b in zip(before, buffers(net), strict=True):
        assert torch.equal(a, b)
    guard.end_window()
    # The next window starts from a new snapshot and keeps finite gradients.
    guard.begin_step(net)
    embeddings, loss = forward(net, torch.randn(8, 4))
    assert guard.check_step(WHERE, None, embeddings, loss)
    fill_gradients(net)
    assert guard.keep_gradients(net.named_parameters(), WHERE) and guard.skipped_steps == 1


def test_nan_loss_raises_with_what_is_not_finite():
    net, guard = model(), NonFiniteGuard("raise")
    x = torch.randn(8, 4)
    x[[1, 5]] = float("nan")
    guard.begin_step(net)
    embeddings, loss = forward(net, x)
    with pytest.raises(NonFiniteError, match=r"global step 7.*loss=nan.*2 of 8 input rows") as e:
        guard.check_step(WHERE, x, embeddings, loss)
    assert e.value.parameter is None and "Likely causes" in str(e.value)


def test_skipped_step_restores_buffers_and_a_window_of_only_skips_drops_its_gradients():
    net, guard = model(), NonFiniteGuard("skip")
    before = buffers(net)
    x = torch.randn(8, 4)
    x[0] = float("inf")
    guard.begin_step(net)
    embeddings, loss = forward(net, x)
    with pytest.warns(UserWarning, match=r"batch 3\).*1 of 8 input rows.*skipped"):
        assert guard.check_step(WHERE, x, embeddings, loss) is False
    for a, b in zip(before, buffers(net), strict=True):
        assert torch.equal(a, b)
    loss = zero_loss(net.parameters())
    loss.backward()
    # Every batch of the window was skipped: its (finite, zero) gradients are dropped too.
    assert guard.keep_gradients(net.named_parameters(), WHERE) is False
    assert guard.skipped_steps == 1  # dropping them is no second skip


def test_zero_loss_is_zero_with_zero_gradients_for_trainable_parameters_only():
    net = model()
    net[0].weight.requires_grad_(False)
    loss = zero_loss(net.parameters())
    loss.backward()
    assert loss.item() == 0.0 and net[0].weight.grad is None
    for p in net.parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, torch.zeros_like(p))


def test_snapshot_restores_a_cross_batch_memory_queue():
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=4, memory_size=16)
    restore = snapshot_state(xbm, xbm)
    memory, idx = xbm.embedding_memory.clone(), xbm.queue_idx
    xbm(torch.nn.functional.normalize(torch.randn(6, 4)), torch.arange(6) % 3)
    assert xbm.queue_idx == idx + 6 and not torch.equal(xbm.embedding_memory, memory)
    restore()
    assert xbm.queue_idx == idx and torch.equal(xbm.embedding_memory, memory)


def test_mode_is_checked_when_set():
    guard = NonFiniteGuard("skip")
    with pytest.raises(
        ValueError, match=r"`nonfinite` must be one of \('raise', 'skip'\), got 'warn'"
    ):
        guard.mode = "warn"  # type: ignore[assignment]
    assert guard.mode == "skip"
