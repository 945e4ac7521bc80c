"""MetricLearningModule: backbone -> neck -> embedding, trained by a margin head or a PML loss."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

try:  # Lightning's guard against calling load_from_checkpoint on an instance
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
except ImportError:  # pragma: no cover - older / newer Lightning
    _restricted_classmethod = classmethod  # type: ignore[assignment,misc]
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from lightning_metric.batch import Batch, EmbeddingBatch, split_batch
from lightning_metric.callbacks.lost_rank import LostRankReport
from lightning_metric.checkpointing import missing_objects_error, save_hyperparameters
from lightning_metric.checks import (
    check_choice,
    check_int,
    check_num_classes,
    check_positive_real,
    object_name,
)
from lightning_metric.heads import MarginHead
from lightning_metric.heads.base import deferred_centres
from lightning_metric.heads.sharding import ShardingError
from lightning_metric.matryoshka import Matryoshka, check_matryoshka_objective
from lightning_metric.necks import EmbeddingNeck
from lightning_metric.nonfinite import NonFiniteGuard, StepPosition, zero_loss
from lightning_metric.pml import (
    ObjectiveCountError,
    check_modules,
    check_objective,
    check_pml_sizes,
    pml_loss,
    pml_sizes,
)
from lightning_metric.sharded_centres import ShardedCentres

__all__ = ["HeadFactory", "MetricLearningModule", "split_batch"]

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
        nonfinite: what a training step whose loss, embeddings or gradients hold NaN/Inf
            does. The loss and embeddings are checked after the forward pass, the gradients
            after backward and before the optimizer step (after gradient accumulation: the
            window's summed gradients). ``"raise"`` (default) stops with a
            :class:`~lightning_metric.nonfinite.NonFiniteError` (a ``FloatingPointError``)
            naming the global step, the epoch, the non-finite values (for gradients the
            first parameter holding NaN/Inf) and the likely causes. ``"skip"`` drops the
            step instead: no weight update and no optimizer-state change, buffers (BatchNorm
            statistics, head statistics, a ``CrossBatchMemory`` queue) restored to before
            the step, a warning, and the running count logged as
            ``train/skipped_nonfinite_steps``. The learning-rate schedule still advances.
            Under DDP every rank takes the same decision (the flags are reduced across
            ranks). With ``precision="16-mixed"`` the gradients are left to the GradScaler,
            which skips steps with Inf/NaN gradients and lowers its scale by design (an
            overflow there is routine, not an error); loss and embeddings are still checked.
        matryoshka_dims: train every listed prefix of the embedding as an embedding of its
            own (Matryoshka representation learning, Kusupati et al. 2022), e.g.
            ``[16, 32, 64, 128]``: strictly increasing, the last one ``embedding_dim``. The
            loss is the weighted mean over the prefixes ``d`` of the objective applied to the
            first ``d`` coordinates, L2-normalised; a margin head scores each prefix against
            the prefixes of its one centre matrix, a PML miner and loss mine and score each
            prefix on its own (see :mod:`lightning_metric.matryoshka`). ``train/loss`` logs
            the total, ``train/loss/d64`` each prefix's loss. None (default): the plain
            objective. Not with ``CrossBatchMemory`` or PML losses that hold proxies.
        matryoshka_weights: one weight >= 0 per prefix of ``matryoshka_dims`` (default 1
            each, as in the paper); the loss divides by their sum. Equal weights let the short
            prefixes outweigh the full vector: on the main job the full vector's recall@1 fell
            0.4 point below plain training, and ``[1, 1, 1, 3]`` (full = the prefixes together,
            ``examples/configs/matryoshka.yaml``) kept it level (README, 5 seeds).
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
        nonfinite: Literal["raise", "skip"] = "raise",
        matryoshka_dims: Optional[list[int]] = None,
        matryoshka_weights: Optional[list[float]] = None,
    ) -> None:
        super().__init__()
        check_modules(backbone, neck, head, loss, miner)
        if num_classes is not None:
            num_classes = check_num_classes(num_classes)
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        if objective_lr is not None:
            objective_lr = check_positive_real("objective_lr", objective_lr)
        guard = NonFiniteGuard(nonfinite)
        check_objective(head, loss, miner, gather_across_ranks)
        check_choice("lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        if matryoshka_weights is not None and matryoshka_dims is None:
            raise ValueError(
                f"matryoshka_weights={matryoshka_weights!r} was given without matryoshka_dims; "
                "give the prefix sizes too, e.g. matryoshka_dims=[32, 64, 128]"
            )
        save_hyperparameters(
            self,
            inspect.currentframe(),  # type: ignore[arg-type]
            backbone=backbone,
            neck=neck,
            head=head,
            loss=loss,
            miner=miner,
        )
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
        self.nonfinite_guard = guard
        if loss is not None:
            check_pml_sizes(loss, self.embedding_dim, num_classes)
        self.matryoshka: Optional[Matryoshka] = None
        if matryoshka_dims is not None:
            self.matryoshka = Matryoshka(matryoshka_dims, matryoshka_weights, self.embedding_dim)
            check_matryoshka_objective(self.head, loss)
        # Set by compute_loss with matryoshka_dims, logged by training_step: each prefix's loss.
        self._prefix_losses: Optional[list[torch.Tensor]] = None
        # Set by compute_loss, logged by training_step: did this batch's mining come up empty?
        self._mined_nothing: Optional[bool] = None

    @property
    def nonfinite(self) -> Literal["raise", "skip"]:
        """What a non-finite training step does (the constructor's ``nonfinite``)."""
        return self.nonfinite_guard.mode

    @nonfinite.setter
    def nonfinite(self, mode: Literal["raise", "skip"]) -> None:
        self.nonfinite_guard.mode = mode

    @property
    def skipped_nonfinite_steps(self) -> int:
        """Training steps skipped so far (``nonfinite="skip"``)."""
        return self.nonfinite_guard.skipped_steps

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
        if self.matryoshka is not None:
            return self._matryoshka_loss(self.matryoshka, embeddings, labels)
        if self.head is not None:
            return self.head.loss(embeddings, labels)
        assert self.loss_fn is not None
        loss, self._mined_nothing = pml_loss(
            self.loss_fn, self.miner, embeddings, labels, self.gather_across_ranks
        )
        return loss

    def _matryoshka_loss(
        self, matryoshka: Matryoshka, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if self.head is not None:
            losses = matryoshka.head_losses(self.head, embeddings, labels)
        else:
            assert self.loss_fn is not None
            losses, self._mined_nothing = matryoshka.pml_losses(
                self.loss_fn, self.miner, embeddings, labels, self.gather_across_ranks
            )
        self._prefix_losses = losses
        return matryoshka.total(losses)

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, labels, _ = split_batch(batch)
        self._mined_nothing, self._prefix_losses = None, None
        self.nonfinite_guard.begin_step(self, self.loss_fn)
        embeddings = self.embed(x)
        loss = self.compute_loss(embeddings, labels)
        if not self.nonfinite_guard.check_step(self._position(batch_idx), x, embeddings, loss):
            self._log_skipped(len(labels))
            return zero_loss(self.parameters())
        self._log_step(loss, len(labels))
        return loss

    def _position(self, batch_idx: int) -> StepPosition:
        return StepPosition(self.global_step, self.current_epoch, batch_idx, self.global_rank)

    def _log_step(self, loss: torch.Tensor, batch_size: int) -> None:
        """The values a kept training step logs."""
        if self.nonfinite == "skip":
            self._log_skipped(batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if self.matryoshka is not None and self._prefix_losses is not None:
            for name, value in zip(self.matryoshka.log_names, self._prefix_losses, strict=True):
                self.log(name, value.detach(), batch_size=batch_size)
        if self._mined_nothing is not None:
            # Per epoch: how many batches the miner found no pair/triplet in (loss 0 there).
            self._log_epoch_value(
                "train/empty_mining_batches", self._mined_nothing, "sum", batch_size
            )

    def _log_skipped(self, batch_size: int) -> None:
        # Equal on every rank (the skip is decided together): synced, so no warning.
        self._log_epoch_value(
            "train/skipped_nonfinite_steps",
            self.skipped_nonfinite_steps,
            "max",
            batch_size,
            sync_dist=True,
        )

    def _log_epoch_value(
        self,
        name: str,
        value: float,
        reduce_fx: Literal["sum", "max"],
        batch_size: int,
        sync_dist: bool = False,
    ) -> None:
        """A count logged once per epoch, reduced over the epoch's steps with ``reduce_fx``."""
        self.log(
            name,
            float(value),
            on_step=False,
            on_epoch=True,
            reduce_fx=reduce_fx,
            batch_size=batch_size,
            sync_dist=sync_dist,
        )

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Callable[[], Any]] = None,
    ) -> None:
        """After backward, before the update: the guard checks the gradients; dropped ones
        (non-finite under ``"skip"``, or a window whose every batch was skipped) are set to
        None, so the optimizer changes no weight and no state."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        closure, guard = optimizer_closure, self.nonfinite_guard
        # A GradScaler (16-mixed) skips Inf/NaN gradient steps itself and lowers its scale:
        # overflow is how it finds the scale, so it is not ours to raise or count.
        check = getattr(self.trainer.precision_plugin, "scaler", None) is None

        def guarded_closure() -> Any:
            result = closure()
            if guard.keep_gradients(self.named_parameters(), self._position(batch_idx), check):
                return result
            self._log_skipped(1)
            optimizer.zero_grad(set_to_none=True)
            return None  # AMP's GradScaler then skips its step as well

        try:
            return super().optimizer_step(epoch, batch_idx, optimizer, guarded_closure)
        finally:
            guard.end_window()

    def configure_callbacks(self) -> list[Callback]:
        """A DDP run that fails because a rank died names that rank (:class:`LostRankReport`)."""
        return [LostRankReport()]

    # -- sharded class centres (MarginHead(shard_classes=True)) -------------------------------
    @property
    def class_centres(self) -> Optional[ShardedCentres]:
        """The head's class centres through setup, checkpoints and the end of training
        (sharded across DDP ranks with ``shard_classes=True``); None with a PML loss."""
        return ShardedCentres(self.head) if self.head is not None else None

    def setup(self, stage: str) -> None:
        """Under DDP, a head with ``shard_classes=True`` keeps only this rank's centres; DDP
        then leaves them out of its gradient average (they are not replicas)."""
        centres = self.class_centres
        if centres is not None and centres.setup(
            self.trainer.strategy, self.global_rank, self.trainer.world_size, stage
        ):
            self._ddp_params_and_buffers_to_ignore = [centres.weight_key(self.named_parameters())]

    def on_train_end(self) -> None:
        centres = self.class_centres
        if centres is not None:
            centres.after_training(self.trainer.strategy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank saves together (Lightning's ``ModelCheckpoint`` and
        ``trainer.save_checkpoint`` do). Sharded centres are written per rank under
        :class:`~lightning_metric.strategies.ShardedCentresDDPStrategy`; under any other
        strategy the checkpoint holds every class centre (gathered from the shards). Either
        loads in any world size."""
        centres = self.class_centres
        if centres is not None:
            trainer = self._trainer
            optimizers = trainer.optimizers if trainer is not None else []
            strategy = trainer.strategy if trainer is not None else None
            key = centres.weight_key(self.named_parameters())
            centres.save(checkpoint, key, optimizers, strategy)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the centres' shape and keep this rank's part of them (sharded heads); a
        checkpoint whose centres were saved per rank has them read only to resume ``fit``."""
        centres = self.class_centres
        if centres is not None:
            path = getattr(self._trainer, "ckpt_path", None)
            source = f"checkpoint {path}" if path else "the checkpoint"
            fitting = self._trainer is not None and self._trainer.state.fn == "fit"
            key = centres.weight_key(self.named_parameters())
            centres.load(checkpoint, key, source, path, fitting)

    def on_fit_start(self) -> None:
        """Labels of the data must fit the objective's classes: checked before the first step."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        objective = self.head if self.head is not None else self.loss_fn
        if self.head is not None:
            classes = getattr(self.head, "num_classes", None)
        else:
            classes = pml_sizes(self.loss_fn)[1] if self.loss_fn is not None else None
        if isinstance(data_classes, int) and isinstance(classes, int) and data_classes > classes:
            raise ValueError(
                f"the data has num_classes={data_classes} ({type(datamodule).__name__}) but "
                f"{'head' if self.head is not None else 'loss'}={object_name(objective)} has "
                f"num_classes={classes}: labels up to {data_classes - 1} would be out of range; "
                f"pass num_classes={data_classes} (the CLI links it from data.num_classes)"
            )

    def _eval_step(self, batch: Batch) -> EmbeddingBatch:
        x, labels, index = split_batch(batch)
        return EmbeddingBatch(self(x), labels, index)

    # Lightning's STEP_OUTPUT type names tensors and mappings only, but its evaluation loops
    # hand any step output to the callbacks unchanged: hence the ignores.
    def validation_step(  # type: ignore[override]
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> EmbeddingBatch:
        """Embeddings, labels and dataset index for evaluation callbacks (RecallAtK)."""
        return self._eval_step(batch)

    def test_step(  # type: ignore[override]
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> EmbeddingBatch:
        return self._eval_step(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> EmbeddingBatch:
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
        set_total_steps = getattr(scheduler, "set_total_steps", None)
        if callable(set_total_steps) and getattr(scheduler, "total_steps", None) is None:
            set_total_steps(self._schedule_length())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }

    def _schedule_length(self) -> int:
        """How many times the scheduler steps in this run: what a schedule that leaves its
        length unset (:class:`~lightning_metric.schedules.WarmupCosineLR`) is given."""
        trainer = self.trainer
        if self.lr_scheduler_interval == "step":
            total = trainer.estimated_stepping_batches
            what = "optimizer steps (trainer.estimated_stepping_batches)"
        else:
            total, what = trainer.max_epochs or -1, "epochs (trainer.max_epochs)"
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the learning-rate schedule needs the run's length in {what}, got {total}: "
                "set trainer.max_epochs or trainer.max_steps, or give the schedule total_steps"
            )
        return int(total)

    # -- export ----------------------------------------------------------------------------
    def export(self, path: Any, example_input: torch.Tensor, **kwargs: Any) -> Any:
        """Write ``forward`` (input -> unit-norm embedding) as ONNX (``.onnx``) or TorchScript
        (``.pt``) with a dynamic batch axis and a JSON input description beside it; see
        :func:`lightning_metric.export.export`."""
        from lightning_metric.export import export

        return export(self, path, example_input, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------
    @_restricted_classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, *args: Any, **kwargs: Any
    ) -> MetricLearningModule:
        """Lightning's ``load_from_checkpoint``; for a checkpoint of a module built in Python,
        pass its modules again: ``load_from_checkpoint(path, backbone=..., head=...)``.

        A checkpoint written by the ``lightning-metric`` CLI stores its config and needs no
        arguments. From Python, backbone / neck / head / loss / miner are live objects, not
        hyper-parameters; build the same ones as for training and their weights are loaded
        from the checkpoint. Without them this raises a ``TypeError`` that names them.
        """
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except ShardingError as err:
            raise ShardingError(f"{checkpoint_path}: {err}") from err
        except (TypeError, ObjectiveCountError) as err:
            explained = missing_objects_error(cls, checkpoint_path, kwargs, err)
            if explained is None:
                raise
            raise explained from err


def _build_head(
    head: Optional[HeadFactory | MarginHead], embedding_dim: int, num_classes: Optional[int]
) -> Optional[MarginHead]:
    # Any built nn.Module with MarginHead's interface is used as-is (duck typing).
    if head is None or isinstance(head, nn.Module):
        return head  # type: ignore[return-value]
    if num_classes is None:
        raise ValueError(
            f"head={object_name(head)} is built here and needs num_classes (the number of training "
            "classes); pass num_classes=..., or in the CLI let it be linked from data.num_classes"
        )
    if getattr(head, "keywords", {}).get("shard_classes") is True:
        # Sharded centres are built at setup, each rank its own rows (MarginHead.shard): the
        # whole C x D matrix is never allocated on any rank.
        with deferred_centres():
            return head(embedding_dim, num_classes)
    return head(embedding_dim, num_classes)
