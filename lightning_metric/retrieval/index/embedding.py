"""A model's embeddings outside the training loop, for the index and the commands that fill or
query it: :func:`embed` (a tensor or array of inputs) and :func:`embed_loader` (a loader of
batches, with their labels and dataset ids). Both run the model in eval mode without autograd,
on the model's device, restore its mode, and return float32 on the CPU.

The callbacks do not use them: inside Lightning's evaluation loop the model is already in eval
mode on its device, and the embeddings stay there to be gathered across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.batch import split_batch
from lightning_metric.checks import check_int

__all__ = ["embed", "embed_loader"]


def embed(model: nn.Module, x: Any, batch_size: Optional[int] = None) -> Tensor:
    """``model(x)`` as float32 on CPU, ``batch_size`` rows per call (all at once by default).

    >>> import torch
    >>> embed(torch.nn.Linear(3, 2), torch.zeros(5, 3), batch_size=2).shape
    torch.Size([5, 2])
    """
    x = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=1)
    # An empty tensor still goes through the model once: the result is [0, dim].
    chunks = (
        [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        if isinstance(x, Tensor) and batch_size is not None and len(x)
        else [x]
    )
    return _embed_chunks(model, chunks, "the input")


def embed_loader(
    model: nn.Module, loader: Iterable[Any], owner: str = "embed_loader"
) -> tuple[Tensor, Tensor, Tensor]:
    """``(embeddings [N, D] float32, labels [N], ids [N])`` of every batch of ``loader`` in
    order (``{"x", "label"[, "index"]}`` dicts or ``(x, label[, index])`` tuples). A batch
    without a dataset index gets ids ``-1``, never made-up ones: a per-batch ``arange`` would
    repeat ids across batches and pass items off as each other. ``owner`` names the caller in
    the message about a malformed batch."""
    labels: list[Tensor] = []
    ids: list[Tensor] = []

    def inputs() -> Iterable[Any]:
        for batch in loader:
            x, label, index = split_batch(batch, owner)
            labels.append(torch.as_tensor(label))
            ids.append(index if index is not None else torch.full((len(label),), -1))
            yield x

    embeddings = _embed_chunks(model, inputs(), "the loader")
    return embeddings, torch.cat(labels), torch.cat(ids)


def _embed_chunks(model: nn.Module, chunks: Iterable[Any], source: str) -> Tensor:
    """The one place that runs a model for embeddings: each chunk moved to the model's device,
    eval mode (restored after), no autograd graph kept, float32 CPU results concatenated."""
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    outputs: list[Tensor] = []
    try:
        with torch.no_grad():
            for chunk in chunks:
                if isinstance(chunk, Tensor) and param is not None:
                    chunk = chunk.to(param.device)
                out = model(chunk)
                if not isinstance(out, Tensor):
                    raise ValueError(
                        "the model must return an embeddings tensor [batch, dim], got "
                        f"{type(out).__name__}"
                    )
                outputs.append(out.detach().float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError(f"{source} held no batches: nothing to embed")
    return torch.cat(outputs)
