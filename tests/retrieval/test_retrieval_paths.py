"""Where the retrieval code lives: old module paths still give the same objects, the
functional core imports without Lightning, and RecallAtK keeps RetrievalMetrics' arguments."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import lightning_metric
import lightning_metric.metrics
import lightning_metric.retrieval
import lightning_metric.retrieval.metrics
import lightning_metric.search
from lightning_metric.callbacks import RecallAtK
from lightning_metric.retrieval import index, ranking, torchmetric, verification


def test_old_module_paths_give_the_same_objects_with_a_warning_naming_the_new_path() -> None:
    def old(module: object, name: str) -> object:
        with pytest.warns(FutureWarning, match=r"deprecated.*import it from `lightning_metric\."):
            return getattr(module, name)

    assert old(lightning_metric.metrics, "RetrievalMetrics") is torchmetric.RetrievalMetrics
    for name in ("EmbeddingIndex", "SearchResult", "IndexFormatError", "MANIFEST", "FORMAT"):
        assert old(lightning_metric.search, name) is getattr(index, name)
    module = lightning_metric.retrieval.metrics
    assert old(module, "retrieval_metrics") is ranking.retrieval_metrics
    assert old(module, "retrieval_metrics_per_class") is ranking.retrieval_metrics_per_class
    assert old(module, "verification_metrics") is verification.verification_metrics
    with pytest.warns(FutureWarning, match="lightning_metric.retrieval.Similarity"):
        assert lightning_metric.retrieval.Metric is lightning_metric.retrieval.Similarity
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lightning_metric.search.nothing  # noqa: B018
    for name in ("RetrievalMetrics", "EmbeddingIndex", "SearchResult", "IndexFormatError"):
        assert getattr(lightning_metric, name) is getattr(lightning_metric.retrieval, name)


def test_retrieval_all_lists_public_names_only() -> None:
    names = set(lightning_metric.retrieval.__all__)
    assert {"recall_at_k", "precision_at_k", "map_at_r", "r_precision", "mrr"} <= names
    assert "Metric" not in names and not any(n.startswith("_") for n in names)
    assert all(hasattr(lightning_metric.retrieval, n) for n in names)


def test_retrieval_imports_without_lightning() -> None:
    code = (
        "import sys, lightning_metric.retrieval as r; r.retrieval_metrics; "
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('lightning'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recall_callback_schema_lists_retrieval_metrics_arguments() -> None:
    # RecallAtK forwards **metric_args to RetrievalMetrics: its YAML schema (what LightningCLI
    # builds from the signature) has RetrievalMetrics' arguments, types and defaults.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RecallAtK, "cb")
    defaults = parser.get_defaults().cb
    theirs = inspect.signature(torchmetric.RetrievalMetrics).parameters
    for name, parameter in theirs.items():
        if name == "compute_on_cpu":  # RecallAtK's offload_to_cpu
            assert "compute_on_cpu" not in defaults and defaults.offload_to_cpu is False
            continue
        assert name in defaults, name
        want = (
            list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        )
        got = defaults[name]
        assert (list(got) if isinstance(got, tuple) else got) == want, name
    cfg = parser.parse_args(["--cb.k=[1, 5]", "--cb.metric=ip", "--cb.precision=false"])
    callback = parser.instantiate_classes(cfg).cb
    assert callback.k == (1, 5) and callback.metrics.metric == "ip"
    assert callback.metrics.precision is False
