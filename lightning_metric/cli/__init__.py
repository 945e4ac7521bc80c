"""The `lightning-metric` command line. No library module imports this package: it builds on
the library, never the other way round (``tests/test_import_graph.py`` checks).

- :mod:`.lightning_cli`: :class:`LightningMetricCLI` and :func:`main`, the LightningCLI
  subcommands ``fit``, ``validate``, ``test``, ``predict`` (callable from Python:
  ``main(args, run=False)`` returns the CLI object with its model, data module and trainer);
- :mod:`.console`: the console script, which also dispatches the argparse commands of
  :mod:`.commands`: ``export`` (:mod:`.export`), ``search`` (:mod:`.search`) and
  ``benchmark`` (:mod:`.benchmark`);
- :mod:`.checkpoint_settings`: what ``--ckpt_path`` does to model settings given with it.

``python -m lightning_metric.cli <subcommand> ...`` runs the console script.
"""

from lightning_metric.cli.lightning_cli import INDEX_DIR, LightningMetricCLI, main

__all__ = ["INDEX_DIR", "LightningMetricCLI", "main"]
