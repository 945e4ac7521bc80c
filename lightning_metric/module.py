"""MetricLearningModule: backbone -> neck -> embedding, trained by a margin head or a PML loss."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from lightning_metric.batch import Batch, split_batch
from lightning_metric.distributed import gather_for_loss
from lightning_metric.heads import MarginHead
from lightning_metric.necks import EmbeddingNeck

HeadFactory = Callable[[int, int], MarginHead]
"""Builds a head from `(embedding_dim, num_classes)`: a head class or a `functools.partial`."""


class MetricLearningModule(LightningModule):
    """Backbone + neck + one training objective; `forward(x)` returns unit-norm embeddings.

    Exactly one objective:
      * ``head``: a margin head (ArcFace, CosFace, ...) trained with cross-entropy through
        ``head.loss``. Given as a head class / ``functools.partial`` (built here with
        ``embedding_dim`` and ``num_classes``; this is what YAML produces) or as a built
        head instance.
      * ``loss``: any pytorch-metric-learning loss, optionally with a PML ``miner``. PML
        objects (distances, reducers, regularizers inside them) are used as-is.

    Hooks to override in a subclass (each is small, so override only what you change):
      * ``embed(x)``: the embedding *before* L2 normalisation (backbone -> neck).
      * ``forward(x)``: ``F.normalize(embed(x))``, what retrieval and predict use.
      * ``compute_loss(embeddings, labels)``: the objective on un-normalised embeddings.
      * ``parameter_groups()``: the optimizer's param groups (model vs objective).

    Args:
        backbone: any ``nn.Module`` producing features; ``num_features`` on it sizes the
            default neck (the built-in backbones and adapters all have it).
        neck: maps backbone features to ``embedding_dim``; default ``EmbeddingNeck``.
        head: margin head, see above.
        loss: PML loss, see above.
        miner: PML miner, only with ``loss``.
        num_classes: number of training classes (needed to build ``head``); the CLI links
            it from ``data.num_classes``.
        embedding_dim: embedding size.
        optimizer: optimizer factory for all parameters.
        lr_scheduler: optional scheduler factory, stepped every ``lr_scheduler_interval``.
        objective_lr: learning rate of the head / loss parameters (class centres, proxies);
            None uses the optimizer's learning rate.
        lr_scheduler_interval: "epoch" or "step".
        gather_across_ranks: under DDP, compute the PML loss (and run the miner) on the
            embeddings of all ranks, so pairs cross GPUs and the loss and model gradients are
            those of one big batch on one device. Required for ``CrossBatchMemory``, whose
            memory must be identical on every rank. No effect with a head or on one device.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: Optional[nn.Module] = None,
        head: Optional[HeadFactory] = None,
        loss: Optional[Union[BaseMetricLossFunction, CrossBatchMemory]] = None,
        miner: Optional[BaseMiner] = None,
        num_classes: Optional[int] = None,
        embedding_dim: int = 128,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        objective_lr: Optional[float] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        gather_across_ranks: bool = True,
    ) -> None:
        super().__init__()
        if (head is None) == (loss is None):
            raise ValueError(
                "pass exactly one objective: head=<margin head, e.g. ArcFaceHead> for a "
                "classification objective, or loss=<a pytorch_metric_learning loss> for a "
                f"pair/proxy objective; got head={_name(head)} and loss={_name(loss)}"
            )
        if miner is not None and head is not None:
            raise ValueError(
                f"miner={_name(miner)} selects pairs/triplets for a PML loss, but the objective "
                f"is the classification head {_name(head)}; drop the miner or use loss=..."
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}"
            )
        if loss is not None:
            _check_pml_objective(loss, miner, gather_across_ranks)
        _save_hyperparameters(self)
        self.backbone = backbone
        if neck is None:
            neck = EmbeddingNeck(getattr(backbone, "num_features", None), embedding_dim)
        self.neck = neck
        self.embedding_dim = int(getattr(neck, "embedding_dim", embedding_dim))
        self.head = _build_head(head, self.embedding_dim, num_classes)
        self.loss_fn = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.objective_lr = objective_lr
        self.lr_scheduler_interval = lr_scheduler_interval
        self.gather_across_ranks = gather_across_ranks
        if loss is not None:
            _check_pml_sizes(loss, self.embedding_dim, num_classes)
        # Set by compute_loss, logged by training_step: did this batch's mining come up empty?
        self._mined_nothing: Optional[bool] = None

    # -- embedding -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding before L2 normalisation (what margin heads receive)."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings, in float32 even under autocast (retrieval needs it)."""
        return F.normalize(self.embed(x).float(), dim=-1)

    # -- objective -------------------------------------------------------------------------
    @property
    def objective(self) -> nn.Module:
        """The module holding the objective's parameters: the head or the PML loss."""
        return self.head if self.head is not None else self.loss_fn  # type: ignore[return-value]

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss from un-normalised embeddings ``[B, D]`` and labels ``[B]``."""
        if self.head is not None:
            return self.head.loss(embeddings, labels)
        assert self.loss_fn is not None
        # PML's distances and reducers are written for float32.
        normalised = F.normalize(embeddings.float(), dim=-1)
        if self.gather_across_ranks:
            normalised, labels = gather_for_loss(normalised, labels)
        miner = self.miner
        if isinstance(self.loss_fn, CrossBatchMemory):
            miner = self.loss_fn.miner
            if len(labels) > self.loss_fn.memory_size:
                raise ValueError(
                    f"CrossBatchMemory(memory_size={self.loss_fn.memory_size}) must hold at "
                    f"least one global batch ({len(labels)} embeddings, all ranks together); "
                    "raise memory_size"
                )
        indices = self.miner(normalised, labels) if self.miner is not None else None
        # An empty mining result gives PML's zero loss, still attached to the graph.
        loss = self.loss_fn(normalised, labels, indices)
        if miner is not None:
            self._mined_nothing = _found_nothing(miner)
        return loss

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, labels, _ = split_batch(batch)
        self._mined_nothing = None
        loss = self.compute_loss(self.embed(x), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        if self._mined_nothing is not None:
            # Per epoch: how many batches the miner found no pair/triplet in (loss 0 there).
            self.log(
                "train/empty_mining_batches",
                float(self._mined_nothing),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                batch_size=len(labels),
            )
        return loss

    def _eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, labels, index = split_batch(batch)
        out = {"embeddings": self(x), "labels": labels}
        if index is not None:
            out["index"] = index
        return out

    def validation_step(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Returns embeddings, labels and dataset index for evaluation callbacks (RecallAtK)."""
        return self._eval_step(batch)

    def test_step(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def predict_step(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    # -- optimisation ----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Model parameters, then objective parameters with their own learning rate.

        Proxy/centre parameters typically need a larger learning rate than the network
        (PML's learnable losses document this), hence the separate group.
        """
        objective_params = list(self.objective.parameters())
        objective_ids = {id(p) for p in objective_params}
        model_params = [p for p in self.parameters() if id(p) not in objective_ids]
        groups: list[dict[str, Any]] = [{"params": model_params, "name": "model"}]
        if objective_params:
            group: dict[str, Any] = {"params": objective_params, "name": "objective"}
            if self.objective_lr is not None:
                group["lr"] = self.objective_lr
            groups.append(group)
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }


def _save_hyperparameters(module: LightningModule) -> None:
    """Save the config under LightningCLI, only plain values otherwise.

    Under the CLI the hyper-parameters are the YAML's class paths and init args, so a
    checkpoint rebuilds its own model (`lightning-metric test --ckpt_path`,
    `MetricLearningModule.load_from_checkpoint(path)`). From Python the same arguments are
    live objects: they are saved as weights in the state dict, and pickling them into the
    hyper-parameters would break `weights_only` loading.
    """
    if _under_lightning_cli():
        module.save_hyperparameters(frame=inspect.currentframe().f_back)  # type: ignore[union-attr]
    else:
        module.save_hyperparameters(
            ignore=["backbone", "neck", "head", "loss", "miner", "optimizer", "lr_scheduler"],
            frame=inspect.currentframe().f_back,  # type: ignore[union-attr]
        )


# Their forward raises on any indices_tuple (PML's `indices_tuple_not_supported`).
_LOSSES_REJECTING_MINERS: tuple[type, ...] = (
    pml_losses.InstanceLoss,
    pml_losses.P2SGradLoss,
    pml_losses.PNPLoss,
    pml_losses.RankedListLoss,
    pml_losses.VICRegLoss,
)
# Classification / proxy losses score every sample against learned class weights; PML turns
# a miner's tuples into per-sample weights (`convert_to_weights`), so every sample the miner
# did not pick silently drops out of the loss. That is almost always a copy-paste mistake.
_CLASSIFICATION_LOSSES: tuple[type, ...] = (
    pml_losses.LargeMarginSoftmaxLoss,  # ArcFace, CosFace, SphereFace, SubCenterArcFace
    pml_losses.NormalizedSoftmaxLoss,
    pml_losses.ProxyAnchorLoss,
    pml_losses.ProxyNCALoss,
    pml_losses.SoftTripleLoss,
)


def _check_pml_objective(loss: nn.Module, miner: Optional[BaseMiner], gather: bool) -> None:
    if isinstance(loss, CrossBatchMemory):
        if miner is not None:
            raise ValueError(
                f"miner={_name(miner)} with loss=CrossBatchMemory: the memory loss mines pairs "
                "between the batch and the memory itself, so pass the miner as "
                "CrossBatchMemory(miner=...) instead of to the module"
            )
        if not gather:
            raise ValueError(
                "loss=CrossBatchMemory needs gather_across_ranks=True: every rank must enqueue "
                "the same (gathered) batch or the memories of the ranks drift apart"
            )
        _check_same_distance_kind(loss.loss, loss.miner)
        return
    if miner is None:
        return
    if isinstance(loss, _LOSSES_REJECTING_MINERS):
        raise ValueError(
            f"loss={_name(loss)} does not accept mined tuples (PML raises on indices_tuple), "
            f"but miner={_name(miner)} was given; drop the miner"
        )
    if isinstance(loss, _CLASSIFICATION_LOSSES):
        raise ValueError(
            f"loss={_name(loss)} is a classification/proxy loss that scores every sample "
            f"against class proxies; with miner={_name(miner)} PML would only re-weight the "
            "samples the miner picked and drop the rest. Drop the miner, or use a pair loss "
            "(e.g. TripletMarginLoss, MultiSimilarityLoss) with it"
        )
    _check_same_distance_kind(loss, miner)


def _check_same_distance_kind(loss: nn.Module, miner: Optional[nn.Module]) -> None:
    """A miner's margins and hardness are in its distance's units, the loss's in the loss's:
    mixing a similarity (``is_inverted``, larger = closer) with a distance mines tuples the
    loss does not mean."""
    loss_distance = getattr(loss, "distance", None)
    miner_distance = getattr(miner, "distance", None)
    if loss_distance is None or miner_distance is None:
        return
    if loss_distance.is_inverted != miner_distance.is_inverted:

        def kind(distance: nn.Module) -> str:
            return "similarity" if distance.is_inverted else "distance"

        raise ValueError(
            f"miner={_name(miner)} uses {_name(miner_distance)} (a {kind(miner_distance)}) but "
            f"loss={_name(loss)} uses {_name(loss_distance)} (a {kind(loss_distance)}); give "
            f"both the same kind, e.g. distance={_name(loss_distance)}() on the miner"
        )


def _check_pml_sizes(loss: nn.Module, embedding_dim: int, num_classes: Optional[int]) -> None:
    size = getattr(loss, "embedding_size", None)
    if size is not None and size != embedding_dim:
        raise ValueError(
            f"loss={_name(loss)} has embedding_size={size} but the model's embeddings have "
            f"embedding_dim={embedding_dim}; make them equal (the CLI fills it in when omitted)"
        )
    loss_classes = getattr(loss, "num_classes", None)
    if loss_classes is not None and num_classes is not None and loss_classes != num_classes:
        raise ValueError(
            f"loss={_name(loss)} has num_classes={loss_classes} but num_classes={num_classes} "
            "was given (the number of training classes); make them equal"
        )


def _found_nothing(miner: nn.Module) -> bool:
    """Whether the miner's last call returned no tuple at all (from PML's own records)."""
    counts = [getattr(miner, n, 0) for n in ("num_triplets", "num_pos_pairs", "num_neg_pairs")]
    return not any(counts)


def _under_lightning_cli() -> bool:
    """Whether LightningCLI is instantiating this module with its config as hparams."""
    try:  # Lightning's internal hook (2.3+); without it, plain values are the safe choice.
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        return False
    return _given_hyperparameters.get() is not None


def _build_head(
    head: Optional[HeadFactory | MarginHead], embedding_dim: int, num_classes: Optional[int]
) -> Optional[MarginHead]:
    # Any built nn.Module with MarginHead's interface is used as-is (duck typing).
    if head is None or isinstance(head, nn.Module):
        return head  # type: ignore[return-value]
    if num_classes is None:
        raise ValueError(
            f"head={_name(head)} is built here and needs num_classes (the number of training "
            "classes); pass num_classes=..., or in the CLI let it be linked from data.num_classes"
        )
    return head(embedding_dim, num_classes)


def _name(obj: object) -> str:
    if obj is None:
        return "None"
    return (
        getattr(obj, "__name__", None)
        or getattr(getattr(obj, "func", None), "__name__", None)
        or type(obj).__name__
    )
