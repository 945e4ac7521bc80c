"""What ``--ckpt_path`` does to model settings that differ from the checkpoint's.

LightningCLI (``LightningCLI._parse_ckpt_path``) parses the hyper-parameters saved in a
checkpoint *over* the configuration given on the command line and in ``--config`` files, so
``lightning-metric fit --config X --ckpt_path CKPT --model.embedding_dim=64`` used to train
the checkpoint's 32 dimensions and exit 0. :func:`reconcile_checkpoint_settings` compares the
given model settings with the merged ones and never lets one be dropped:

* **applied** (the given value wins): settings that hold no state in the checkpoint and whose
  new value gives the right result from the restored state: ``nonfinite`` and
  ``gather_across_ranks``; under ``validate`` / ``test`` / ``predict`` also every
  training-only setting (``optimizer``, ``lr_scheduler``, ``objective_lr``,
  ``lr_scheduler_interval``), which evaluation does not use.
* **refused** (:class:`CheckpointSettingsError`): the model class (``--model=...``) and
  every other model setting. The backbone, neck, head (class or arguments), loss, miner,
  ``embedding_dim`` and ``num_classes`` describe the weights (they would not load, or would
  load and be read with another meaning, e.g. a head's margin); the optimizer (class or
  arguments such as ``lr``), ``objective_lr``, the LR scheduler and its interval are
  restored from the checkpoint's optimizer and scheduler state, which would overwrite or
  reinterpret the new value.

To change a refused setting, start a new run without ``--ckpt_path``; or, where the weights
still fit the new settings (optimizer, learning rate, scheduler, a head's margin), load them
in Python with ``MetricLearningModule.load_from_checkpoint(path, **changes)`` and fit that
model, which starts a fresh optimizer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APPLIED", "TRAINING_ONLY", "CheckpointSettingsError", "reconcile_checkpoint_settings"]

APPLIED = frozenset({"nonfinite", "gather_across_ranks"})
"""Settings whose given value is used on resume: no state of theirs is in the checkpoint."""
TRAINING_ONLY = frozenset(
    {
        "optimizer",
        "lr_scheduler",
        "objective_lr",
        "lr_scheduler_interval",
        "matryoshka_dims",  # only the loss reads them: the embedding is the same
        "matryoshka_weights",
    }
)
"""Settings that only training reads: applied (unused) when evaluating a checkpoint."""
_EVALUATION = frozenset({"validate", "test", "predict"})


class CheckpointSettingsError(ValueError):
    """A model setting given with ``--ckpt_path`` that the checkpoint cannot honour."""


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """``{dotted key: value}`` of a (nested) namespace or dict."""
    items = vars(value) if hasattr(value, "__dict__") and not isinstance(value, type) else value
    if isinstance(items, dict):
        out: dict[str, Any] = {}
        for key, item in items.items():
            if not str(key).startswith("__"):
                out.update(_leaves(item, f"{prefix}.{key}"))
        return out or {prefix: {}}
    return {prefix: value}


def _init_args(model: Any) -> dict[str, Any]:
    args = getattr(model, "init_args", None)
    return dict(vars(args)) if args is not None else {}


def reconcile_checkpoint_settings(
    given: Any, merged: Any, subcommand: str, ckpt_path: str
) -> dict[str, tuple[Any, Any]]:
    """Put the applied settings of ``given`` back into ``merged`` (both the ``model`` part of
    a subcommand's config, before and after LightningCLI parsed the checkpoint's
    hyper-parameters over it) and raise for a refused one. Returns ``{dotted key:
    (checkpoint's value, given value)}`` of the applied differences."""
    before, after = _init_args(given), _init_args(merged)
    applied: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    model_class = getattr(merged, "class_path", None), getattr(given, "class_path", None)
    if None not in model_class and model_class[0] != model_class[1]:
        refused.append(
            f"--model.class_path: checkpoint {model_class[0]!r}, given {model_class[1]!r}"
        )
    for name in sorted(before.keys() | after.keys()):
        old, new = after.get(name), before.get(name)
        if name == "num_classes" and new is None:
            continue  # linked from data.num_classes after this point; checked when loading
        left, right = _leaves(old, f"model.{name}"), _leaves(new, f"model.{name}")
        changed = {
            key: (left.get(key), right.get(key))
            for key in sorted(left.keys() | right.keys())
            if left.get(key) != right.get(key)
        }
        # Another class: its own arguments are not comparable, the class is the difference.
        changed = {k: v for k, v in changed.items() if k.endswith(".class_path")} or changed
        if not changed:
            continue
        if name in APPLIED or (subcommand in _EVALUATION and name in TRAINING_ONLY):
            applied.update(changed)
            setattr(merged.init_args, name, new)
            continue
        refused += [f"--{key}: checkpoint {c!r}, given {g!r}" for key, (c, g) in changed.items()]
    if refused:
        raise CheckpointSettingsError(
            f"{subcommand} --ckpt_path={ckpt_path}: these model settings differ from the "
            f"checkpoint's, which would silently override them: {'; '.join(refused)}. The "
            "checkpoint's weights, optimizer and scheduler state were built with its own "
            "settings, so these cannot change on resume (only nonfinite and "
            "gather_across_ranks can). Give the checkpoint's values to resume; to train with the new settings, start a new run without "
            "--ckpt_path, or in Python load the weights with "
            "MetricLearningModule.load_from_checkpoint(path, ...) and fit that model."
        )
    return applied
