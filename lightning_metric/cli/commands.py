"""`lightning-metric export`, `search` and `benchmark`: ship a trained model and its index, and
compare training recipes under equal conditions.

    lightning-metric export --config CFG --ckpt_path CKPT --output model.onnx   # or model.pt
    lightning-metric search --index DIR --query img.png folder/ --k 5 --output hits.csv
    lightning-metric search --index DIR --config CFG --ckpt_path CKPT --evaluate
    lightning-metric benchmark --config arcface=A.yaml,B.yaml --config ... --num_folds 4 --output DIR
    lightning-metric convert-checkpoint --ckpt_path CKPT --output one.ckpt

All build the model (and data module) from the same YAML as ``fit``; any further
``--trainer.* / --model.* / --data.*`` flags are passed to that config as overrides. Each
command is a module with ``parser()`` and ``run(args, overrides)``: :mod:`.export`,
:mod:`.search`, :mod:`.benchmark.command`, :mod:`.convert` (``convert-checkpoint``: a
checkpoint saved per rank as one file; it takes no config).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from lightning_metric.cli import convert, export, search
from lightning_metric.cli.benchmark import command as benchmark

__all__ = ["COMMANDS", "run_command"]

COMMANDS = ("export", "search", "benchmark", "convert-checkpoint")
_MODULES: dict[str, ModuleType] = {
    "export": export,
    "search": search,
    "benchmark": benchmark,
    "convert-checkpoint": convert,
}


def run_command(argv: Sequence[str]) -> Any:
    """Run ``export``, ``search``, ``benchmark`` or ``convert-checkpoint``; ``argv[0]`` names
    the command."""
    name, rest = argv[0], list(argv[1:])
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; expected one of {COMMANDS}")
    module = _MODULES[name]
    parser: argparse.ArgumentParser = module.parser()
    args, overrides = parser.parse_known_args(rest)
    bad = [a for a in overrides if a.startswith("-") and not _is_config_flag(a)]
    if bad:
        parser.error(
            f"unrecognized arguments: {' '.join(bad)} (config overrides must start with "
            "--trainer., --model., --data. or --seed_everything)"
        )
    if overrides and not args.config:
        overrides = []  # config flags without a config (e.g. a shared smoke-test suffix)
    run: Callable[[argparse.Namespace, list[str]], Any] = module.run
    return run(args, overrides)


def _is_config_flag(arg: str) -> bool:
    return arg.split("=", 1)[0].startswith(("--trainer.", "--model.", "--data.", "--seed_every"))
