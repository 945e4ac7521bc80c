"""The pytorch-metric-learning objective: which losses and miners go together, and the loss call.

``MetricLearningModule`` trains either a margin head or a PML loss (optionally with a PML
miner). Everything the module knows about PML lives here, beside the call it guards:

* construction-time rules: :func:`check_modules` (an argument given in the wrong place or
  form, e.g. a head passed as ``loss=`` or a class instead of an instance),
  :func:`check_objective` (exactly one objective, else :class:`ObjectiveCountError`; no
  miner with a head),
  :func:`check_pml_objective` (loss / miner combinations PML accepts but gets wrong) and
  :func:`check_pml_sizes` (``embedding_size`` / ``num_classes`` against the model);
* the training-time call :func:`pml_loss` (label range, normalisation, gathering across
  ranks, mining) and what it records (:func:`found_nothing`);
* :func:`queue_state`: the part of ``CrossBatchMemory`` a skipped step must put back.

A new loss that rejects miners, or that is proxy-based, belongs in
:data:`LOSSES_REJECTING_MINERS` / :data:`CLASSIFICATION_LOSSES`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from lightning_metric.checks import ArgumentTypeError, check_labels, object_name
from lightning_metric.distributed import gather_for_loss
from lightning_metric.heads import MarginHead
from lightning_metric.heads.functional import normalize_embeddings

__all__ = [
    "CLASSIFICATION_LOSSES",
    "LOSSES_REJECTING_MINERS",
    "ObjectiveCountError",
    "check_modules",
    "check_objective",
    "check_pml_objective",
    "check_pml_sizes",
    "check_same_distance_kind",
    "found_nothing",
    "pml_loss",
    "pml_sizes",
    "queue_state",
]


def pml_loss(
    loss_fn: nn.Module,
    miner: Optional[BaseMiner],
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    gather_across_ranks: bool,
) -> tuple[torch.Tensor, Optional[bool]]:
    """``(loss, mined_nothing)`` of a PML loss on un-normalised embeddings ``[B, D]``.

    ``mined_nothing`` is None when no miner ran (neither ``miner`` nor
    ``CrossBatchMemory(miner=...)``), else whether this batch's mining came up empty.
    """
    # Class-centre losses index their weights by label: a label past their num_classes
    # would be an IndexError (a device-side assert on CUDA) deep inside PML.
    labels = check_labels("labels", labels, pml_sizes(loss_fn)[1])
    # PML's distances and reducers are written for float32. A zero or NaN row becomes the
    # zero vector with zero gradient (training_step reports a NaN row; see nonfinite).
    normalised = normalize_embeddings(embeddings)[0]
    if gather_across_ranks:
        normalised, labels = gather_for_loss(normalised, labels)
    recording_miner = miner
    if isinstance(loss_fn, CrossBatchMemory):
        recording_miner = loss_fn.miner
        if len(labels) > loss_fn.memory_size:
            raise ValueError(
                f"CrossBatchMemory(memory_size={loss_fn.memory_size}) must hold at "
                f"least one global batch ({len(labels)} embeddings, all ranks together); "
                "raise memory_size"
            )
    indices = miner(normalised, labels) if miner is not None else None
    # An empty mining result gives PML's zero loss, still attached to the graph.
    loss = loss_fn(normalised, labels, indices)
    mined_nothing = found_nothing(recording_miner) if recording_miner is not None else None
    return loss, mined_nothing


def _resolve_class(obj: object) -> Optional[type]:
    """The class an argument stands for: itself, its type, or a partial's target."""
    target = obj.func if isinstance(obj, functools.partial) else obj
    return target if inspect.isclass(target) else type(target)


