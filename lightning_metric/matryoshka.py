"""Matryoshka training (Kusupati et al., NeurIPS 2022): every prefix of the embedding is trained
to be an embedding of its own.

:class:`Matryoshka` is what ``MetricLearningModule(matryoshka_dims=..., matryoshka_weights=...)``
composes in. The training loss is the weighted mean over the prefix sizes ``d`` of the
objective applied to the ``d``-prefix (the first ``d`` coordinates, L2-normalised, as
:func:`lightning_metric.retrieval.quantization.prefix` defines it for retrieval):

    loss = sum_d w_d * L(prefix_d) / sum_d w_d

* Margin heads score each prefix against the same prefix of one class-centre matrix
  (:meth:`~lightning_metric.heads.MarginHead.prefix_losses`), with one partial-FC sample, one
  sharded gather and one update of running statistics per step.
* PML losses and miners see each prefix on its own: the miner mines the ``d``-prefixes and the
  loss scores its tuples on them (:func:`~lightning_metric.pml.pml_loss` per prefix).

The full embedding size must be the last prefix (as in the paper): coordinates past the last
prefix would get no training signal, yet ``forward``, retrieval, indexes and exports use the
whole vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from pytorch_metric_learning.losses import CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from lightning_metric.checks import ArgumentTypeError, check_dims, check_range, object_name
from lightning_metric.heads import MarginHead
from lightning_metric.pml import pml_loss, pml_sizes

__all__ = ["Matryoshka", "check_matryoshka_objective"]


class Matryoshka:
    """Prefix sizes and weights of a Matryoshka objective, and how their losses combine.

    Args:
        dims: strictly increasing prefix sizes, the last one the embedding size, e.g.
            ``[16, 32, 64, 128]`` for 128-d embeddings.
        weights: one weight >= 0 per prefix (default 1 each), not all zero. The loss is the
            weighted *mean*: dividing by the weights' sum keeps the loss and gradient scale of
            the plain objective, so the same learning rate, gradient clipping and loss plots
            carry over when Matryoshka is switched on, and ``dims=[D]`` is the plain objective.
            A zero weight logs a prefix's loss without training it.
        embedding_dim: the model's embedding size.

    >>> m = Matryoshka([2, 4], [1.0, 3.0], embedding_dim=4)
    >>> float(m.total([torch.tensor(2.0), torch.tensor(6.0)]))  # (1 * 2 + 3 * 6) / 4
    5.0
    >>> m.log_names
    ('train/loss/d2', 'train/loss/d4')
    """

    def __init__(
        self, dims: Sequence[int], weights: Optional[Sequence[float]], embedding_dim: int
    ) -> None:
        self.dims = check_dims(dims, "matryoshka_dims", maximum=embedding_dim)
        if self.dims[-1] != embedding_dim:
            raise ValueError(
                f"`matryoshka_dims` = {list(self.dims)} must end with the embedding size "
                f"{embedding_dim}: coordinates past the last prefix would get no training signal, "
                f"yet retrieval and exports use the whole embedding; use "
                f"{[*self.dims, embedding_dim]}, or set embedding_dim={self.dims[-1]}"
            )
        self.weights = _check_weights(weights, len(self.dims))
        self.log_names = tuple(f"train/loss/d{d}" for d in self.dims)

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted mean of the prefixes' losses (in the order of ``dims``)."""
        total = sum(w * loss for w, loss in zip(self.weights, losses, strict=True))
        return total / sum(self.weights)  # type: ignore[return-value]

    def head_losses(
        self, head: MarginHead, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> list[torch.Tensor]:
        """One loss per prefix of a margin head (see :meth:`MarginHead.prefix_losses`)."""
        return head.prefix_losses(embeddings, labels, self.dims)

    def pml_losses(
        self,
        loss_fn: nn.Module,
        miner: Optional[BaseMiner],
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        gather_across_ranks: bool,
    ) -> tuple[list[torch.Tensor], Optional[bool]]:
        """One loss per prefix of a PML loss, each prefix mined on its own;
        ``mined_nothing`` (None without a miner) is whether every prefix's mining came up
        empty, so that the total loss is zero."""
        losses, empty = [], []
        for d in self.dims:
            # pml_loss normalises what it is given: the prefix, L2-normalised.
            loss, nothing = pml_loss(loss_fn, miner, embeddings[:, :d], labels, gather_across_ranks)
            losses.append(loss)
            empty.append(nothing)
        return losses, None if empty[0] is None else all(empty)


def _check_weights(weights: Any, count: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * count
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise ArgumentTypeError(
            f"`matryoshka_weights` must be a list of {count} weights >= 0, one per prefix in "
            f"matryoshka_dims, got {weights!r}"
        )
    if len(weights) != count:
        raise ValueError(
            f"`matryoshka_weights` has {len(weights)} weights {list(weights)} but matryoshka_dims "
            f"has {count} prefixes; give one weight per prefix (or leave it unset: 1 each)"
        )
    out = tuple(check_range(f"matryoshka_weights[{i}]", w, 0.0) for i, w in enumerate(weights))
    if not math.fsum(out) > 0:
        raise ValueError(
            f"`matryoshka_weights` = {list(out)} are all zero: no prefix would be trained; give "
            "at least one weight > 0"
        )
    return out


def check_matryoshka_objective(head: Optional[nn.Module], loss: Optional[nn.Module]) -> None:
    """The objective can be applied to each prefix: a head running ``MarginHead``'s own loss
    pipeline, or a PML loss without embedding-sized parameters and without a memory."""
    if head is not None:
        if not isinstance(head, MarginHead):
            raise ValueError(
                f"matryoshka_dims needs a head built on lightning_metric.heads.MarginHead (its "
                f"prefix_losses scores each prefix); head={object_name(head)} is not one"
            )
        if type(head).loss is not MarginHead.loss:
            raise ValueError(
                f"head={object_name(head)} overrides loss(), which the Matryoshka prefixes would "
                "bypass (they go through MarginHead.prefix_losses); drop matryoshka_dims, or "
                "customise the head through the hooks target_logit / negative_logits / "
                "update_statistics / select_classes instead"
            )
        return
    if isinstance(loss, CrossBatchMemory):
        raise ValueError(
            "matryoshka_dims cannot be used with loss=CrossBatchMemory: its memory holds "
            "full-size embeddings in one queue, and each prefix would need a queue of its own; "
            "use a pair loss without memory (e.g. MultiSimilarityLoss with a miner), or a margin "
            "head"
        )
    if loss is not None:
        size = pml_sizes(loss)[0]
        if size is not None:
            raise ValueError(
                f"matryoshka_dims cannot be used with loss={object_name(loss)}: its class "
                f"weights (proxies) are {size}-dimensional and cannot score a shorter prefix; use "
                "a margin head (lightning_metric.heads, whose centres serve every prefix) or a "
                "pair loss such as MultiSimilarityLoss"
            )
