"""`lightning-metric benchmark`: the command line of the fair-comparison protocol (its parser,
and the call into :func:`lightning_metric.cli.benchmark.run.run_benchmark`)."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_metric.cli.benchmark.configs import BenchmarkError

__all__ = ["parser", "run"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-metric benchmark",
        description=(
            "Compare training recipes as in Musgrave et al., 'A Metric Learning Reality Check' "
            "(ECCV 2020). Each --config is trained once per class-disjoint fold of the training "
            "classes (--data.init_args.num_folds K --data.init_args.fold i, one subprocess per "
            "fold, in sequence; DDP flags work as in fit), into <output>/<name>/fold_<i>; the "
            "fold's checkpoint with the best val/map@r embeds the held-out test split. Reported "
            "per config: test MAP@R, R-precision and P@1 'separate' (mean over the folds' "
            "models with a 95%% Student-t interval) and 'concatenated' (each test item's fold "
            "embeddings concatenated and L2-normalised, i.e. ranked by the folds' mean cosine), "
            "and the time, in <output>/results.json, results.md, results.png and the configs' "
            "logger. Before anything trains every config is resolved and compared with the "
            "first: only the objective (model.init_args.head / loss / miner / objective_lr) and "
            "output names may differ, unless --allow_difference KEY. Rerunning the same command "
            "resumes (finished folds are not retrained; an interrupted fold restarts, its "
            "files kept aside); other settings into the same --output are refused. Further "
            "--trainer.* / --model.* / --data.* flags apply to every config."
        ),
    )
    p.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="NAME=YAML[,YAML...]",
        help="a config to compare: YAML files merged in order (NAME defaults to the last "
        "file's name without .yaml); repeat for each config",
    )
    p.add_argument(
        "--num_folds", type=int, required=True, help="folds of the training classes (>= 2)"
    )
    p.add_argument("--output", required=True, help="the benchmark's folder")
    p.add_argument(
        "--base", action="append", default=[], help="YAML prepended to every config (repeatable)"
    )
    p.add_argument(
        "--allow_difference",
        action="append",
        default=[],
        metavar="KEY",
        help="accept configs that differ in KEY or below it, e.g. data.init_args.m_per_class "
        "(repeatable; recorded in results.json)",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: report the configs whose folds have all finished (results so "
        "far of a long or interrupted benchmark)",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="resolve and check the configs and print the plan (configs, folds, commands); train nothing",
    )
    return p


def run(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Run (or plan, or report) the benchmark; a refused benchmark exits with its reason."""
    # Imported here: the orchestration pulls in scipy and matplotlib, which the console
    # script's other subcommands should not pay for at start.
    from lightning_metric.cli.benchmark.run import run_benchmark

    try:
        return run_benchmark(
            args.config, args.num_folds, args.output, args.base, args.allow_difference,
            overrides, args.dry_run, args.report_only,
        )  # fmt: skip
    except BenchmarkError as error:
        raise SystemExit(f"lightning-metric benchmark: {error}") from error