def check_modules(
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
            f"loss={object_name(loss)} is a margin head, not a pytorch-metric-learning loss; pass it "
            f"as head={object_name(loss)} (with num_classes=...)"
        )
    if loss is not None and not isinstance(loss, nn.Module):
        hint = (
            f"; pass an instance, e.g. loss={object_name(loss)}()" if inspect.isclass(loss) else ""
        )
        raise ArgumentTypeError(
            "loss must be a pytorch-metric-learning loss instance (e.g. "
            f"losses.TripletMarginLoss()), got {loss!r} of type {type(loss).__name__}{hint}"
        )
    if head_cls is not None and issubclass(head_cls, BaseMetricLossFunction | CrossBatchMemory):
        raise ArgumentTypeError(
            f"head={object_name(head)} is a pytorch-metric-learning loss, not a margin head; pass it "
            f"as loss={object_name(head)}(...), or use an in-house head such as "
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
        hint = (
            f"; pass an instance, e.g. miner={object_name(miner)}()"
            if inspect.isclass(miner)
            else ""
        )
        raise ArgumentTypeError(
            "miner must be a pytorch-metric-learning miner instance (e.g. "
            f"miners.MultiSimilarityMiner()), got {miner!r} of type {type(miner).__name__}{hint}"
        )


# Their forward raises on any indices_tuple (PML's `indices_tuple_not_supported`).
LOSSES_REJECTING_MINERS: tuple[type, ...] = (
    pml_losses.InstanceLoss,
    pml_losses.P2SGradLoss,
    pml_losses.PNPLoss,
    pml_losses.RankedListLoss,
    pml_losses.VICRegLoss,
)
# Classification / proxy losses score every sample against learned class weights; PML turns
# a miner's tuples into per-sample weights (`convert_to_weights`), so every sample the miner
# did not pick silently drops out of the loss. That is almost always a copy-paste mistake.
CLASSIFICATION_LOSSES: tuple[type, ...] = (
    pml_losses.LargeMarginSoftmaxLoss,  # ArcFace, CosFace, SphereFace, SubCenterArcFace
    pml_losses.NormalizedSoftmaxLoss,
    pml_losses.ProxyAnchorLoss,
    pml_losses.ProxyNCALoss,
    pml_losses.SoftTripleLoss,
)


class ObjectiveCountError(ValueError):
    """Not exactly one objective: neither ``head`` nor ``loss`` was given, or both were.

    ``given`` names the ones that were (``()`` or ``("head", "loss")``), so a caller can tell
    a missing objective (e.g. a checkpoint loaded without its live objects) from two."""

    def __init__(self, message: str, given: tuple[str, ...]) -> None:
        super().__init__(message)
        self.given = given


def check_objective(head: object, loss: object, miner: object, gather: bool) -> None:
    """Exactly one objective, a miner only with a PML loss, and a PML loss and miner that
    work together (:func:`check_pml_objective`)."""
    if (head is None) == (loss is None):
        raise ObjectiveCountError(
            "pass exactly one objective: head=<margin head, e.g. ArcFaceHead> for a "
            "classification objective, or loss=<a pytorch_metric_learning loss> for a "
            f"pair/proxy objective; got head={object_name(head)} and loss={object_name(loss)}",
            given=() if head is None else ("head", "loss"),
        )
    if miner is not None and head is not None:
        raise ValueError(
            f"miner={object_name(miner)} selects pairs/triplets for a PML loss, but the "
            f"objective is the classification head {object_name(head)}; drop the miner or use "
            "loss=..."
        )
    if isinstance(loss, nn.Module):
        check_pml_objective(loss, miner, gather)


def check_pml_objective(loss: nn.Module, miner: Optional[BaseMiner], gather: bool) -> None:
    if isinstance(loss, CrossBatchMemory):
        if miner is not None:
            raise ValueError(
                f"miner={object_name(miner)} with loss=CrossBatchMemory: the memory loss mines pairs "
                "between the batch and the memory itself, so pass the miner as "
                "CrossBatchMemory(miner=...) instead of to the module"
            )
        if not gather:
            raise ValueError(
                "loss=CrossBatchMemory needs gather_across_ranks=True: every rank must enqueue "
                "the same (gathered) batch or the memories of the ranks drift apart"
            )
        check_same_distance_kind(loss.loss, loss.miner)
        return
    if miner is None:
        return
    if isinstance(loss, LOSSES_REJECTING_MINERS):
        raise ValueError(
            f"loss={object_name(loss)} does not accept mined tuples (PML raises on indices_tuple), "
            f"but miner={object_name(miner)} was given; drop the miner"
        )
    if isinstance(loss, CLASSIFICATION_LOSSES):
        raise ValueError(
            f"loss={object_name(loss)} is a classification/proxy loss that scores every sample "
            f"against class proxies; with miner={object_name(miner)} PML would only re-weight the "
            "samples the miner picked and drop the rest. Drop the miner, or use a pair loss "
            "(e.g. TripletMarginLoss, MultiSimilarityLoss) with it"
        )
    check_same_distance_kind(loss, miner)


def check_same_distance_kind(loss: nn.Module, miner: Optional[nn.Module]) -> None:
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
            f"miner={object_name(miner)} uses {object_name(miner_distance)} (a {kind(miner_distance)}) but "
            f"loss={object_name(loss)} uses {object_name(loss_distance)} (a {kind(loss_distance)}); give "
            f"both the same kind, e.g. distance={object_name(loss_distance)}() on the miner"
        )


def pml_sizes(loss: nn.Module) -> tuple[Optional[int], Optional[int]]:
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


def check_pml_sizes(loss: nn.Module, embedding_dim: int, num_classes: Optional[int]) -> None:
    size, loss_classes = pml_sizes(loss)
    if size is not None and size != embedding_dim:
        raise ValueError(
            f"loss={object_name(loss)} has embedding_size={size} but the model's embeddings have "
            f"embedding_dim={embedding_dim}; make them equal (the CLI fills it in when omitted)"
        )
    if loss_classes is not None and num_classes is not None and loss_classes != num_classes:
        raise ValueError(
            f"loss={object_name(loss)} has num_classes={loss_classes} but num_classes={num_classes} "
            "was given (the number of training classes); make them equal"
        )


def found_nothing(miner: nn.Module) -> bool:
    """Whether the miner's last call returned no tuple at all (from PML's own records)."""
    counts = [getattr(miner, n, 0) for n in ("num_triplets", "num_pos_pairs", "num_neg_pairs")]
    return not any(counts)


def queue_state(loss: Optional[nn.Module]) -> dict[str, Any]:
    """CrossBatchMemory's queue position (plain attributes; its memory is buffers)."""
    if not isinstance(loss, CrossBatchMemory):
        return {}
    return {k: getattr(loss, k) for k in ("queue_idx", "has_been_filled") if hasattr(loss, k)}
