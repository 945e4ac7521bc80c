"""WarmupCosineLR: the curve against its formula, and its length taken from the Trainer."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.data import DigitsDataModule
from lightning_metric.heads import ArcFaceHead
from lightning_metric.schedules import WarmupCosineLR


def _formula(step: int, total: int, warmup: float, start: float, final: float) -> float:
    p = step / total
    if p < warmup:
        return start + (1 - start) * p / warmup
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup)))


def _curve(sched: WarmupCosineLR, opt: torch.optim.Optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup,start,final", [(0.1, 0.04, 0.0), (0.0, 1.0, 0.2), (0.5, 0.0, 0.5)])
def test_every_group_follows_the_formula_scaled_by_its_own_lr(warmup, start, final):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.3}, {"params": params[1:], "lr": 2.0}])
    sched = WarmupCosineLR(opt, warmup, start, final, total_steps=37)
    for step, lrs in enumerate(_curve(sched, opt, 37)):
        factor = _formula(step, 37, warmup, start, final)
        assert lrs == pytest.approx([0.3 * factor, 2.0 * factor], rel=1e-12, abs=1e-15)


def test_a_resumed_schedule_continues_the_same_curve():
    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, WarmupCosineLR(opt, 0.2, total_steps=20)

    opt, sched = fresh()
    whole = _curve(sched, opt, 20)
    opt, sched = fresh()
    _curve(sched, opt, 7)
    state = sched.state_dict()
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    assert _curve(sched2, opt2, 13) == whole[7:]


def test_the_module_gives_the_schedule_the_runs_length():
    data = DigitsDataModule(batch_size=32)
    seen: list[tuple[int, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    model = MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=4),
        embedding_dim=8,
        head=partial(ArcFaceHead, scale=16.0, margin=0.2),
        num_classes=data.num_classes,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(WarmupCosineLR, warmup_fraction=0.25),
        lr_scheduler_interval="step",
    )
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(model, datamodule=data)
    assert [s for s, _ in seen] == list(range(10))
    for step, lr in seen:
        assert lr == pytest.approx(0.1 * _formula(step, 10, 0.25, 0.04, 0.0), rel=1e-9)


def test_a_run_without_a_length_is_refused_before_training():
    model = MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=4),
        embedding_dim=8,
        head=ArcFaceHead,
        num_classes=5,
        lr_scheduler=WarmupCosineLR,
    )
    trainer = L.Trainer(max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"run's length in epochs \(trainer.max_epochs\), got -1"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"warmup_fraction": 1.0}, r"`warmup_fraction` must be in \[0, 1\), got 1.0"),
        ({"warmup_fraction": -0.1}, r"`warmup_fraction` must be in \[0, 1\), got -0.1"),
        ({"start_factor": 1.5}, r"`start_factor` must be in \[0, 1\], got 1.5"),
        ({"final_factor": -1.0}, r"`final_factor` must be in \[0, 1\], got -1.0"),
        ({"total_steps": 0}, r"total_steps"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        WarmupCosineLR(opt, **kwargs)


def test_stepping_without_a_length_says_how_to_give_one():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt)
    opt.step()
    with pytest.raises(RuntimeError, match="without total_steps"):
        sched.step()
