"""Learning-rate schedules that take the run's length from the Trainer.

A schedule written as a number of steps (``OneCycleLR(total_steps=456)``) is right for one
data set size, batch size and epoch count only: change any of them, or train on one
cross-validation fold, and it either stops early with an error or never finishes its decay.
The schedules here leave ``total_steps`` unset; ``MetricLearningModule.configure_optimizers``
calls :meth:`WarmupCosineLR.set_total_steps` with ``trainer.estimated_stepping_batches`` (or
``max_epochs`` with ``lr_scheduler_interval="epoch"``).
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_metric.checks import check_int, check_real

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ``base_lr * start_factor`` to ``base_lr`` over the first
    ``warmup_fraction`` of the run, then a half cosine down to ``base_lr * final_factor``.

    Every parameter group follows the same curve scaled by its own learning rate (class
    centres with ``objective_lr`` keep their ratio to the backbone's). The factor at step
    ``t`` of ``T`` is a function of ``t / T`` only, so resuming from a checkpoint continues
    the same curve.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = WarmupCosineLR(opt, warmup_fraction=0.25, start_factor=0.0, total_steps=8)
    >>> lrs = []
    >>> for _ in range(8):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
    ...     opt.step()
    ...     sched.step()
    >>> lrs
    [0.0, 0.5, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067]

    Args:
        optimizer: the optimizer whose groups' learning rates are scheduled.
        warmup_fraction: share of the run spent warming up, in [0, 1).
        start_factor: learning-rate factor at the first step, in [0, 1].
        final_factor: factor reached at the end of the run, in [0, 1].
        total_steps: the run's length in scheduler steps; leave unset under Lightning (the
            module sets it from the Trainer).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_fraction: float = 0.1,
        start_factor: float = 0.04,
        final_factor: float = 0.0,
        total_steps: Optional[int] = None,
    ) -> None:
        warmup_fraction = check_real("warmup_fraction", warmup_fraction)
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}")
        for name, value in (("start_factor", start_factor), ("final_factor", final_factor)):
            if not 0.0 <= check_real(name, value) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}")
        self.warmup_fraction = warmup_fraction
        self.start_factor = float(start_factor)
        self.final_factor = float(final_factor)
        self.total_steps: Optional[int] = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in scheduler steps (optimizer steps, or epochs)."""
        self.total_steps = check_int("total_steps", total_steps, minimum=1)

    def factor(self, step: int) -> float:
        """The learning-rate factor at ``step`` (0-based) of the run."""
        if self.total_steps is None:
            if step == 0:
                return self.start_factor if self.warmup_fraction > 0 else 1.0
            raise RuntimeError(
                "WarmupCosineLR stepped without total_steps: pass total_steps=..., or let "
                "MetricLearningModule.configure_optimizers set it from the Trainer"
            )
        progress = min(step, self.total_steps) / self.total_steps
        if progress < self.warmup_fraction:
            return self.start_factor + (1.0 - self.start_factor) * progress / self.warmup_fraction
        decay = (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        cosine = 0.5 * (1.0 + math.cos(math.pi * decay))
        return self.final_factor + (1.0 - self.final_factor) * cosine

    def get_lr(self) -> list[float | Tensor]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
