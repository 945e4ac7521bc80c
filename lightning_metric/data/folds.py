"""Class-disjoint k-fold cross-validation: which classes each fold holds out.

As in "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020), checkpoints and
hyper-parameters are chosen by cross-validation on the training classes, never on the test
classes. The data modules call :func:`class_folds` on their cross-validation pool (see
``ArrayDataModule``) and :func:`select_classes` to cut their items by class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from lightning_metric.checks import check_int
from lightning_metric.data.samplers import derive_seed

__all__ = ["check_fold_arguments", "class_folds", "select_classes"]


def check_fold_arguments(num_folds: Any, fold: Any) -> tuple[Optional[int], Optional[int]]:
    """``(num_folds, fold)`` checked together: both ``None``, or ``num_folds >= 2`` and
    ``fold`` in ``[0, num_folds)``."""
    if num_folds is None:
        if fold is not None:
            raise ValueError(
                f"fold={fold!r} is set but num_folds is None: fold picks one of num_folds "
                "class-disjoint folds; set num_folds too, or leave fold unset"
            )
        return None, None
    num_folds = check_int("num_folds", num_folds, minimum=2)
    if fold is None:
        raise ValueError(
            f"num_folds={num_folds} needs fold, the 0-based index of the fold served as "
            f"validation: an integer in [0, {num_folds - 1}]"
        )
    return num_folds, check_int("fold", fold, minimum=0, maximum=num_folds - 1)


def class_folds(class_ids: Sequence[Any], num_folds: int, seed: int) -> list[np.ndarray]:
    """Deal the classes ``class_ids`` into ``num_folds`` disjoint folds, drawn by ``seed``.

    The classes are sorted (so the order they are given in does not matter), permuted by a
    generator seeded from ``derive_seed("class_folds", seed)`` (a stream of its own), and cut
    into ``num_folds`` folds whose sizes differ by at most one. Each fold is returned sorted. The same arguments give the same
    folds in every process and on every machine (numpy's PCG64 stream is fixed).

    >>> folds = class_folds([10, 11, 12, 13, 14], num_folds=2, seed=0)
    >>> sorted(len(f) for f in folds)
    [2, 3]
    >>> sorted(int(c) for f in folds for c in f)
    [10, 11, 12, 13, 14]
    >>> [f.tolist() for f in folds] == [f.tolist() for f in class_folds([14, 13, 12, 11, 10], 2, 0)]
    True
    """
    num_folds = check_int("num_folds", num_folds, minimum=2)
    seed = check_int("seed", seed)
    ids = list(class_ids)
    if len(set(ids)) != len(ids):
        repeated = sorted({c for c in ids if ids.count(c) > 1}, key=repr)
        raise ValueError(f"class_ids must not repeat a class, got {repeated[:5]} repeated")
    if num_folds > len(ids):
        raise ValueError(
            f"num_folds={num_folds} is larger than the {len(ids)} classes of the "
            f"cross-validation pool: every fold needs at least one class; use num_folds <= "
            f"{len(ids)}" + (" (and >= 2)" if len(ids) >= 2 else "")
        )
    ordered = np.asarray(sorted(ids))
    # A stream of its own: the data modules draw their train/val/test class split from
    # `seed` directly, and the folds must not repeat that order.
    order = np.random.default_rng(derive_seed("class_folds", seed)).permutation(len(ordered))
    return [np.sort(ordered[part]) for part in np.array_split(order, num_folds)]


def select_classes(
    item_classes: Sequence[Any], keep: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """``(rows, labels, classes)``: the items whose class is in ``keep``, each labelled by the
    position of its class in ``classes`` = sorted ``keep`` (``classes[label]`` = its class).

    >>> rows, labels, classes = select_classes(["b", "a", "c", "b"], ["b", "c"])
    >>> rows.tolist(), labels.tolist(), classes
    ([0, 2, 3], [0, 1, 0], ['b', 'c'])
    """
    classes = sorted(keep)
    position = {c: i for i, c in enumerate(classes)}
    rows = [i for i, c in enumerate(item_classes) if c in position]
    labels = [position[item_classes[i]] for i in rows]
    return np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64), classes
