"""``python -m lightning_metric.cli``: the console script `lightning-metric`, every subcommand."""

from lightning_metric.cli.console import entry_point

if __name__ == "__main__":  # pragma: no cover
    entry_point()
