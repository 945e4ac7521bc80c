"""The queries of `lightning-metric search`: image files and folders (:func:`image_paths`) or
a data module's split (:func:`split_queries`), and which of them are indexed items themselves
(:func:`own_rows`), whose own entries must not count as their neighbours."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_metric.retrieval.index.embedding import embed_loader

__all__ = ["IMAGE_SUFFIXES", "image_paths", "own_rows", "rows_of", "split_queries"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_paths(queries: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to their images (recursively, sorted)."""
    paths: list[Path] = []
    for q in queries:
        p = Path(q)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {q!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"query {q!r} is neither an image file nor a folder")
    return paths


def split_queries(
    model: nn.Module, datamodule: Any, split: str
) -> tuple[Tensor, Tensor, Tensor, Any]:
    """Embeddings, labels and dataset ids of the ``split`` loader, and its dataset."""
    datamodule.setup(split if split != "val" else "validate")
    loader_fn = getattr(datamodule, f"{split}_dataloader", None)
    loader = loader_fn() if callable(loader_fn) else None
    if loader is None:
        raise SystemExit(
            f"lightning-metric search: {type(datamodule).__name__} has no {split!r} loader; "
            "pick another --split"
        )
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise SystemExit(
            f"lightning-metric search: the {split!r} split of {type(datamodule).__name__} "
            "holds no items: there is nothing to query"
        )
    embeddings, labels, ids = embed_loader(model, loader, "lightning-metric search")
    return embeddings, labels, ids, dataset


def own_rows(
    index: Any, datamodule: Any, split: str, query_ids: Tensor, dataset: Any
) -> tuple[np.ndarray, str]:
    """The index row of each query that is itself an indexed item (-1 elsewhere), and how
    they were matched: by source path when both sides have paths, else by dataset id when
    the index records the same data module class and split (ids of another split or data
    set name other items)."""
    none = np.full(len(query_ids), -1, dtype=np.int64)
    ids = query_ids.numpy()
    paths = getattr(dataset, "paths", None)
    if index.paths is not None and paths is not None and (ids >= 0).all():
        where = {_norm(p): row for row, p in enumerate(index.paths)}
        found = [where.get(_norm(str(paths[i])), -1) for i in ids.tolist()]
        return np.asarray(found, dtype=np.int64), "matched by source path"
    data = index.info.get("data") or {}
    cls = type(datamodule)
    resolved = getattr(datamodule, "predict_split", None) if split == "predict" else split
    same_data = data.get("class_path") == f"{cls.__module__}.{cls.__qualname__}"
    if not data or not same_data or data.get("predict_split") != resolved:
        recorded = f"{data.get('class_path')} split {data.get('predict_split')!r}"
        return none, (
            f"none: the index records {recorded}" if data
            else "none: the index records no data module, so none can be matched"
        )  # fmt: skip
    size = data.get("dataset_size")
    if size is not None and dataset is not None and size != len(dataset):
        raise SystemExit(
            f"lightning-metric search: the index was built from {size} items of the "
            f"{resolved!r} split, the config's has {len(dataset)}: its ids name other items. "
            "Use the data configuration the index was built with"
        )
    differ = _item_settings_differ(data.get("hparams"), datamodule)
    if differ:
        # The same size by chance (another seed, fold or fraction): the ids still name other
        # items, and queries that are indexed items would find themselves unmatched.
        raise SystemExit(
            f"lightning-metric search: the index was built from the {resolved!r} split of a "
            f"data module with other item settings ({differ}): its ids name other items. "
            "Use the data configuration the index was built with"
        )
    rows = rows_of(index, np.where(ids >= 0, ids, -1))
    return rows, "matched by dataset id"


# Data-module settings that change how items are loaded, not which items a split holds.
_LOADER_SETTINGS = frozenset(
    {"batch_size", "eval_batch_size", "num_workers", "augment", "m_per_class", "predict_split"}
)


def _item_settings_differ(recorded: Any, datamodule: Any) -> str:
    """The settings (seed, folds, fractions, ...) on which the recorded data module and the
    config's differ, as ``key: index value != config value``; empty when they agree. Dataset
    ids name the same items only when these agree."""
    if not isinstance(recorded, dict):
        return ""
    current = json.loads(json.dumps(dict(getattr(datamodule, "hparams", {})), default=str))
    keys = sorted((set(recorded) | set(current)) - _LOADER_SETTINGS)
    return ", ".join(
        f"{key}: {recorded.get(key)!r} != {current.get(key)!r}"
        for key in keys
        if recorded.get(key) != current.get(key)
    )


def rows_of(index: Any, ids: np.ndarray) -> np.ndarray:
    """The row of each id in the index, -1 for an id it does not hold (a -1 of FAISS)."""
    if not len(index):
        return np.full(ids.shape, -1, dtype=np.int64)
    sorter = np.argsort(index.ids, kind="stable")
    pos = np.clip(np.searchsorted(index.ids, ids, sorter=sorter), 0, len(index) - 1)
    rows = sorter[pos]
    return np.where(index.ids[rows] == ids, rows, -1).astype(np.int64)


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))
