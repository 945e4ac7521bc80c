"""Face-verification metrics of embeddings: TAR@FAR (= 1 - FNMR@FMR) and the equal error rate."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_metric.checks import ArgumentTypeError, check_labels, check_metric
from lightning_metric.retrieval.knn import as_tensor, check_embeddings, prepare

__all__ = ["verification_metrics"]


def verification_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None = None,
    *,
    pairs: Tensor | np.ndarray | None = None,
    is_same: Tensor | np.ndarray | None = None,
    far: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    metric: Literal["cosine", "ip"] = "cosine",
    max_items: int = 20000,
) -> dict[str, float]:
    """Face-verification metrics: TAR@FAR (= 1 - FNMR@FMR) and the equal error rate.

    Either ``labels`` (every unordered pair of the ``N`` items is scored; genuine pairs share
    a label) or ``pairs`` ``[P, 2]`` item indices with ``is_same`` ``[P]`` booleans (the
    protocol's pair list). A pair is accepted when its similarity is above the threshold;
    the threshold for each target FAR is the lowest one whose false accept rate on the
    impostor pairs is <= the target. FAR targets below ``1 / num_impostor_pairs`` cannot be
    measured and are left out with a warning.

    Returns:
        ``{"tar@far=1e-03": ..., "fnmr@fmr=1e-03": ..., "threshold@far=1e-03": ...,
        "eer": ...}``.

    Example: two people, two photos each; every genuine pair scores above every impostor
    pair, so all genuine pairs are accepted and the equal error rate is 0:

    >>> import torch
    >>> faces = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> result = verification_metrics(faces, torch.tensor([0, 0, 1, 1]), far=(0.5,))
    >>> result["tar@far=5e-01"], result["eer"]
    (1.0, 0.0)
    """
    check_metric(metric, ("cosine", "ip"))
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    x = prepare(emb, metric)
    fars = tuple(float(f) for f in far)
    for f in fars:
        if not 0.0 < f < 1.0:
            raise ValueError(f"`far` values must lie in (0, 1), got {f}")
    if (labels is None) == (pairs is None):
        raise ValueError("pass exactly one of `labels` (all pairs) or `pairs` + `is_same`")
    if labels is not None:
        n = x.shape[0]
        if n > max_items:
            raise ValueError(
                f"all-pairs verification of {n} items needs {n * (n - 1) // 2} scores; "
                f"pass `pairs` or raise max_items (currently {max_items})"
            )
        lab = check_labels("labels", labels, length=n).to(x.device)
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        scores = (x @ x.T)[i, j]
        same = lab[i] == lab[j]
    else:
        if pairs is None or is_same is None:
            raise ValueError("`pairs` needs `is_same`, one boolean per pair")
        p = as_tensor(pairs, "pairs").to(x.device)
        same = as_tensor(is_same, "is_same").to(x.device)
        if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise ArgumentTypeError(f"`pairs` must hold integer item indices, got dtype {p.dtype}")
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"`pairs` must be an int tensor [P, 2], got {tuple(p.shape)}")
        same = _check_is_same(same)
        if same.shape != (p.shape[0],):
            raise ValueError(
                f"`is_same` must have one entry per pair ({p.shape[0]}), got {tuple(same.shape)}"
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= x.shape[0]):
            raise ValueError(
                f"`pairs` indices must lie in [0, {x.shape[0]}), got range "
                f"[{int(p.min())}, {int(p.max())}]"
            )
        scores = (x[p[:, 0]] * x[p[:, 1]]).sum(1)
    genuine, impostor = scores[same].double(), scores[~same].double()
    if genuine.numel() == 0 or impostor.numel() == 0:
        raise ValueError(
            f"verification needs genuine and impostor pairs, got {genuine.numel()} genuine "
            f"and {impostor.numel()} impostor pairs"
        )
    imp_desc = torch.sort(impostor, descending=True).values
    n_imp = impostor.numel()
    out: dict[str, float] = {}
    skipped = []
    for f in fars:
        allowed = int(np.floor(f * n_imp + 1e-9))
        if allowed < 1:
            skipped.append(f)
            continue
        # Accept score > t: at most `allowed` impostors may lie strictly above t.
        t = imp_desc[allowed] if allowed < n_imp else imp_desc[-1] - 1.0
        tar = float((genuine > t).double().mean())
        out[f"tar@far={f:.0e}"] = tar
        out[f"fnmr@fmr={f:.0e}"] = 1.0 - tar
        out[f"threshold@far={f:.0e}"] = float(t)
    if skipped:
        warnings.warn(
            f"FAR targets {skipped} need more than {n_imp} impostor pairs to be measured; left out",
            UserWarning,
            stacklevel=2,
        )
    out["eer"] = _eer(genuine, impostor)
    return out


def _check_is_same(same: Tensor) -> Tensor:
    # A float (a score, a probability) would be cast silently: 0.3 -> True.
    if same.dtype == torch.bool:
        return same
    if same.is_floating_point() or same.is_complex():
        raise ArgumentTypeError(
            f"`is_same` must be booleans (or integers 0/1), one per pair, got dtype {same.dtype}"
        )
    bad = (same != 0) & (same != 1)
    if bool(bad.any()):
        raise ValueError(
            f"`is_same` must be booleans (or integers 0/1), got value {int(same[bad][0])}"
        )
    return same.bool()


def _eer(genuine: Tensor, impostor: Tensor) -> float:
    thresholds = torch.cat([genuine, impostor]).unique()
    g = torch.sort(genuine).values
    i = torch.sort(impostor).values
    # Accept score >= t: FRR = share of genuine below t, FAR = share of impostors at/above t.
    frr = torch.searchsorted(g, thresholds, right=False).double() / g.numel()
    far = 1.0 - torch.searchsorted(i, thresholds, right=False).double() / i.numel()
    best = int(torch.argmin((frr - far).abs()))
    return float((frr[best] + far[best]) / 2)
