"""The batch convention every part shares: ``{"x", "label"[, "index"]}`` or a tuple.

``index`` is the sample's position in its data set; evaluation uses it to remove the
duplicates that DistributedSampler padding creates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

Batch = Union[Mapping[str, Tensor], Sequence[Tensor]]


def split_batch(
    batch: Any, owner: str = "lightning_metric"
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(x, labels, index)`` from a dict with keys ``x``, ``label`` (and ``index``) or a
    tuple ``(x, label[, index])``; ``index`` is None when the data set does not provide it."""
    if isinstance(batch, Mapping):
        missing = sorted({"x", "label"} - set(batch))
        if missing:
            raise ValueError(
                f"{owner}: a batch dict needs keys 'x' and 'label' (and optionally 'index'); "
                f"missing {missing}, got keys {sorted(batch)}"
            )
        return batch["x"], batch["label"], batch.get("index")
    if isinstance(batch, Sequence) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise ValueError(
        f"{owner}: expected a batch {{'x', 'label'[, 'index']}} or a tuple (x, label[, index]), "
        f"got {type(batch).__name__}"
    )


def step_embeddings(
    model: nn.Module, outputs: Any, batch: Any, owner: str
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(embeddings [B, D], labels, index)`` of an evaluation step, for callbacks.

    Taken from the step's output ``{"embeddings", "labels"[, "index"]}`` (what
    ``MetricLearningModule`` returns); for any other LightningModule, ``model(batch x)``.
    """
    if isinstance(outputs, Mapping) and "embeddings" in outputs and "labels" in outputs:
        index = outputs.get("index")
        if index is None:
            try:
                index = split_batch(batch, owner)[2]
            except ValueError:
                index = None
        embeddings, labels = outputs["embeddings"], outputs["labels"]
    else:
        x, labels, index = split_batch(batch, owner)
        with torch.no_grad():
            embeddings = model(x)
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError(
            f"{owner}: expected embeddings [B, D] from the step output or pl_module(x), got "
            f"{getattr(embeddings, 'shape', type(embeddings).__name__)}; return "
            "{'embeddings', 'labels', 'index'} from validation_step / test_step"
        )
    return embeddings.detach(), torch.as_tensor(labels).detach(), index
