"""The examples in the docstrings of the functions a user calls first run as tests.

Add a module to ``MODULES`` to run its docstring examples too.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lightning_metric.retrieval.knn",
    "lightning_metric.retrieval.ranking",
    "lightning_metric.retrieval.sharded",
    "lightning_metric.retrieval.verification",
    "lightning_metric.retrieval.index.core",
    "lightning_metric.retrieval.index.embedding",
    "lightning_metric.heads.base",
    "lightning_metric.heads.margins",
    "lightning_metric.heads.adaptive",
    "lightning_metric.heads.sharding",
    "lightning_metric.checks",
    "lightning_metric.data.folds",
    "lightning_metric.schedules",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see above)"
