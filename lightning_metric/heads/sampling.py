"""Class-centre sampling (partial FC, An et al. 2021), single process, CPU or CUDA."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_classes(labels: Tensor, num_classes: int, sample_rate: float) -> tuple[Tensor, Tensor]:
    """Pick the classes one training step sees.

    Every class present in ``labels`` is kept; the rest of the
    ``max(ceil(sample_rate * num_classes), #positives, 2)`` slots are filled uniformly at random
    from the other classes (at least two classes, so a batch of one class still has a
    negative: a one-class softmax has loss 0 and no gradient). Returns ``(class_index, local_labels)``: the sorted class ids
    (int64, ``[n]``) and ``labels`` remapped into ``[0, n)``.
    """
    num_sample = max(math.ceil(sample_rate * num_classes), 2)
    # Random keys in [0, 1) for every class, positives forced to the top: one top-k draws
    # "all positives + uniform negatives" without a Python loop or a set difference.
    keys = torch.rand(num_classes, device=labels.device)
    keys[labels] = 2.0
    num_pos = int(torch.count_nonzero(keys == 2.0))
    num_sample = min(max(num_sample, num_pos), num_classes)
    class_index = torch.topk(keys, num_sample, sorted=False).indices.sort().values
    return class_index, torch.searchsorted(class_index, labels)


def class_rows(class_ids: Tensor, sub_centers: int) -> Tensor:
    """Weight rows ``[len * K]`` of classes whose sub-centre ``k`` lives at row ``c * K + k``."""
    if sub_centers == 1:
        return class_ids
    offsets = torch.arange(sub_centers, device=class_ids.device)
    return (class_ids.unsqueeze(1) * sub_centers + offsets).flatten()
