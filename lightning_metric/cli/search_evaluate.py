"""`lightning-metric search --evaluate`: recall@k and MAP@R of labelled queries against a saved
index, scored from the neighbour lists the index returns (approximate indexes as they
search), with the retrieval protocol's rules for ties and each query's own entry."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_metric.cli.search_queries import rows_of
from lightning_metric.retrieval.protocol import order_ties, without_excluded
from lightning_metric.retrieval.relevance import relevant_counts

__all__ = ["evaluate"]


def evaluate(
    index: Any, embeddings: Tensor, labels: Tensor, own: np.ndarray
) -> tuple[dict[str, float], dict[str, Any]]:
    """recall@k / MAP@R of the labelled queries, from the neighbour lists ``index.search``
    returns with its current search parameters (an approximate index is scored as it
    searches), deep enough for every query's ``R``. ``own`` is each query's own row in the
    index (-1 if it is no item of it): that entry counts neither in its list nor in its
    ``R``. Ids of -1 (not found) and unlabelled indexed items are never relevant. Also
    returns how it searched."""
    from lightning_metric.retrieval.ranking import neighbour_list_metrics

    all_labels = labels.numpy().astype(np.int64)
    labelled = all_labels >= 0
    if not labelled.any():
        raise SystemExit(
            f"lightning-metric search --evaluate: none of the {len(all_labels)} queries has a "
            "label (all are -1): there is nothing to score"
        )
    q, lab, own = embeddings[torch.from_numpy(labelled)], all_labels[labelled], own[labelled]
    inside = own >= 0
    relevant = relevant_counts(
        torch.from_numpy(lab), torch.from_numpy(index.labels), torch.from_numpy(own)
    ).numpy()
    extra = 1 if inside.any() else 0
    ks = tuple(k for k in (1, 2, 4, 8) if k <= len(index) - extra)
    if not ks:
        raise SystemExit(
            f"lightning-metric search --evaluate: the index holds {len(index)} item(s) and a "
            "query never retrieves itself: nothing to rank"
        )
    scored = relevant > 0
    need = max(ks[-1], int(relevant[scored].max()) if scored.any() else 0)
    depth = min(len(index), need + extra)
    result = index.search(q, k=depth, inputs=False)
    found = result.ids
    _, ordered = order_ties(
        torch.from_numpy(result.scores),
        torch.from_numpy(rows_of(index, found)),
        descending=index.descending,
    )
    rows = without_excluded(ordered, torch.from_numpy(own)).numpy()
    neighbour_labels = np.where(rows >= 0, index.labels[np.maximum(rows, 0)], -1)
    metrics = neighbour_list_metrics(
        torch.from_numpy(neighbour_labels), torch.from_numpy(lab), torch.from_numpy(relevant), ks
    )
    details = {
        "factory": index.factory,
        "search_params": dict(index.search_params),
        "depth": depth,
        "queries": len(all_labels),
        "labelled_queries": int(labelled.sum()),
        "queries_in_index": int(inside.sum()),
        "not_found": int((found < 0).sum()),
    }
    return metrics, details
