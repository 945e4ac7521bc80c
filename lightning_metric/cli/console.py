"""The console script `lightning-metric`: LightningCLI's subcommands (``fit``, ``validate``,
``test``, ``predict``) go to :func:`lightning_metric.cli.lightning_cli.main`, the argparse
commands (``export``, ``search``, ``benchmark``, ``convert-checkpoint``) to
:func:`lightning_metric.cli.commands.run_command`.

Kept apart from :mod:`.lightning_cli` so that the commands may build models through it
without an import cycle.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import ArgsType

from lightning_metric.cli.commands import COMMANDS, run_command
from lightning_metric.cli.lightning_cli import LightningMetricCLI, quiet
from lightning_metric.cli.lightning_cli import main as cli_main

__all__ = ["entry_point", "main"]


def main(args: ArgsType = None, run: bool = True) -> Optional[LightningMetricCLI]:
    """Run ``lightning-metric <args>`` (``sys.argv[1:]`` when ``args`` is None). Returns the
    CLI object for the LightningCLI subcommands, None for the others (call
    :func:`lightning_metric.cli.commands.run_command` for their results)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and argv and argv[0] in COMMANDS:
        quiet()
        run_command([str(a) for a in argv])
        return None
    return cli_main(args, run=run)


def entry_point() -> None:
    """The console script: returns None so the process exits 0 on success."""
    main()


if __name__ == "__main__":  # pragma: no cover
    entry_point()
