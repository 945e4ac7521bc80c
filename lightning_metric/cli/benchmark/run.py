"""The benchmark's orchestration: resolve and check every config before anything trains,
record the plan (``benchmark.json``), run each config's folds in sequence as subprocesses
(skipping folds already done: resume), then report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_metric.cli.benchmark.configs import (
    BenchmarkError,
    ConfigSpec,
    check_data_accepts_folds,
    check_folds_fit,
    check_map_at_r,
    config_hash,
    differences,
    parse_specs,
    refusal_message,
    resolve,
)
from lightning_metric.cli.benchmark.layout import (
    EMBEDDINGS,
    IDS,
    LABELS,
    LOG,
    PLAN,
    REPORTED,
    RESULT,
    fold_dir,
)
from lightning_metric.cli.benchmark.report import write_report
from lightning_metric.cli.benchmark.stats import concatenate, retrieval_scores, separate

__all__ = ["Plan", "make_plan", "run_benchmark"]

Plan = dict[str, Any]


def make_plan(
    specs: Sequence[str],
    num_folds: int,
    output: str,
    base: Sequence[str] = (),
    allow: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> Plan:
    """Every config resolved, checked and hashed, and each fold's command: nothing trains."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise BenchmarkError(
            f"--num_folds must be an integer >= 2 (a confidence interval needs two folds), "
            f"got {num_folds!r}"
        )
    entries = parse_specs(specs, base)
    resolved = {e.name: resolve(e, overrides) for e in entries}
    for name, config in resolved.items():
        check_data_accepts_folds(name, config)
        check_map_at_r(name, config)
    refused, accepted = differences(resolved, allow)
    if refused:
        raise BenchmarkError(refusal_message(refused))
    fold_classes = {name: check_folds_fit(name, c, num_folds) for name, c in resolved.items()}
    out = Path(output)
    configs: dict[str, Any] = {}
    for entry in entries:
        digest = config_hash({"config": resolved[entry.name], "num_folds": num_folds})
        configs[entry.name] = {
            "files": list(entry.files),
            "hash": digest,
            "resolved": resolved[entry.name],
            "fold0_train_classes": fold_classes[entry.name],
            "folds": [
                {"dir": str(fold_dir(out, entry.name, i)),
                 "command": fold_command(entry, i, num_folds, digest, overrides, out)}
                for i in range(num_folds)
            ],
        }  # fmt: skip
    return {
        "num_folds": num_folds,
        "base": list(base),
        "overrides": list(overrides),
        "allowed_differences": accepted,
        "allow_difference": list(allow),
        "configs": configs,
    }


def fold_command(
    entry: ConfigSpec, fold: int, num_folds: int, digest: str, overrides: Sequence[str], out: Path
) -> list[str]:
    configs = [a for f in entry.files for a in ("--config", f)]
    return [
        sys.executable, "-m", "lightning_metric.cli.benchmark.fold",
        "--output", str(fold_dir(out, entry.name, fold)), "--config_hash", digest, "--",
        *configs, *overrides,
        f"--data.init_args.num_folds={num_folds}", f"--data.init_args.fold={fold}",
    ]  # fmt: skip


def _identity(plan: Plan) -> dict[str, Any]:
    """What must match for a later run to continue in the same output."""
    return {
        "num_folds": plan["num_folds"],
        "base": plan["base"],
        "configs": {name: c["hash"] for name, c in plan["configs"].items()},
    }


def check_or_record_plan(plan: Plan, output: Path) -> None:
    """Record the plan at the first start; refuse a later plan that differs from it."""
    path = output / PLAN
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        old, new = _identity(recorded), _identity(plan)
        if old != new:
            what = []
            if old["num_folds"] != new["num_folds"]:
                what.append(f"num_folds {old['num_folds']} -> {new['num_folds']}")
            if old["base"] != new["base"]:
                what.append(f"--base {old['base']} -> {new['base']}")
            for name in sorted(set(old["configs"]) | set(new["configs"])):
                a, b = old["configs"].get(name), new["configs"].get(name)
                if a != b:
                    state = "added" if a is None else "removed" if b is None else "changed"
                    what.append(f"config {name!r} {state}")
            raise BenchmarkError(
                f"{output} holds a benchmark of other settings ({'; '.join(what)}; recorded in "
                f"{path}). Nothing was changed: rerun with the same settings to continue it, "
                "or pass a new --output"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    stamped = {**plan, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(stamped, indent=2, default=str) + "\n", encoding="utf-8")


def fold_done(directory: Path, digest: str) -> dict[str, Any] | None:
    """The fold's result record if it finished with this config, else None."""
    path = directory / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("config_hash") != digest:
        raise BenchmarkError(
            f"{path} was written by another config (hash {result.get('config_hash')}, this "
            f"one is {digest}); pass a new --output"
        )
    return result


def _set_aside(directory: Path) -> None:
    """An interrupted fold restarts from scratch; its files are kept beside, not deleted."""
    if directory.exists() and any(directory.iterdir()):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = directory.with_name(f"{directory.name}.interrupted-{stamp}")
        directory.rename(aside)
        print(f"lightning-metric benchmark: {directory} was interrupted; kept as {aside}, "
              "the fold restarts")  # fmt: skip


def _run_fold(command: list[str], directory: Path) -> None:
    """Run one fold, its output streamed to the terminal and to ``directory/fold.log``."""
    _set_aside(directory)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"lightning-metric benchmark: training {directory}", flush=True)
    tail: list[str] = []
    with (directory / LOG).open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = [*tail[-30:], line]
        code = process.wait()
    sys.stdout.flush()
    if code != 0:
        raise RuntimeError(
            f"lightning-metric benchmark: the fold in {directory} failed (exit code {code}); "
            f"its full output is in {directory / LOG}. Last lines:\n{''.join(tail[-15:])}"
        )


