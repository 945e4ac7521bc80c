"""Clustering quality of embeddings: NMI and AMI of a FAISS k-means against the labels."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["clustering_metrics"]


def clustering_metrics(prepared: Tensor, labels: Tensor, seed: int = 0) -> dict[str, float]:
    """``{"nmi", "ami"}`` of a k-means clustering (one cluster per class present) of the
    ``prepared`` rows (:func:`~lightning_metric.retrieval.knn.prepare`) against ``labels``."""
    import faiss
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = prepared.float().cpu().numpy()
    y = labels.cpu().numpy()
    num_clusters = len(np.unique(y))
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=20, seed=seed, verbose=False)
    km.train(x)
    _, assigned = km.index.search(x, 1)
    return {
        "nmi": float(normalized_mutual_info_score(y, assigned[:, 0])),
        "ami": float(adjusted_mutual_info_score(y, assigned[:, 0])),
    }
