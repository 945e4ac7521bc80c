"""MetricLearningModule: backbone -> neck -> embedding, trained by a margin head or a PML loss."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn

try:  # Lightning's guard against calling load_from_checkpoint on an instance
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
except ImportError:  # pragma: no cover - older / newer Lightning
    _restricted_classmethod = classmethod  # type: ignore[assignment,misc]
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from lightning_metric.batch import Batch, split_batch
from lightning_metric.callbacks.lost_rank import LostRankReport
from lightning_metric.checks import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_labels,
    check_num_classes,
    check_real,
)
from lightning_metric.distributed import gather_for_loss, world_size
from lightning_metric.heads import MarginHead
from lightning_metric.heads.functional import normalize_embeddings
from lightning_metric.heads.sharding import ShardingError, consolidate_centres, shard_centres
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
        nonfinite: what a training step whose loss or embeddings hold NaN/Inf does.
            ``"raise"`` (default) stops with a ``FloatingPointError`` naming the global step,
            the epoch, the non-finite values and the likely causes. ``"skip"`` drops the
            step instead: no weight update, buffers (BatchNorm statistics, head statistics)
            restored to before the step, a warning, and the running count logged as
            ``train/skipped_nonfinite_steps``. The learning-rate schedule still advances.
            Under DDP every rank takes the same decision (the flag is reduced across ranks).
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
    ) -> None:
        super().__init__()
        _check_modules(backbone, neck, head, loss, miner)
        if num_classes is not None:
            num_classes = check_num_classes(num_classes)
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        if objective_lr is not None:
            objective_lr = _positive_real("objective_lr", objective_lr)
        nonfinite = check_choice("nonfinite", nonfinite, ("raise", "skip"))
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
        check_choice("lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        if loss is not None:
            _check_pml_objective(loss, miner, gather_across_ranks)
        _save_hyperparameters(self, backbone=backbone, neck=neck, head=head, loss=loss, miner=miner)
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
        self.nonfinite = nonfinite
        if loss is not None:
            _check_pml_sizes(loss, self.embedding_dim, num_classes)
        # Set by compute_loss, logged by training_step: did this batch's mining come up empty?
        self._mined_nothing: Optional[bool] = None
        # nonfinite="skip": steps skipped so far, and whether a batch since the last optimizer
        # step was kept (its gradients are used) or every one was skipped (no update at all).
        self.skipped_nonfinite_steps = 0
        self._kept_since_step = False

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
        # Class-centre losses index their weights by label: a label past their num_classes
        # would be an IndexError (a device-side assert on CUDA) deep inside PML.
        labels = check_labels("labels", labels, _pml_sizes(self.loss_fn)[1])
        # PML's distances and reducers are written for float32. A zero or NaN row becomes the
        # zero vector with zero gradient (training_step reports a NaN row; see nonfinite).
        normalised = normalize_embeddings(embeddings)[0]
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
        skip = self.nonfinite == "skip"
        # Forward passes update state (BatchNorm statistics, a memory queue): a skipped step
        # must not.
        saved = [b.detach().clone() for b in self.buffers()] if skip else None
        queue = _queue_state(self.loss_fn) if skip else None
        embeddings = self.embed(x)
        loss = self.compute_loss(embeddings, labels)
        bad_loss, bad_embeddings = _nonfinite_flags(loss, embeddings)
        if bad_loss or bad_embeddings:
            report = self._nonfinite_report(x, embeddings, loss, batch_idx)
            if not skip:
                raise FloatingPointError(
                    f"{report}. Likely causes: a learning rate too high (lower it, add warm-up "
                    "or Trainer(gradient_clip_val=...)); float16 overflow (use "
                    "precision='bf16-mixed' or '32-true'); bad input rows (NaN/Inf in the "
                    "data, check the dataset). To skip such steps instead, pass "
                    "MetricLearningModule(nonfinite='skip')."
                )
            assert saved is not None
            with torch.no_grad():
                for buffer, old in zip(self.buffers(), saved, strict=True):
                    buffer.copy_(old)
            if queue:
                vars(self.loss_fn).update(queue)
            self.skipped_nonfinite_steps += 1
            rank_zero_warn(f"{report}; skipped (nonfinite='skip'): no weight update")
            self._log_skipped(len(labels))
            return self._zero_loss()
        self._kept_since_step = True
        if skip:
            self._log_skipped(len(labels))
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

    def _log_skipped(self, batch_size: int) -> None:
        self.log(
            "train/skipped_nonfinite_steps",
            float(self.skipped_nonfinite_steps),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=batch_size,
            sync_dist=True,  # equal on every rank (the skip is decided together); no warning
        )

    def _nonfinite_report(
        self, x: Any, embeddings: torch.Tensor, loss: torch.Tensor, batch_idx: int
    ) -> str:
        """Where the step is and which values are not finite (on this rank)."""

        def bad_rows(t: torch.Tensor) -> int:
            return int((~torch.isfinite(t.detach().reshape(len(t), -1))).any(dim=1).sum())

        where = (
            f"non-finite training step at global step {self.global_step} "
            f"(epoch {self.current_epoch}, batch {batch_idx}"
        )
        where += f", rank {self.global_rank})" if world_size() > 1 else ")"
        found = []
        if not bool(torch.isfinite(loss.detach()).all()):
            found.append(f"loss={float(loss.detach().float().sum())}")
        num_bad = bad_rows(embeddings)
        if num_bad:
            found.append(f"{num_bad} of {len(embeddings)} embedding rows hold NaN/Inf")
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1 and len(x):
            num_bad = bad_rows(x)
            if num_bad:
                found.append(f"{num_bad} of {len(x)} input rows hold NaN/Inf")
        if not found:
            found.append("the values of another rank (this rank's loss and embeddings are finite)")
        return f"{where}: {'; '.join(found)}"

    def _zero_loss(self) -> torch.Tensor:
        """A loss of exactly 0 whose gradient is zero for every trainable parameter.

        Returning None would skip backward, which Lightning refuses under DDP (and DDP's
        gradient all-reduce would then wait on the other ranks); this runs an ordinary, cheap
        backward and ``optimizer_step`` then drops the gradients.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Callable[[], Any]] = None,
    ) -> None:
        """With ``nonfinite="skip"``: when every batch since the last step was skipped, the
        gradients are dropped (set to None) so the optimizer changes no weight and no state."""
        if self.nonfinite != "skip" or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        closure = optimizer_closure

        def guarded_closure() -> Any:
            result = closure()
            if not self._kept_since_step:
                optimizer.zero_grad(set_to_none=True)
                return None  # AMP's GradScaler then skips its step as well
            return result

        try:
            return super().optimizer_step(epoch, batch_idx, optimizer, guarded_closure)
        finally:
            self._kept_since_step = False

    def configure_callbacks(self) -> list[Callback]:
        """A DDP run that fails because a rank died names that rank (:class:`LostRankReport`)."""
        return [LostRankReport()]

    # -- sharded class centres (MarginHead(shard_classes=True)) -------------------------------
    def setup(self, stage: str) -> None:
        """Under DDP, a head with ``shard_classes=True`` keeps only this rank's centres; DDP
        then leaves them out of its gradient average (they are not replicas)."""
        head = self.head
        if head is None or not head.shard_classes or self.trainer.world_size == 1:
            return
        if not isinstance(self.trainer.strategy, DDPStrategy):
            raise ShardingError(
                f"{type(head).__name__}(shard_classes=True) needs Lightning's DDP strategy "
                f"(strategy='ddp' or 'ddp_spawn'), got {type(self.trainer.strategy).__name__} "
                f"with {self.trainer.world_size} processes"
            )
        head.shard(self.global_rank, self.trainer.world_size)
        self._ddp_params_and_buffers_to_ignore = [
            name for name, p in self.named_parameters() if p is head.weight
        ]

    def on_train_end(self) -> None:
        # ddp_spawn hands rank 0's state_dict back to the main process, whose head is whole.
        # (on_train_end, not on_fit_end: the strategy's teardown comes in between.)
        if self.head is not None and isinstance(
            getattr(self.trainer.strategy, "launcher", None), _MultiProcessingLauncher
        ):
            self.head.unshard()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint holds every class centre (gathered from the shards), so it loads in
        any world size."""
        if self.head is not None:
            optimizers = self.trainer.optimizers if self._trainer is not None else []
            consolidate_centres(checkpoint, self.head, self._head_weight_key(), optimizers)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the centres' shape and keep this rank's part of them (sharded heads)."""
        if self.head is not None:
            path = getattr(self._trainer, "ckpt_path", None)
            source = f"checkpoint {path}" if path else "the checkpoint"
            shard_centres(checkpoint, self.head, self._head_weight_key(), source)

    def _head_weight_key(self) -> str:
        assert self.head is not None
        return next(name for name, p in self.named_parameters() if p is self.head.weight)

    def on_fit_start(self) -> None:
        """Labels of the data must fit the objective's classes: checked before the first step."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        objective = self.head if self.head is not None else self.loss_fn
        if self.head is not None:
            classes = getattr(self.head, "num_classes", None)
        else:
            classes = _pml_sizes(self.loss_fn)[1] if self.loss_fn is not None else None
        if isinstance(data_classes, int) and isinstance(classes, int) and data_classes > classes:
            raise ValueError(
                f"the data has num_classes={data_classes} ({type(datamodule).__name__}) but "
                f"{'head' if self.head is not None else 'loss'}={_name(objective)} has "
                f"num_classes={classes}: labels up to {data_classes - 1} would be out of range; "
                f"pass num_classes={data_classes} (the CLI links it from data.num_classes)"
            )

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
        except (TypeError, ValueError) as err:
            text = str(err)
            missing_backbone = "required positional argument: 'backbone'" in text
            missing_objective = "pass exactly one objective" in text and not (
                "head" in kwargs or "loss" in kwargs
            )
            if not (missing_backbone or missing_objective):
                raise
            raise TypeError(_load_message(cls, checkpoint_path, kwargs)) from err


def _load_message(cls: type, checkpoint_path: Any, kwargs: dict[str, Any]) -> str:
    used: dict[str, str] = {}
    try:  # only to name the classes; Lightning has just read the same file
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        used = dict(checkpoint.get("hyper_parameters", {}).get("python_objects", {}))
    except Exception:  # noqa: BLE001 - the message is still useful without them
        pass
    if used:
        needed = [k for k in used if k not in kwargs]
        trained = ", ".join(f"{k}={v}" for k, v in used.items())
        example = ", ".join(f"{k}={v.rsplit('.', 1)[-1]}(...)" for k, v in used.items())
        detail = f"It was trained with {trained}; missing now: {', '.join(needed) or 'none'}."
    else:
        example = "backbone=SmallCNN(...), head=ArcFaceHead"
        detail = "Pass backbone, the objective (head or loss, miner) and any custom neck."
    return (
        f"{cls.__name__}.load_from_checkpoint({str(checkpoint_path)!r}) cannot rebuild the "
        "model: the checkpoint was saved from a module built in Python, whose backbone / neck "
        "/ head / loss are live objects that are not stored as hyper-parameters (only their "
        f"weights are). {detail} Build them as for training and pass them: "
        f"{cls.__name__}.load_from_checkpoint(path, {example}); the weights then load from "
        "the checkpoint. (Checkpoints of the lightning-metric CLI store their config and "
        "load without arguments.)"
    )


def _save_hyperparameters(module: LightningModule, **objects: object) -> None:
    """Save the config under LightningCLI, only plain values otherwise.

    Under the CLI the hyper-parameters are the YAML's class paths and init args, so a
    checkpoint rebuilds its own model (`lightning-metric test --ckpt_path`,
    `MetricLearningModule.load_from_checkpoint(path)`). From Python the same arguments are
    live objects: they are saved as weights in the state dict, and pickling them into the
    hyper-parameters would break `weights_only` loading. Their class names are kept (as
    ``python_objects``, plain strings) so that loading without them can say what to pass.
    """
    if _under_lightning_cli():
        module.save_hyperparameters(frame=inspect.currentframe().f_back)  # type: ignore[union-attr]
    else:
        module.save_hyperparameters(
            ignore=["backbone", "neck", "head", "loss", "miner", "optimizer", "lr_scheduler"],
            frame=inspect.currentframe().f_back,  # type: ignore[union-attr]
        )
        module.hparams["python_objects"] = {
            k: _qualified_name(v) for k, v in objects.items() if v is not None
        }


def _qualified_name(obj: object) -> str:
    func = obj.func if isinstance(obj, functools.partial) else obj
    cls = func if inspect.isclass(func) else type(func)
    return f"{cls.__module__}.{cls.__qualname__}"


def _positive_real(name: str, value: object) -> float:
    real = check_real(name, value)
    if not real > 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return real


def _queue_state(loss: Optional[nn.Module]) -> dict[str, Any]:
    """CrossBatchMemory's queue position (plain attributes; its memory is buffers)."""
    if not isinstance(loss, CrossBatchMemory):
        return {}
    return {k: getattr(loss, k) for k in ("queue_idx", "has_been_filled") if hasattr(loss, k)}


