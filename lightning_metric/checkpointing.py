"""What ``MetricLearningModule`` stores as hyper-parameters, and what a failed
``load_from_checkpoint`` tells the user.

Under LightningCLI the hyper-parameters are the YAML's class paths and init args, so a
checkpoint rebuilds its own model (``lightning-metric test --ckpt_path``,
``MetricLearningModule.load_from_checkpoint(path)``). From Python the backbone, neck, head,
loss and miner are live objects: they are saved as weights in the state dict, and pickling
them into the hyper-parameters would break ``weights_only`` loading. Their class names are
kept (as ``python_objects``, plain strings) so that loading without them can say what to
pass (:func:`missing_objects_error`).
"""

from __future__ import annotations

import functools
import inspect
from types import FrameType
from typing import Any, Optional

import torch
from lightning import LightningModule

from lightning_metric.pml import ObjectiveCountError

__all__ = [
    "LIVE_OBJECTS",
    "missing_objects_error",
    "qualified_name",
    "save_hyperparameters",
    "saved_hyperparameters",
]

LIVE_OBJECTS = ("backbone", "neck", "head", "loss", "miner")
"""Constructor arguments that are modules: weights in the state dict, not hyper-parameters."""
_NOT_SAVED = (*LIVE_OBJECTS, "optimizer", "lr_scheduler")


def save_hyperparameters(module: LightningModule, frame: FrameType, **objects: object) -> None:
    """Save the config under LightningCLI, only plain values otherwise (see the module doc).

    ``frame`` is the constructor's frame, whose arguments Lightning reads; ``objects`` the
    live objects whose class names are recorded."""
    if under_lightning_cli():
        module.save_hyperparameters(frame=frame)
    else:
        module.save_hyperparameters(ignore=list(_NOT_SAVED), frame=frame)
        module.hparams["python_objects"] = {
            k: qualified_name(v) for k, v in objects.items() if v is not None
        }


def qualified_name(obj: object) -> str:
    """``module.QualName`` of an object's class (a class, a partial's target, an instance)."""
    func = obj.func if isinstance(obj, functools.partial) else obj
    cls = func if inspect.isclass(func) else type(func)
    return f"{cls.__module__}.{cls.__qualname__}"


def under_lightning_cli() -> bool:
    """Whether LightningCLI is instantiating this module with its config as hparams."""
    try:  # Lightning's internal hook (2.3+); without it, plain values are the safe choice.
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        return False
    return _given_hyperparameters.get() is not None


def saved_hyperparameters(checkpoint_path: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's hyper-parameters, None when they cannot be read as plain values
    (only the error path reads them: Lightning has just read the same file)."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        return dict(checkpoint.get("hyper_parameters", {}))
    except Exception:  # noqa: BLE001 - the caller decides without them
        return None


def _requires_backbone(cls: type) -> bool:
    """Whether ``cls(...)`` fails without ``backbone`` (a subclass may give it a default)."""
    parameter = inspect.signature(cls).parameters.get("backbone")
    return parameter is None or parameter.default is inspect.Parameter.empty


def missing_objects_error(
    cls: type, checkpoint_path: Any, kwargs: dict[str, Any], error: Exception
) -> Optional[TypeError]:
    """The error to raise instead of ``error`` (raised by ``cls.load_from_checkpoint(
    checkpoint_path, **kwargs)``) when it failed because the checkpoint was saved from a
    module built in Python and the live objects were not passed again; None when ``error``
    has another cause (the caller re-raises it)."""
    if isinstance(error, ObjectiveCountError):
        if "head" in kwargs or "loss" in kwargs:
            return None
        return TypeError(_load_message(cls, checkpoint_path, kwargs))
    if not isinstance(error, TypeError) or "backbone" in kwargs or not _requires_backbone(cls):
        return None
    saved = saved_hyperparameters(checkpoint_path)
    # Unreadable hyper-parameters (not plain values: not a Python-built checkpoint) or a
    # saved backbone: the TypeError has another cause.
    if saved is None or "backbone" in saved:
        return None
    return TypeError(_load_message(cls, checkpoint_path, kwargs, saved))


def _load_message(
    cls: type, checkpoint_path: Any, kwargs: dict[str, Any], saved: Optional[dict[str, Any]] = None
) -> str:
    if saved is None:
        saved = saved_hyperparameters(checkpoint_path) or {}
    used: dict[str, str] = dict(saved.get("python_objects", {}) or {})
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