def _fold_arrays(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.load(directory / EMBEDDINGS), np.load(directory / LABELS), np.load(directory / IDS))


def config_results(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Separate and concatenated metrics of one config's finished folds."""
    folds, embeddings = [], []
    _, labels, ids = _fold_arrays(Path(config["folds"][0]["dir"]))
    for i, fold in enumerate(config["folds"]):
        directory = Path(fold["dir"])
        result = fold_done(directory, config["hash"])
        assert result is not None
        emb, lab, fid = _fold_arrays(directory)
        if not (np.array_equal(labels, lab) and np.array_equal(ids, fid)):
            raise BenchmarkError(
                f"config {name!r}: fold {i} embedded other test items (or another order) than "
                "fold 0, so their embeddings cannot be concatenated; the test split must not "
                "depend on the fold"
            )
        embeddings.append(emb)
        folds.append({"fold": i, **result})
    concatenated = retrieval_scores(concatenate(embeddings), labels)
    per_fold = [f["metrics"] for f in folds]
    return {
        "separate": separate(per_fold, REPORTED),
        "concatenated": {k: float(concatenated[k]) for k in concatenated},
        "folds": folds,
        "fit_seconds": [f["fit_seconds"] for f in folds],
        "total_seconds": float(sum(f["fit_seconds"] + f["embed_seconds"] for f in folds)),
        "test_items": int(len(labels)),
    }


def run_benchmark(
    specs: Sequence[str],
    num_folds: int,
    output: str,
    base: Sequence[str] = (),
    allow: Sequence[str] = (),
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """The whole protocol; returns the plan (``dry_run``) or the results written to
    ``<output>/results.json``. ``report_only``: train nothing, report the configs whose folds
    have all finished (a long benchmark's results so far, or an interrupted one's)."""
    plan = make_plan(specs, num_folds, output, base, allow, overrides)
    out = Path(output)
    if dry_run:
        print_plan(plan, out)
        return plan
    check_or_record_plan(plan, out)
    if report_only:
        return report_finished(plan, out)
    started = time.perf_counter()
    for name, config in plan["configs"].items():
        for i, fold in enumerate(config["folds"]):
            directory = Path(fold["dir"])
            if fold_done(directory, config["hash"]) is not None:
                print(f"lightning-metric benchmark: {name} fold {i} already done ({directory})")
                continue
            _run_fold(fold["command"], directory)
            if fold_done(directory, config["hash"]) is None:
                raise RuntimeError(f"the fold in {directory} ended without writing {RESULT}")
    results = {name: config_results(name, c) for name, c in plan["configs"].items()}
    return write_report(plan, results, out, time.perf_counter() - started)


def report_finished(plan: Plan, output: Path) -> dict[str, Any]:
    """The report of the configs whose every fold is done; says which are not."""
    finished = {
        name: config
        for name, config in plan["configs"].items()
        if all(fold_done(Path(f["dir"]), config["hash"]) for f in config["folds"])
    }
    waiting = [name for name in plan["configs"] if name not in finished]
    if not finished:
        raise BenchmarkError(
            f"no config has finished all its {plan['num_folds']} folds in {output} yet: "
            "nothing to report; run the command without --report_only to train them"
        )
    if waiting:
        print(f"lightning-metric benchmark --report_only: not finished, left out: {waiting}")
    results = {name: config_results(name, config) for name, config in finished.items()}
    return write_report({**plan, "configs": finished}, results, output, 0.0)


def print_plan(plan: Plan, output: Path) -> None:
    print(f"lightning-metric benchmark --dry_run: {len(plan['configs'])} configs x "
          f"{plan['num_folds']} folds into {output}")  # fmt: skip
    if plan["allowed_differences"]:
        print("allowed differences:")
        for key, values in plan["allowed_differences"].items():
            print(f"  {key}: " + ", ".join(f"{n}={v!r}" for n, v in values.items()))
    for name, config in plan["configs"].items():
        print(f"{name} ({', '.join(config['files'])}; hash {config['hash'][:12]}; fold 0 trains "
              f"on {config['fold0_train_classes']} classes):")  # fmt: skip
        for fold in config["folds"]:
            done = (Path(fold["dir"]) / RESULT).is_file()
            print(f"  {'[done] ' if done else ''}{' '.join(fold['command'])}")
