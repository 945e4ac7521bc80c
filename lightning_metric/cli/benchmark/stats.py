"""The numbers of the report: per-fold test metrics, their mean with a 95% Student-t interval
("separate"), and the metrics of the folds' embeddings concatenated per item ("concatenated")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

from lightning_metric.retrieval import retrieval_metrics

__all__ = ["concatenate", "mean_interval", "retrieval_scores", "separate"]


def retrieval_scores(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out cosine retrieval metrics of one set of test embeddings: RecallAtK's
    defaults, so the numbers `lightning-metric test` logs as ``test/...``."""
    return retrieval_metrics(torch.from_numpy(embeddings), torch.from_numpy(labels))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the two-sided Student-t interval of the mean:
    ``t_{(1+confidence)/2, n-1} * std(ddof=1) / sqrt(n)``; needs two values or more."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.size}")
    t = float(scipy_stats.t.ppf((1 + confidence) / 2, df=x.size - 1))
    return float(x.mean()), t * float(x.std(ddof=1)) / float(np.sqrt(x.size))


def separate(
    per_fold: Sequence[dict[str, float]], keys: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{key: {"mean", "half_width", "std", "values"}}`` over the folds' models."""
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(m[key]) for m in per_fold]
        mean, half = mean_interval(values)
        out[key] = {"mean": mean, "half_width": half, "std": float(np.std(values, ddof=1)),
                    "values": values}  # type: ignore[dict-item]  # fmt: skip
    return out


def concatenate(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Each item's fold embeddings (each L2-normalised first) side by side, the result
    L2-normalised. The cosine of two such rows is the mean of the folds' cosines, so the
    concatenated model ranks by the folds' average similarity."""
    if not embeddings:
        raise ValueError("nothing to concatenate: no fold embeddings")
    rows = {e.shape[0] for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"the folds embedded different numbers of test items: {sorted(rows)}")
    units = [_unit(np.asarray(e, dtype=np.float32)) for e in embeddings]
    return _unit(np.concatenate(units, axis=1))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
