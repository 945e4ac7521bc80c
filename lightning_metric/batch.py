"""The batch conventions every part shares.

* Input batches (data modules -> steps): ``{"x", "label"[, "index"]}`` or a tuple
  ``(x, label[, index])``, read by :func:`split_batch`.
* Evaluation step outputs (``validation_step`` / ``test_step`` / ``predict_step`` ->
  callbacks): :class:`EmbeddingBatch` ``(embeddings, labels, index)``, read by
  :func:`step_embeddings`, which also takes the older dict ``{"embeddings", "labels"[,
  "index"]}`` that subclasses may still return.

``index`` is the sample's position in its data set; evaluation uses it to remove the
duplicates that DistributedSampler padding creates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

Batch = Union[Mapping[str, Tensor], Sequence[Tensor]]


class EmbeddingBatch(NamedTuple):
    """What ``MetricLearningModule``'s evaluation steps return for one batch.

    ``embeddings`` ``[B, D]`` are unit-norm float32; ``labels`` ``[B]``; ``index`` ``[B]`` the
    samples' positions in their data set, None when the batch has none. A ``NamedTuple``, so
    Lightning moves and collects it like any tuple (``trainer.predict`` returns a list of them).
    """

    embeddings: Tensor
    labels: Tensor
    # Shadows tuple.index(value), which no caller of a step output needs; the field keeps the
    # name the batch dicts use.
    index: Optional[Tensor] = None  # type: ignore[assignment]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        # Code written when the steps returned {"embeddings", "labels", "index"} keeps
        # reading out["embeddings"]; integers and slices index the tuple as usual.
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)


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

    Taken from the step's output: an :class:`EmbeddingBatch` (what ``MetricLearningModule``
    returns) or a dict ``{"embeddings", "labels"[, "index"]}``; for any other output,
    ``model(batch x)``. A missing index is read from the batch.
    """
    found = _step_output(outputs)
    if found is not None:
        embeddings, labels, index = found
        if index is None:
            try:
                index = split_batch(batch, owner)[2]
            except ValueError:
                index = None
    else:
        x, labels, index = split_batch(batch, owner)
        with torch.no_grad():
            embeddings = model(x)
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError(
            f"{owner}: expected embeddings [B, D] from the step output or pl_module(x), got "
            f"{getattr(embeddings, 'shape', type(embeddings).__name__)}; return "
            "EmbeddingBatch(embeddings, labels, index) or {'embeddings', 'labels', 'index'} "
            "from validation_step / test_step"
        )
    return embeddings.detach(), torch.as_tensor(labels).detach(), index


def _step_output(outputs: Any) -> Optional[tuple[Any, Any, Any]]:
    """``(embeddings, labels, index)`` when ``outputs`` carries them, else None."""
    if isinstance(outputs, EmbeddingBatch):
        return outputs.embeddings, outputs.labels, outputs.index
    if isinstance(outputs, Mapping) and "embeddings" in outputs and "labels" in outputs:
        return outputs["embeddings"], outputs["labels"], outputs.get("index")
    return None