def _nonfinite_flags(loss: torch.Tensor, embeddings: torch.Tensor) -> tuple[bool, bool]:
    """Whether the loss / the embeddings hold NaN or Inf, on any rank (one host sync).

    Reduced across DDP ranks so that every rank raises, or skips, together: a rank that
    went on to backward alone would wait forever in the gradient all-reduce.
    """
    flags = torch.stack(
        [~torch.isfinite(loss.detach()).all(), ~torch.isfinite(embeddings.detach()).all()]
    ).to(torch.int32)
    if world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, bad_embeddings = flags.tolist()
    return bool(bad_loss), bool(bad_embeddings)


def _resolve_class(obj: object) -> Optional[type]:
    """The class an argument stands for: itself, its type, or a partial's target."""
    target = obj.func if isinstance(obj, functools.partial) else obj
    return target if inspect.isclass(target) else type(target)


def _check_modules(
    backbone: object, neck: object, head: object, loss: object, miner: object
) -> None:
    """Type errors at construction for arguments given in the wrong place or form."""
    if isinstance(backbone, str):
        raise ArgumentTypeError(
            f"backbone={backbone!r} is a string; pass a module, e.g. "
            f"backbone=TimmBackbone(name={backbone!r}) or TorchvisionBackbone(name={backbone!r}) "
            "from lightning_metric.backbones (in YAML: backbone: {class_path: "
            f"lightning_metric.backbones.TimmBackbone, init_args: {{name: {backbone}}}}})"
        )
    if not isinstance(backbone, nn.Module):
        raise ArgumentTypeError(
            f"backbone must be an nn.Module (e.g. lightning_metric.backbones.SmallCNN()), got "
            f"{backbone!r} of type {type(backbone).__name__}"
        )
    if neck is not None and not isinstance(neck, nn.Module):
        raise ArgumentTypeError(
            f"neck must be an nn.Module (e.g. EmbeddingNeck(...)) or None, got {neck!r} of "
            f"type {type(neck).__name__}"
        )
    loss_cls = _resolve_class(loss) if loss is not None else None
    head_cls = _resolve_class(head) if head is not None else None
    if loss_cls is not None and issubclass(loss_cls, MarginHead):
        raise ArgumentTypeError(
            f"loss={_name(loss)} is a margin head, not a pytorch-metric-learning loss; pass it "
            f"as head={_name(loss)} (with num_classes=...)"
        )
    if loss is not None and not isinstance(loss, nn.Module):
        hint = f"; pass an instance, e.g. loss={_name(loss)}()" if inspect.isclass(loss) else ""
        raise ArgumentTypeError(
            "loss must be a pytorch-metric-learning loss instance (e.g. "
            f"losses.TripletMarginLoss()), got {loss!r} of type {type(loss).__name__}{hint}"
        )
    if head_cls is not None and issubclass(head_cls, BaseMetricLossFunction | CrossBatchMemory):
        raise ArgumentTypeError(
            f"head={_name(head)} is a pytorch-metric-learning loss, not a margin head; pass it "
            f"as loss={_name(head)}(...), or use an in-house head such as "
            "lightning_metric.heads.ArcFaceHead for head="
        )
    if head is not None and not (
        callable(getattr(head, "loss", None)) if isinstance(head, nn.Module) else callable(head)
    ):
        raise ArgumentTypeError(
            "head must be a margin head class or functools.partial (built with embedding_dim "
            "and num_classes), or a built head with a .loss method (e.g. ArcFaceHead(128, 10)); "
            f"got {head!r} of type {type(head).__name__}"
        )
    if miner is not None and not isinstance(miner, BaseMiner):
        hint = f"; pass an instance, e.g. miner={_name(miner)}()" if inspect.isclass(miner) else ""
        raise ArgumentTypeError(
            "miner must be a pytorch-metric-learning miner instance (e.g. "
            f"miners.MultiSimilarityMiner()), got {miner!r} of type {type(miner).__name__}{hint}"
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


def _pml_sizes(loss: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(embedding width, number of classes)`` a PML loss was built for, None where it has
    no such size. Read from its class centres (``W``, ``proxies``, ``fc``): PML does not keep
    ``embedding_size`` as an attribute (and some losses record ``num_classes=0``)."""
    inner = loss.loss if isinstance(loss, CrossBatchMemory) else loss
    size = getattr(loss, "embedding_size", None) if isinstance(loss, CrossBatchMemory) else None
    classes = None
    proxies = getattr(inner, "proxies", None)
    weight = getattr(inner, "W", None)
    if weight is None:
        weight = getattr(inner, "fc", None)  # SoftTripleLoss
    if isinstance(proxies, torch.Tensor) and proxies.ndim == 2:
        classes, size = int(proxies.shape[0]), int(proxies.shape[1])
    elif isinstance(weight, torch.Tensor) and weight.ndim == 2:
        size = int(weight.shape[0])
        recorded = getattr(inner, "num_classes", None)
        has_count = isinstance(recorded, int) and recorded > 0
        classes = recorded if has_count else int(weight.shape[1])
    return size, classes


def _check_pml_sizes(loss: nn.Module, embedding_dim: int, num_classes: Optional[int]) -> None:
    size, loss_classes = _pml_sizes(loss)
    if size is not None and size != embedding_dim:
        raise ValueError(
            f"loss={_name(loss)} has embedding_size={size} but the model's embeddings have "
            f"embedding_dim={embedding_dim}; make them equal (the CLI fills it in when omitted)"
        )
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
