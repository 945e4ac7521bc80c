"""`lightning-metric benchmark`: the fair-comparison protocol of Musgrave et al., "A Metric
Learning Reality Check" (ECCV 2020), as one command.

Every config is trained once per class-disjoint fold of the training classes (the data module's
``num_folds`` / ``fold``), the checkpoint with the best validation ``map@r`` of the fold embeds
the held-out test split, and the report gives the test metrics "separate" (mean over the folds
with a 95% Student-t interval) and "concatenated" (each item's fold embeddings concatenated).

Modules: ``command`` (the argparse parser and entry), ``configs`` (parsing, resolving, the
equal-conditions check), ``fold`` (one fold's fit and test embeddings, run in a subprocess as
``python -m lightning_metric.cli.benchmark.fold``), ``run`` (the plan, resume,
orchestration), ``stats`` (means, intervals, concatenation), ``report`` (JSON, Markdown, PNG,
logger), ``layout`` (file names).
"""

from lightning_metric.cli.benchmark.configs import BenchmarkError

__all__ = ["BenchmarkError"]
